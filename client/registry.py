"""The one model registry: every fact about a served model lives here.

Static facts (architecture, input size, window, normalization) are code; facts
that training produces (operating threshold, weight checksum) are read from the
model's ``weights/<base>.json`` sidecar, which ``python -m build_engines train``
writes. Client, build_engines, console, benchmarks and tests all read this.

    from client.registry import get_model, list_models
    spec = get_model("mobilenet_v2")
    spec.input_size, spec.threshold
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

from client.constants import MODEL_REPOSITORY, WEIGHTS_DIR
from client.errors import MissingWeightsError, UnknownModelError

#: Bumped whenever client/preprocess.py changes what a model sees; a weight
#: file trained under another version is refused.
PREPROCESSING_VERSION = "2"


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units (level/centre and width)."""

    level_hu: float
    width_hu: float

    @property
    def low_hu(self) -> float:
        """Lowest HU shown (maps to black)."""
        return self.level_hu - self.width_hu / 2

    @property
    def high_hu(self) -> float:
        """Highest HU shown (maps to white)."""
        return self.level_hu + self.width_hu / 2


#: Brain window L40/W80: blood (60-80 HU) stands out against brain (20-40 HU).
BRAIN_WINDOW = Window(40, 80)
#: Subdural window L80/W200: thin extra-axial collections against the skull.
SUBDURAL_WINDOW = Window(80, 200)
#: Soft-tissue window L40/W380.
SOFT_TISSUE_WINDOW = Window(40, 380)


@dataclass(frozen=True)
class TrainedFacts:
    """What training decided for a model, read from its weights sidecar."""

    threshold: float
    series_threshold: float
    weights_sha256: str
    preprocessing_version: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to preprocess for, serve and explain one model.

    Attributes:
        name: Registry key, Triton model folder and CLI value.
        arch: torchvision architecture name.
        input_size: Square input side in pixels.
        window: HU window for DICOM input (8-bit images are already windowed).
        mean: Per-channel normalization mean, applied after windowing to [0, 1].
        std: Per-channel normalization standard deviation.
        labels_file: Class names, one a line, index order of the output.
        max_batch_size: Largest batch Triton accepts for this model.
        precision: ``fp32``, ``int8`` (ONNX Runtime static quantization, QDQ) or
            ``bf16`` (OpenVINO's bf16 inference precision on the fp32 graph).
        cam_target_layer: Dotted path of the Grad-CAM target layer in the torch model.
        weights_name: Base model whose trained weights this entry serves.
        runtime: What runs the graph on the CPU server: ``onnxruntime`` or ``openvino``
            (the Python backend's ``runtime`` parameter). OpenVINO entries serve the
            same ``model.onnx`` as their ONNX Runtime twin, through a symlink.
        series_rule_override: A series rule a site chose instead of the recorded
            default (one of :attr:`series_thresholds`); empty: the default.
        series_threshold_override: A series threshold a site validated on its own
            reviewed series instead of the recorded one; None: the recorded one.
    """

    name: str
    arch: str
    input_size: int = 224
    window: Window = BRAIN_WINDOW
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    labels_file: str = "labels.txt"
    max_batch_size: int = 32
    precision: str = "fp32"
    cam_target_layer: str = ""
    weights_name: str = ""
    runtime: str = "onnxruntime"
    series_rule_override: str = ""
    series_threshold_override: float | None = None

    @property
    def weights_path(self) -> Path:
        """fp16 safetensors file with the trained torch weights."""
        return WEIGHTS_DIR / f"{self.weights_name or self.name}.safetensors"

    @property
    def facts_path(self) -> Path:
        """JSON sidecar with the trained threshold and checksum."""
        return WEIGHTS_DIR / f"{self.weights_name or self.name}.json"

    @property
    def repository_dir(self) -> Path:
        """This model's folder in the Triton model repository."""
        return MODEL_REPOSITORY / self.name

    @property
    def onnx_path(self) -> Path:
        """ONNX file that Triton's CPU config serves (built, never committed).

        An OpenVINO entry's is a committed relative symlink to :attr:`graph_name`'s file.
        """
        return self.repository_dir / "1" / "model.onnx"

    @property
    def graph_name(self) -> str:
        """The ONNX Runtime entry whose built ``model.onnx`` this entry serves (itself there)."""
        if self.runtime == "onnxruntime":
            return self.name
        return f"{self.weights_name}_int8" if self.precision == "int8" else self.weights_name

    @property
    def labels(self) -> list[str]:
        """Class names in output order."""
        return (self.repository_dir / self.labels_file).read_text().split()

    @property
    def trained(self) -> TrainedFacts:
        """Threshold and checksum that training recorded for these weights."""
        return _load_facts(self.facts_path)

    @property
    def threshold(self) -> float:
        """Slice-level operating threshold on P(hemorrhage)."""
        return self.trained.threshold

    @property
    def series_threshold(self) -> float:
        """Series-level operating threshold on the score of :attr:`series_rule`."""
        if self.series_threshold_override is not None:
            return self.series_threshold_override
        thresholds = self.series_thresholds
        return thresholds[self.series_rule] if thresholds else self.trained.series_threshold

    @property
    def series_thresholds(self) -> dict[str, float]:
        """Each servable series rule's threshold, as nested cross-validation chose it.

        Empty for sidecars written before every rule's threshold was recorded.
        """
        return {k: float(v) for k, v in self.trained.extra.get("series_thresholds", {}).items()}

    @property
    def series_model_name(self) -> str:
        """The Triton model that refines this model's series (``<base>_series``)."""
        return f"{self.weights_name or self.name}_series"

    @property
    def series_weights_path(self) -> Path:
        """fp16 safetensors file with the series model's members."""
        return WEIGHTS_DIR / f"{self.series_model_name}.safetensors"

    @property
    def series_onnx_path(self) -> Path:
        """The series model's ONNX file in the model repository (built, never committed)."""
        return MODEL_REPOSITORY / self.series_model_name / "1" / "model.onnx"

    @property
    def series_model_facts(self) -> dict | None:
        """The series model's design and checksum from the sidecar (None: none trained)."""
        return self.trained.extra.get("series_model")

    @property
    def series_rule(self) -> str:
        """How slice scores make a series score (``client.series.decide_series``).

        ``series_rule_override`` where set (see :func:`get_model`), else the rule
        chosen by ``python -m build_engines series`` and recorded in the sidecar;
        sidecars written before that choice existed mean the neighbour pair.
        """
        return self.series_rule_override or self.trained.extra.get("series_rule", "neighbour_pair")


@cache
def _load_facts(path: Path) -> TrainedFacts:
    if not path.exists():
        raise MissingWeightsError(
            f"no trained facts at {path}; run 'make train' or check out the committed weights"
        )
    data = json.loads(path.read_text())
    if data["preprocessing_version"] != PREPROCESSING_VERSION:
        raise MissingWeightsError(
            f"{path.name} was trained with preprocessing v{data['preprocessing_version']}, "
            f"this code is v{PREPROCESSING_VERSION}; retrain with 'make train'"
        )
    known = {"threshold", "series_threshold", "weights_sha256", "preprocessing_version"}
    return TrainedFacts(
        threshold=float(data["threshold"]),
        series_threshold=float(data["series_threshold"]),
        weights_sha256=data["weights_sha256"],
        preprocessing_version=data["preprocessing_version"],
        extra={k: v for k, v in data.items() if k not in known},
    )


#: MobileNetV2's Grad-CAM layer: the deepest 14x14 stage. The 7x7 head
#: (``features.18``) is too coarse to point at a bleed: its peak fell inside the
#: annotated haematoma box on 207 of 725 boxed phe_sich slices (0.29), this
#: layer's on 652 (0.90) (``python -m build_engines cam-eval``, MODEL_CARD.md).
MOBILENET_CAM_LAYER = "features.13"
#: ResNet-18's Grad-CAM layer, for the same reason: ``layer3`` (14x14) put the
#: peak inside the box on 604 of 725 slices (0.83), the 7x7 ``layer4`` on 176
#: (0.24) with the distilled weights of 2026-11-30.
RESNET_CAM_LAYER = "layer3"

_BASES = (
    ModelSpec(name="mobilenet_v2", arch="mobilenet_v2", cam_target_layer=MOBILENET_CAM_LAYER),
    ModelSpec(name="resnet18", arch="resnet18", cam_target_layer=RESNET_CAM_LAYER),
)
_VARIANTS = (
    # (name suffix, precision, runtime): ONNX Runtime INT8, then OpenVINO on the same
    # fp32 graph (f32 and bf16 inference precision) and on the INT8 QDQ graph.
    ("_int8", "int8", "onnxruntime"),
    ("_openvino", "fp32", "openvino"),
    ("_openvino_bf16", "bf16", "openvino"),
    ("_openvino_int8", "int8", "openvino"),
)

_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for base in _BASES
    for spec in (
        base,
        *(
            replace(
                base,
                name=base.name + suffix,
                precision=precision,
                runtime=runtime,
                weights_name=base.name,
            )
            for suffix, precision, runtime in _VARIANTS
        ),
    )
}


def parse_series_threshold(value: object) -> float | None:
    """A site's series threshold: None when empty, else a number in (0, 1].

    Raises:
        ValueError: anything else (a setting or a flag names itself around the message).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        threshold = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        threshold = math.nan
    if not 0 < threshold <= 1:
        raise ValueError(f"a series threshold is a number in (0, 1], not {value!r}")
    return threshold


def get_model(
    name: str, series_rule: str | None = None, series_threshold: float | None = None
) -> ModelSpec:
    """Return the spec registered under ``name``, deciding series by ``series_rule`` if given.

    A site that validated another series rule on its own series than the one
    cross-validation chose may serve it; its threshold is the one recorded for it,
    or ``series_threshold`` where the site validated its own (on the rule's score).

    Raises:
        UnknownModelError: ``name`` is not registered, or ``series_rule`` has no
            recorded threshold for it.
        ValueError: ``series_threshold`` is not in (0, 1].
    """
    series_threshold = parse_series_threshold(series_threshold)
    try:
        spec = _MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of {', '.join(_MODELS)}"
        ) from None
    if series_threshold is not None:
        spec = replace(spec, series_threshold_override=float(series_threshold))
    if not series_rule:
        return spec
    if series_rule not in spec.series_thresholds:
        raise UnknownModelError(
            f"{name} has no threshold for series rule {series_rule!r}; it has"
            f" {', '.join(spec.series_thresholds) or 'none recorded'}"
            " (python -m build_engines series records them)"
        )
    return replace(spec, series_rule_override=series_rule)


def list_models(precision: str | None = None, runtime: str | None = None) -> list[ModelSpec]:
    """All registered specs, optionally only those of one precision and/or runtime."""
    return [
        s
        for s in _MODELS.values()
        if (precision is None or s.precision == precision)
        and (runtime is None or s.runtime == runtime)
    ]


def series_model_names() -> list[str]:
    """The series models in the repository, one per base model (``<base>_series``)."""
    return sorted({s.series_model_name for s in _MODELS.values()})

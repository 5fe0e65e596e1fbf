"""ONNX export of the trained torch weights, with normalization and softmax inside the graph.

Each fp32 model in the registry is loaded from ``weights/<name>.safetensors``,
wrapped so the graph starts with the registry's normalization
(:class:`client.torch_models.InputNormalization`: it takes the client's uint8
(N, 3, S, S) model input) and ends in a softmax (Triton then returns
probabilities ``[normal, hemorrhage]``), exported with a dynamic batch axis,
checked with ``onnx.checker`` and compared against PyTorch on real slices from
the data folder: ONNX Runtime on the uint8 input against the network on
:func:`client.preprocess.normalize` of the same input. The file lands at
``spec.onnx_path`` in the model repository.

A base model's series model (``weights/<base>_series.safetensors``, written by
``python -m build_engines series``) is exported beside it as
``model_repository/<base>_series/1/model.onnx``: (1, T, F) series features in,
any series length T, refined slice probabilities and the series probability
out, checked against PyTorch on series of several lengths.

    python -m build_engines export                 # every fp32 model
    python -m build_engines export --model resnet18
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from client.constants import (
    INPUT_NAME,
    OUTPUT_NAME,
    SERIES_INPUT_NAME,
    SERIES_OUTPUT_NAME,
    SERIES_SLICE_OUTPUT_NAME,
)
from client.errors import HemoTriageError
from client.preprocess import normalize
from client.registry import ModelSpec
from client.series import series_features
from client.torch_models import InputNormalization, load_model, load_series_model

logger = logging.getLogger(__name__)

#: Lowest opset we export; 17 is the first with LayerNormalization and what TensorRT 8.6+ reads.
OPSET = 17
#: Largest |Δ probability| accepted between ONNX Runtime and PyTorch in fp32.
PARITY_TOLERANCE = 1e-4


class ParityError(HemoTriageError):
    """The exported graph disagrees with PyTorch beyond the tolerance."""


class WithSoftmax(torch.nn.Module):
    """A two-logit classifier followed by a softmax, so the graph outputs probabilities."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalized slices to (N, 2) probabilities [normal, hemorrhage]."""
        return torch.softmax(self.backbone(x), dim=1)


class ServedModel(torch.nn.Module):
    """What the exported graph computes: uint8 model input, normalization, network, softmax."""

    def __init__(self, spec: ModelSpec, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.normalization = InputNormalization(spec)
        self.classifier = WithSoftmax(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) model input to (N, 2) probabilities [normal, hemorrhage]."""
        return self.classifier(self.normalization(x))


@dataclass(frozen=True)
class ExportResult:
    """What one export produced and how close it came to PyTorch."""

    model: str
    onnx_path: Path
    max_abs_diff: float
    n_images: int
    series_onnx_path: Path | None = None
    series_max_abs_diff: float | None = None


def export_onnx(spec: ModelSpec, out_path: Path | None = None, opset: int = OPSET) -> Path:
    """Export ``spec``'s torch weights to ONNX (softmax included, dynamic batch).

    Args:
        spec: An fp32 model of the registry.
        out_path: Where to write; ``spec.onnx_path`` by default.
        opset: ONNX opset, at least :data:`OPSET`.

    Returns:
        The path written, after ``onnx.checker`` accepted it.

    Raises:
        MissingWeightsError: the torch weights are absent, fail their checksum, or
            take a slice with its neighbours (see :func:`client.torch_models.load_model`).
        ValueError: ``spec`` is not an fp32 model, or ``opset`` is too old.
    """
    if spec.precision != "fp32":
        raise ValueError(f"{spec.name} is {spec.precision}; export its fp32 base model instead")
    if opset < OPSET:
        raise ValueError(f"opset {opset} < {OPSET}")
    out_path = Path(out_path or spec.onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = ServedModel(spec, load_model(spec)).eval()
    dummy = torch.zeros(2, 3, spec.input_size, spec.input_size, dtype=torch.uint8)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    return _export(model, dummy, out_path, [INPUT_NAME], [OUTPUT_NAME], axes, opset)


def _export(
    model: torch.nn.Module,
    dummy: torch.Tensor,
    out_path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict,
    opset: int,
) -> Path:
    """Export ``model`` to ``out_path``, check the graph, return the path."""
    # The TorchScript exporter (dynamo=False) needs no onnxscript and gives a
    # plain single-file graph that TensorRT and ONNX Runtime quantization both read.
    torch.onnx.export(
        model,
        (dummy,),
        str(out_path),
        dynamo=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
    )
    check_onnx(out_path)
    logger.info("exported %s", out_path)
    return out_path


def check_onnx(path: Path) -> onnx.ModelProto:
    """Run the full ``onnx.checker`` (with shape inference) and return the model."""
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(str(path))


def onnx_probabilities(path: Path, batch: np.ndarray) -> np.ndarray:
    """ONNX Runtime CPU output for a uint8 (N, 3, S, S) model input: (N, 2) probabilities."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def torch_probabilities(spec: ModelSpec, batch: np.ndarray) -> np.ndarray:
    """PyTorch fp32 network on :func:`client.preprocess.normalize` of ``batch``: (N, 2).

    The training and Grad-CAM path: the normalization is the numpy function,
    not the graph's copy, so parity also checks the two agree.
    """
    model = WithSoftmax(load_model(spec)).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(normalize(batch, spec))).numpy()


def check_parity(
    spec: ModelSpec, path: Path, batch: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """Compare ONNX Runtime with PyTorch on ``batch``; return the largest |Δ probability|.

    Raises:
        ParityError: the difference exceeds ``tolerance``.
    """
    diff = float(np.abs(onnx_probabilities(path, batch) - torch_probabilities(spec, batch)).max())
    if diff > tolerance:
        raise ParityError(f"{spec.name}: ONNX vs PyTorch max |Δprob| {diff:.2e} > {tolerance:.0e}")
    return diff


def export_and_verify(spec: ModelSpec, n_images: int = 32) -> ExportResult:
    """Export ``spec`` and check parity on ``n_images`` real labelled slices.

    Raises:
        ParityError: ONNX Runtime and PyTorch disagree beyond the tolerance.
    """
    from build_engines.samples import labelled_sample

    path = export_onnx(spec)
    batch, _ = labelled_sample(spec, n_images)
    diff = check_parity(spec, path, batch)
    logger.info("%s parity on %d slices: max |Δprob| %.2e", spec.name, n_images, diff)
    if spec.series_model_facts is None:
        return ExportResult(spec.name, path, diff, n_images)
    series_path = export_series_model(spec)
    series_diff = check_series_parity(spec, series_path)
    logger.info("%s parity: max |Δprob| %.2e", spec.series_model_name, series_diff)
    return ExportResult(spec.name, path, diff, n_images, series_path, series_diff)


def export_series_model(spec: ModelSpec, out_path: Path | None = None, opset: int = OPSET) -> Path:
    """Export ``spec``'s committed series model to ONNX with a dynamic series length.

    Raises:
        MissingWeightsError: the sidecar names no series model, or its weights
            are absent or fail their checksum.
    """
    out_path = Path(out_path or spec.series_onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = load_series_model(spec)
    dummy = torch.from_numpy(_series_sample(7))[None]
    outputs = [SERIES_SLICE_OUTPUT_NAME, SERIES_OUTPUT_NAME]
    axes = {SERIES_INPUT_NAME: {1: "slices"}, SERIES_SLICE_OUTPUT_NAME: {1: "slices"}}
    return _export(model, dummy, out_path, [SERIES_INPUT_NAME], outputs, axes, opset)


def check_series_parity(
    spec: ModelSpec, path: Path, lengths: tuple[int, ...] = (1, 2, 9, 40, 250)
) -> float:
    """ONNX Runtime against PyTorch on series of ``lengths`` slices; the largest |Δ probability|.

    Raises:
        ParityError: the difference exceeds :data:`PARITY_TOLERANCE`.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = load_series_model(spec)
    diff = 0.0
    for length in lengths:
        features = _series_sample(length)[None]
        onnx_out = session.run(None, {SERIES_INPUT_NAME: features})
        with torch.inference_mode():
            torch_out = [t.numpy() for t in model(torch.from_numpy(features))]
        diff = max(
            diff, *(float(np.abs(a - b).max()) for a, b in zip(onnx_out, torch_out, strict=True))
        )
    if diff > PARITY_TOLERANCE:
        raise ParityError(
            f"{spec.series_model_name}: ONNX vs PyTorch max |Δprob| {diff:.2e}"
            f" > {PARITY_TOLERANCE:.0e}"
        )
    return diff


def _series_sample(length: int) -> np.ndarray:
    """(T, F) features of a series whose middle slices bleed: a bump of slice probabilities."""
    position = np.linspace(-1.0, 1.0, length)
    probabilities = 0.05 + 0.9 * np.exp(-8 * position**2)
    head = 0.1 + 0.4 * np.exp(-2 * position**2)
    return series_features(probabilities, head)

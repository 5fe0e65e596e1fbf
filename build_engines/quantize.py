"""INT8 variants by ONNX Runtime static quantization, and what they cost in accuracy.

Each ``*_int8`` model of the registry is its fp32 base model's ``model.onnx``
quantized statically to INT8: QDQ format, per-channel symmetric int8 weights,
activation ranges calibrated on real training slices that went through the
client's preprocessing. The activation type depends on who runs the file:

* ``cpu`` (default, the embedded Triton): asymmetric uint8 activations with
  int8 weights (U8S8), the form ONNX Runtime's quantization guide recommends
  for x86-64, with 7-bit weights (``reduce_range``): on CPUs without VNNI,
  AVX2's VPMADDUBSW adds pairs of u8 x s8 products into int16 and saturates,
  and a deployment CPU may lack VNNI even where the build machine has it. With
  full 8-bit weights mobilenet_v2 once fell to ROC-AUC 0.50; with 7-bit weights
  it stays within 0.01 of fp32 (``int8.json``).
* ``tensorrt``: symmetric int8 activations, the only form TensorRT's explicit
  quantization accepts; build this before ``build-trt`` on the GPU machine.

:func:`compare_int8` measures ROC-AUC, accuracy and speed against fp32 on a
held-out labelled sample, for the model card.

    python -m build_engines quantize                    # every int8 model, for the CPU server
    python -m build_engines quantize --target tensorrt  # before build-trt on a GPU machine

See https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from build_engines.runners import median_latency_ms, predict, runner_for
from build_engines.samples import labelled_sample, load_batch, sample_records
from client.constants import INPUT_NAME
from client.errors import ModelNotReadyError
from client.registry import ModelSpec, get_model

logger = logging.getLogger(__name__)

#: Slices whose activations set the INT8 ranges.
CALIBRATION_SIZE = 128
#: Labelled held-out slices for the fp32-vs-int8 comparison.
EVALUATION_SIZE = 256
#: Runtime the INT8 file is made for: (activation type, symmetric activations,
#: 7-bit weights) per target; see the module docstring.
TARGETS = {
    "cpu": (QuantType.QUInt8, False, True),
    "tensorrt": (QuantType.QInt8, True, False),
}


class SliceCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed training slices to the calibrator, a few at a time.

    Args:
        spec: The model whose preprocessing applies.
        size: Number of slices (from the calibration half of the patients).
        batch_size: Slices per calibration batch.
        seed: Seed of the slice sample.
    """

    def __init__(
        self, spec: ModelSpec, size: int = CALIBRATION_SIZE, batch_size: int = 16, seed: int = 0
    ) -> None:
        self._spec = spec
        self._records = sample_records(size, part="calibration", seed=seed)
        self._batch_size = batch_size
        self._batches: Iterator[dict[str, np.ndarray]] = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self._records), self._batch_size):
            chunk = self._records[start : start + self._batch_size]
            yield {INPUT_NAME: load_batch(chunk, self._spec)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch, or None when all slices were fed."""
        return next(self._batches, None)

    def rewind(self) -> None:
        """Start again from the first slice."""
        self._batches = self._iterate()


def quantize_model(
    spec: ModelSpec,
    calibration_size: int = CALIBRATION_SIZE,
    method: CalibrationMethod = CalibrationMethod.MinMax,
    out_path: Path | None = None,
    target: str = "cpu",
) -> Path:
    """Quantize ``spec``'s fp32 base ONNX into ``spec.onnx_path``.

    Args:
        spec: An int8 model of the registry.
        calibration_size: Number of calibration slices.
        method: Range calibration method (MinMax, Entropy, Percentile).
        out_path: Where to write; ``spec.onnx_path`` by default.
        target: ``cpu`` (uint8 activations, ONNX Runtime) or ``tensorrt``
            (symmetric int8 activations); see the module docstring.

    Returns:
        The INT8 QDQ ONNX path.

    Raises:
        ValueError: ``spec`` is not an int8 model, or an unknown target.
        ModelNotReadyError: the fp32 ONNX has not been exported yet.
    """
    if spec.precision != "int8":
        raise ValueError(f"{spec.name} is {spec.precision}, not int8")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    activation_type, activation_symmetric, reduce_range = TARGETS[target]
    base = get_model(spec.weights_name)
    if not base.onnx_path.exists():
        raise ModelNotReadyError(
            f"{base.onnx_path} missing; run 'python -m build_engines export --model {base.name}'"
        )
    out_path = Path(out_path or spec.onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph optimization first, as the ORT docs advise:
        # it fuses BatchNorm into Conv so fewer tensors need ranges.
        quant_pre_process(str(base.onnx_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(out_path),
            SliceCalibrationReader(base, calibration_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=activation_type,
            weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": activation_symmetric, "WeightSymmetric": True},
        )
    logger.info("quantized %s for %s to %s", base.name, target, out_path)
    return out_path


@dataclass(frozen=True)
class Int8Comparison:
    """INT8 against fp32 on the same labelled slices (ONNX Runtime, CPU)."""

    model: str
    n_slices: int
    auc_fp32: float
    auc_int8: float
    accuracy_fp32: float
    accuracy_int8: float
    max_abs_diff: float
    latency_ms_fp32: float
    latency_ms_int8: float
    batch_size: int

    @property
    def auc_delta(self) -> float:
        """int8 minus fp32 ROC-AUC."""
        return self.auc_int8 - self.auc_fp32

    @property
    def accuracy_delta(self) -> float:
        """int8 minus fp32 accuracy at the trained threshold."""
        return self.accuracy_int8 - self.accuracy_fp32

    @property
    def speedup(self) -> float:
        """fp32 latency over int8 latency at ``batch_size``."""
        return self.latency_ms_fp32 / self.latency_ms_int8


def compare_int8(
    spec: ModelSpec,
    n_slices: int = EVALUATION_SIZE,
    batch_size: int = 8,
    threads: int = 1,
    repeats: int = 10,
) -> Int8Comparison:
    """Measure AUC/accuracy delta and speed-up of ``spec`` (int8) against its fp32 base.

    The slices come from the evaluation half of the patients, never used for
    calibration. The final weights were trained on every patient, so only the
    deltas are meaningful here, not the absolute AUCs (those come from the
    cross-validation report). Latency is the median of ``repeats`` timed runs
    of one batch.

    Args:
        spec: An int8 model whose ONNX exists.
        n_slices: Labelled slices to score.
        batch_size: Batch size of the latency measurement.
        threads: ONNX Runtime intra-op threads for both models.
        repeats: Timed runs per model.

    Returns:
        The comparison.

    Raises:
        ModelNotReadyError: either ONNX file is missing.
    """
    from sklearn.metrics import roc_auc_score

    base = get_model(spec.weights_name)
    runners = {"fp32": runner_for(base, threads), "int8": runner_for(spec, threads)}
    batch, labels = labelled_sample(base, n_slices, part="evaluation")
    threshold = base.threshold
    scores = {p: predict(r, batch) for p, r in runners.items()}
    latency = median_latency_ms(runners, batch[:batch_size], repeats)
    return Int8Comparison(
        model=spec.name,
        n_slices=len(labels),
        auc_fp32=float(roc_auc_score(labels, scores["fp32"])),
        auc_int8=float(roc_auc_score(labels, scores["int8"])),
        accuracy_fp32=float(((scores["fp32"] >= threshold) == labels).mean()),
        accuracy_int8=float(((scores["int8"] >= threshold) == labels).mean()),
        max_abs_diff=float(np.abs(scores["fp32"] - scores["int8"]).max()),
        latency_ms_fp32=latency["fp32"],
        latency_ms_int8=latency["int8"],
        batch_size=min(batch_size, len(batch)),
    )


def format_comparisons(rows: list[Int8Comparison]) -> str:
    """A plain-text table of comparisons, for the CLI and the model card."""
    header = (
        f"{'model':<18} {'n':>4} {'AUC fp32':>9} {'AUC int8':>9} {'ΔAUC':>8} "
        f"{'acc fp32':>9} {'acc int8':>9} {'Δacc':>7} {'max|Δp|':>8} "
        f"{'ms fp32':>8} {'ms int8':>8} {'speed-up':>8}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.model:<18} {r.n_slices:>4} {r.auc_fp32:>9.4f} {r.auc_int8:>9.4f} "
            f"{r.auc_delta:>+8.4f} {r.accuracy_fp32:>9.4f} {r.accuracy_int8:>9.4f} "
            f"{r.accuracy_delta:>+7.4f} {r.max_abs_diff:>8.4f} {r.latency_ms_fp32:>8.2f} "
            f"{r.latency_ms_int8:>8.2f} {r.speedup:>7.2f}x"
        )
    return "\n".join(lines)

"""Every CPU variant of a base model against its fp32 ONNX Runtime model, in one run.

A variant (``mobilenet_v2_int8``, ``mobilenet_v2_openvino_bf16``...) is worth
serving only if it decides as the fp32 model does and is faster. For each
variant of a base model this measures, on the INT8 comparison's held-out slices
(:data:`build_engines.quantize.EVALUATION_SIZE` from the evaluation half of
the patients) and with the same runners (:mod:`build_engines.runners`):

* ROC-AUC and accuracy at the slice threshold, minus fp32's, the largest
  probability difference and the fraction of slice decisions that flip;
* the ``ct_ich_dev`` series whose flag flips at the model's series rule and
  threshold (:func:`client.series.decide_series`, as the console decides);
* the ``ct_ich_dev`` series sensitivity and specificity those flags give;
* slices/s at batch 1 and 8 with the same thread count for every row, the
  variants taking turns call by call (:func:`build_engines.runners.median_latency_ms`),
  with the load average, so the ratios hold even on a busy box.

:func:`fastest_within` picks the console's default from the written report:
the fastest variant (batch 8) within ``max_auc_drop`` ROC-AUC of fp32 whose
series decisions are no worse.

    python -m build_engines variants --model mobilenet_v2   # reports/<base>/variants.json
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from build_engines.data import data_dir_from_env, load_dataset
from build_engines.quantize import EVALUATION_SIZE
from build_engines.runners import median_latency_ms, predict, runner_for
from build_engines.samples import labelled_sample
from client.classify import LocalSeriesModel
from client.preprocess import model_input
from client.registry import ModelSpec, list_models
from client.series import decide_series

#: Largest ROC-AUC drop from fp32 a default may have (issue 10: "within 0.01 AUC of fp32").
MAX_AUC_DROP = 0.01
#: Batch sizes timed: one slice (an urgent single image), 8 (what the dynamic batcher forms).
BATCH_SIZES = (1, 8)


@dataclass(frozen=True)
class VariantRow:
    """One variant against fp32 ONNX Runtime (the first row is fp32 itself)."""

    model: str
    runtime: str
    precision: str
    auc: float
    auc_delta: float
    accuracy_delta: float
    max_abs_diff: float
    slice_decisions_changed: float
    series_flags_changed: int
    series_sensitivity: float
    series_specificity: float
    slices_per_s: dict[int, float]


def variants_of(base: ModelSpec) -> list[ModelSpec]:
    """``base`` first, then every registry entry that serves its weights."""
    return [base, *(s for s in list_models() if s.weights_name == base.name)]


def compare_variants(
    base: ModelSpec,
    n_slices: int = EVALUATION_SIZE,
    threads: int = 2,
    repeats: int = 20,
    data_dir: Path | None = None,
) -> dict:
    """Measure every variant of ``base`` against it; the report ``variants.json`` holds.

    Args:
        base: An fp32 ONNX Runtime model of the registry.
        n_slices: Held-out labelled slices (the INT8 comparison's sample).
        threads: Inference threads of every runner.
        repeats: Timed calls per batch size and variant.
        data_dir: Labelled data; ``HEMOTRIAGE_DATA_DIR`` or ../shared/data by default.

    Returns:
        ``{"base", "n_slices", "n_series", "threads", "cpu", "load_average", "rows"}``,
        rows as :class:`VariantRow` dicts, fp32 first.

    Raises:
        ModelNotReadyError: a variant's ONNX has not been built.
    """
    from sklearn.metrics import roc_auc_score

    specs = variants_of(base)
    runners = {s.name: runner_for(s, threads) for s in specs}
    batch, labels = labelled_sample(base, n_slices, part="evaluation", data_dir=data_dir)
    series_batch, series, series_labels = _ct_ich_dev_series(base, data_dir)
    load_before = os.getloadavg()
    latency = {b: median_latency_ms(runners, batch[:b], repeats) for b in BATCH_SIZES}
    scores, flags = {}, {}
    series_model = LocalSeriesModel(base) if base.series_model_facts else None
    for spec in specs:
        runner = runners[spec.name]
        scores[spec.name] = predict(runner, batch)
        series_scores = predict(runner, series_batch)
        flags[spec.name] = np.array(
            [
                decide_series(base, series_scores[idx], head, series_model).flagged
                for idx, head in series
            ]
        )
    load_after = os.getloadavg()
    reference = scores[base.name]
    auc_fp32 = roc_auc_score(labels, reference)
    accuracy_fp32 = ((reference >= base.threshold) == labels).mean()
    rows = []
    for spec in specs:
        p = scores[spec.name]
        rows.append(
            VariantRow(
                model=spec.name,
                runtime=spec.runtime,
                precision=runners[spec.name].precision,
                auc=float(roc_auc_score(labels, p)),
                auc_delta=float(roc_auc_score(labels, p) - auc_fp32),
                accuracy_delta=float(((p >= base.threshold) == labels).mean() - accuracy_fp32),
                max_abs_diff=float(np.abs(p - reference).max()),
                slice_decisions_changed=float(
                    ((p >= base.threshold) != (reference >= base.threshold)).mean()
                ),
                series_flags_changed=int((flags[spec.name] != flags[base.name]).sum()),
                series_sensitivity=float(flags[spec.name][series_labels == 1].mean()),
                series_specificity=float(1 - flags[spec.name][series_labels == 0].mean()),
                slices_per_s={b: b * 1000 / latency[b][spec.name] for b in BATCH_SIZES},
            )
        )
    return {
        "base": base.name,
        "n_slices": len(labels),
        "n_series": len(series),
        "threads": threads,
        "cpu": _cpu(),
        "load_average": {"before": load_before, "after": load_after},
        "rows": [asdict(r) for r in rows],
    }


def fastest_within(report: dict, max_auc_drop: float = MAX_AUC_DROP) -> str:
    """The fastest variant (slices/s at batch 8) within ``max_auc_drop`` ROC-AUC of fp32.

    A variant qualifies only if its series decisions are no worse than fp32's as
    well: ``ct_ich_dev`` series sensitivity and specificity at the served series
    rule and threshold at least fp32's. ROC-AUC alone ranks slices; it let both
    INT8 variants of mobilenet_v2 through while they flagged more normal series.

    Args:
        report: A :func:`compare_variants` result, or the ``variants.json`` it was written to.
        max_auc_drop: Largest ROC-AUC loss against fp32 allowed.

    Returns:
        The registry name; fp32 itself when no variant qualifies.
    """
    fp32 = report["rows"][0]
    eligible = [
        r
        for r in report["rows"]
        if r["auc_delta"] >= -max_auc_drop
        and r["series_sensitivity"] >= fp32["series_sensitivity"]
        and r["series_specificity"] >= fp32["series_specificity"]
    ]
    return max(eligible, key=lambda r: _speed(r, 8))["model"]


def format_variants(report: dict) -> str:
    """The report as a Markdown table, for the CLI and the model card."""
    fp32 = report["rows"][0]
    lines = [
        "| model | runtime | computes in | ROC-AUC (Δ) | Δ accuracy | max \\|Δp\\| "
        "| slice decisions changed | series flags changed | series sensitivity, specificity "
        "| slices/s batch 1 | batch 8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ratio = _speed(r, 8) / _speed(fp32, 8)
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['auc']:.4f}"
            f" ({r['auc_delta']:+.4f}) | {r['accuracy_delta']:+.4f} | {r['max_abs_diff']:.4f}"
            f" | {r['slice_decisions_changed']:.3f} | {r['series_flags_changed']}"
            f"/{report['n_series']} | {r['series_sensitivity']:.3f}, {r['series_specificity']:.3f}"
            f" | {_speed(r, 1):.0f} | {_speed(r, 8):.0f} ({ratio:.2f}×) |"
        )
    return "\n".join(lines)


def _speed(row: dict, batch_size: int) -> float:
    # JSON turns the int keys into strings.
    speeds = row["slices_per_s"]
    return float(speeds.get(batch_size, speeds.get(str(batch_size))))


def _ct_ich_dev_series(
    base: ModelSpec, data_dir: Path | None
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Every ``ct_ich_dev`` slice as model input; per series, slice indices, head fractions, label.

    Indices are in anatomical order within each series, as the console sees the slices.
    """
    dataset = load_dataset(data_dir or data_dir_from_env(), base)
    members = np.flatnonzero(dataset.sources == "ct_ich_dev")
    orders = np.array([dataset.records[i].order for i in members])
    patients = dataset.patients[members]
    batch = model_input(dataset.views[members, None].astype(np.float32) / 255)
    heads = dataset.head_fractions[members]
    labels = dataset.labels[members]
    series, series_labels = [], []
    for patient in np.unique(patients):
        idx = np.flatnonzero(patients == patient)
        idx = idx[np.argsort(orders[idx], kind="stable")]
        series.append((idx, heads[idx]))
        series_labels.append(labels[idx].max())
    return batch, series, np.array(series_labels)


def _cpu() -> dict:
    """The CPU's name and what OpenVINO's CPU plugin says it can do (BF16, INT8...)."""
    import openvino as ov

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"name": name or platform.processor(), "openvino_capabilities": list(capabilities)}

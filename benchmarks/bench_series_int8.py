"""Is an INT8 series model worth serving? fp32 against ONNX Runtime's dynamic INT8, one run.

ONNX Runtime's ``quantize_dynamic`` turns a graph's MatMuls into INT8 ones, but
it has no integer GRU: the recurrent part of the series model stays fp32. For
each base model's served series model (``model_repository/<base>_series/1/model.onnx``,
from ``python -m build_engines export``) this quantizes a copy in a temporary
folder, then, on the ``ct_ich_dev`` series of the run's ``oof.csv`` (the series
its threshold was chosen on, so the series model has seen them: this compares
the two graphs, it does not score the model):

* how far INT8 moves the series and the refined slice probabilities;
* which series flags flip at the served series-model threshold;
* the median latency of one series, shortest, typical and longest, the two
  sessions taking turns call by call (:func:`build_engines.runners.median_latency_ms`).

    python -m benchmarks.bench_series_int8                       # both models
    python -m benchmarks.bench_series_int8 --model resnet18 --repeats 200

Writes ``series_int8.{md,json}`` to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import RESULTS_DIR, markdown_table, write_report
from build_engines.model_card import REPORTS_DIR
from build_engines.runners import Runner, median_latency_ms
from build_engines.series_model import series_from_oof_csv
from client.constants import SERIES_INPUT_NAME, SERIES_OUTPUT_NAME, SERIES_SLICE_OUTPUT_NAME
from client.registry import get_model
from client.series import SERIES_MODEL_RULE


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _refine(session, features: np.ndarray) -> tuple[np.ndarray, float]:
    slices, series = session.run(
        [SERIES_SLICE_OUTPUT_NAME, SERIES_OUTPUT_NAME], {SERIES_INPUT_NAME: features[None]}
    )
    return slices[0], float(series[0])


def compare(model: str, repeats: int, report_dir: Path = REPORTS_DIR) -> dict:
    """fp32 against INT8 for ``model``'s series model: differences, flips and latencies."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    spec = get_model(model, SERIES_MODEL_RULE)
    threshold = spec.series_threshold
    series = [
        s
        for s in series_from_oof_csv(report_dir / spec.name / "oof.csv")
        if s.source == "ct_ich_dev"
    ]
    with tempfile.TemporaryDirectory() as folder:
        int8_path = Path(folder) / "model_int8.onnx"
        quantize_dynamic(spec.series_onnx_path, int8_path, weight_type=QuantType.QInt8)
        sessions = {"fp32": _session(spec.series_onnx_path), "int8": _session(int8_path)}
        series_diff = slice_diff = 0.0
        flipped = []
        for s in series:
            features = s.features(None, use_embeddings=False)
            (a_slices, a), (b_slices, b) = (_refine(x, features) for x in sessions.values())
            series_diff = max(series_diff, abs(a - b))
            slice_diff = max(slice_diff, float(np.abs(a_slices - b_slices).max()))
            if (a >= threshold) != (b >= threshold):
                flipped.append(s.patient)
        lengths = sorted(len(s.labels) for s in series)
        latency = {}
        for length in (lengths[0], lengths[len(lengths) // 2], lengths[-1]):
            features = next(s for s in series if len(s.labels) == length).features(None, False)
            runners = {
                name: Runner(lambda x, s=session: s.run(None, {SERIES_INPUT_NAME: x}), name)
                for name, session in sessions.items()
            }
            latency[length] = median_latency_ms(runners, features[None], repeats)
    return {
        "model": spec.series_model_name,
        "threshold": threshold,
        "series": len(series),
        "max_abs_diff_series": series_diff,
        "max_abs_diff_slices": slice_diff,
        "flags_flipped": flipped,
        "median_ms": {str(k): v for k, v in latency.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Compare every requested series model, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    results = [compare(model, args.repeats) for model in args.model]
    rows = []
    for r in results:
        for length, ms in r["median_ms"].items():
            rows.append(
                [
                    r["model"],
                    length,
                    f"{ms['fp32']:.3f}",
                    f"{ms['int8']:.3f}",
                    f"{ms['fp32'] / ms['int8']:.2f}",
                    f"{r['max_abs_diff_series']:.4f}",
                    f"{r['max_abs_diff_slices']:.4f}",
                    f"{len(r['flags_flipped'])}/{r['series']}",
                ]
            )
    text = "\n".join(
        [
            "# Series model: fp32 against ONNX Runtime dynamic INT8",
            "",
            f"One intra-op thread, {args.repeats} timed calls per cell, fp32 and INT8 taking "
            f"turns; {os.cpu_count()} cores, 1-minute load average before the run {load:.2f}. "
            "Differences and flips over the `ct_ich_dev` series of `oof.csv`, at the served "
            "series-model threshold. INT8 quantizes the MatMuls only: ONNX Runtime has no "
            "integer GRU.",
            "",
            markdown_table(
                [
                    "model",
                    "slices",
                    "fp32 ms",
                    "int8 ms",
                    "speed-up",
                    "max \\|Δp\\| series",
                    "max \\|Δp\\| slices",
                    "flags flipped",
                ],
                rows,
                align="lrrrrrrr",
            ),
        ]
    )
    sys.stdout.write(text + "\n")
    write_report(
        args.results_dir, "series_int8", text, {"load_average_1m": load, "models": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

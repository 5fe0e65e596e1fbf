"""What the uint8 wire format costs in accuracy and saves in bytes (issue 10).

The served models take the client's uint8 model input (``round(255 * view)``)
and normalize inside the graph; before, the client sent the normalized float32
tensor. Rounding the view to 1/255 steps moves each probability a little. This
measures, on held-out labelled slices (the evaluation half of the patients,
:func:`build_engines.samples.sample_records`):

- for each fp32 model: PyTorch on the float view (the old served input,
  :func:`client.preprocess.normalize` of the unrounded view) against the
  served ONNX graph on the uint8 input: max and mean |Δp|, ROC-AUC of both,
  and accuracy at the trained threshold;
- for each INT8 model, with ``--before DIR`` holding the float-input builds
  (``DIR/<model>.onnx``, e.g. from the main branch): the old INT8 graph on the
  float input against the new one on uint8 (calibration changed too);
- the bytes each slice puts on the wire, float32 against uint8.

The final weights were trained on every patient, so only the deltas mean
something here, not the absolute AUCs. It writes ``wire.md`` and ``wire.json``.

    python -m benchmarks.bench_wire --slices 1024
    python -m benchmarks.bench_wire --before /tmp/float-input-onnx
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.report import RESULTS_DIR, markdown_table, write_report
from build_engines.data import data_dir_from_env
from build_engines.samples import load_views, sample_records
from client.constants import INPUT_NAME, OUTPUT_NAME
from client.preprocess import model_input, normalize
from client.registry import ModelSpec, get_model, list_models

logger = logging.getLogger(__name__)


def payload_bytes(spec: ModelSpec) -> dict[str, int]:
    """Input tensor bytes of one slice: the old float32 and the new uint8 model input."""
    values = 3 * spec.input_size * spec.input_size
    return {"float32": values * 4, "uint8": values}


def _onnx(path: Path, batch: np.ndarray, chunk: int = 32) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: batch[i : i + chunk]})[0][:, 1]
            for i in range(0, len(batch), chunk)
        ]
    )


def _torch(spec: ModelSpec, batch: np.ndarray, chunk: int = 32) -> np.ndarray:
    import torch

    from build_engines.export_onnx import WithSoftmax
    from client.torch_models import load_model

    model = WithSoftmax(load_model(spec)).eval()
    with torch.inference_mode():
        return np.concatenate(
            [
                model(torch.from_numpy(batch[i : i + chunk])).numpy()[:, 1]
                for i in range(0, len(batch), chunk)
            ]
        )


def compare(
    name: str, before: np.ndarray, after: np.ndarray, labels: np.ndarray, threshold: float
) -> dict:
    """|Δp|, ROC-AUC and accuracy at ``threshold`` of two score vectors on the same slices."""
    from sklearn.metrics import roc_auc_score

    diff = np.abs(after - before)
    auc_before = float(roc_auc_score(labels, before))
    auc_after = float(roc_auc_score(labels, after))
    return {
        "model": name,
        "n": len(labels),
        "max_abs_dp": float(diff.max()),
        "mean_abs_dp": float(diff.mean()),
        "auc_float": auc_before,
        "auc_uint8": auc_after,
        "delta_auc": auc_after - auc_before,
        "flips_at_threshold": int(((before >= threshold) != (after >= threshold)).sum()),
    }


def measure(n_slices: int, before_dir: Path | None, data_dir: Path) -> list[dict]:
    """Every fp32 model, and the INT8 ones when ``before_dir`` has their float-input builds."""
    records = sample_records(n_slices, part="evaluation", data_dir=data_dir)
    labels = np.array([r.label for r in records])
    rows = []
    views: dict[int, np.ndarray] = {}
    for spec in list_models(runtime="onnxruntime"):  # the OpenVINO entries serve the same graphs
        base = get_model(spec.weights_name or spec.name)
        if base.input_size not in views:
            views[base.input_size] = load_views(records, base)
        view = views[base.input_size]
        old = before_dir / f"{spec.name}.onnx" if before_dir else None
        if spec.precision == "fp32":
            p_float = _torch(spec, normalize(view, spec))
            label = f"{spec.name} (torch float view vs served ONNX uint8)"
        elif old is not None and old.exists():
            p_float = _onnx(old, normalize(view, spec))
            label = f"{spec.name} (float-input INT8 build vs uint8-input INT8 build)"
        else:
            continue
        p_uint8 = _onnx(spec.onnx_path, model_input(view))
        rows.append(compare(label, p_float, p_uint8, labels, base.threshold))
        logger.info("%s", rows[-1])
    return rows


def render_markdown(report: dict) -> str:
    """``wire.md``."""
    payload = report["payload"]
    headers = ["comparison", "n", "max |Δp|", "mean |Δp|", "AUC float", "AUC uint8", "ΔAUC"]
    headers.append("decisions flipped at threshold")
    rows = [
        [
            *(r["model"], r["n"], f"{r['max_abs_dp']:.4f}", f"{r['mean_abs_dp']:.5f}"),
            *(f"{r['auc_float']:.4f}", f"{r['auc_uint8']:.4f}", f"{r['delta_auc']:+.4f}"),
            r["flips_at_threshold"],
        ]
        for r in report["rows"]
    ]
    return "\n".join(
        [
            "# The uint8 wire format: bytes saved, accuracy moved",
            "",
            f"- Date (UTC): {report['date']}; command: `{report['command']}`",
            f"- Input bytes per slice: float32 {payload['float32']:,} -> uint8 "
            f"{payload['uint8']:,} ({payload['float32'] / payload['uint8']:.0f}x less); a "
            f"batch of 32 goes from {32 * payload['float32'] / 2**20:.1f} MiB "
            f"to {32 * payload['uint8'] / 2**20:.1f} MiB.",
            f"- {report['n_slices']} held-out labelled slices (evaluation half of the patients); "
            "the final weights saw every patient in training, so only the deltas mean something.",
            "",
            markdown_table(headers, rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and write ``wire.md``/``wire.json``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1024, help="held-out labelled slices")
    parser.add_argument("--before", type=Path, help="folder of float-input <model>.onnx builds")
    parser.add_argument("--data-dir", type=Path, default=data_dir_from_env())
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = measure(args.slices, args.before, args.data_dir)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(sys.orig_argv),
        "load_1min": os.getloadavg()[0],
        "n_slices": rows[0]["n"] if rows else 0,
        "payload": payload_bytes(list_models()[0]),
        "rows": rows,
    }
    write_report(args.out_dir, "wire", render_markdown(report), report)
    sys.stdout.write(render_markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

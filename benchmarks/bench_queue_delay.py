"""Pick ``max_queue_delay_microseconds``: throughput and latency per candidate delay.

For each candidate, a copy of the CPU configs with that delay is served by the
embedded Triton (the built ``model.onnx`` files are linked, not copied), and
``concurrency`` gRPC threads send single-slice requests for ``--duration-s``.
A delay pays off only if it raises throughput under load more than it adds to
the latency of a lone request (concurrency 1).

    python benchmarks/bench_queue_delay.py --model resnet18 mobilenet_v2 --delay-us 0 500 2000 5000
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_triton import measure_cell, real_batch
from benchmarks.report import Column, text_header, text_row
from benchmarks.stack import triton_on_free_ports
from build_engines.data import data_dir_from_env
from build_engines.serve import with_series_models
from client.constants import MODEL_REPOSITORY
from client.registry import get_model, list_models, series_model_names
from client.triton_client import TritonClassifier

SHARED_MODEL = "onnx_runtime_model.py"
#: The printed table, one line per cell as it is measured.
_COLUMNS = (
    Column("model", 18, left=True),
    Column("delay us", 8),
    Column("conc", 4),
    Column("slices/s", 9, ".1f"),
    Column("p50 ms", 8, ".1f"),
    Column("p95 ms", 8, ".1f"),
)


def delayed_repository(root: Path, models: list[str], delay_us: int) -> Path:
    """A model repository under ``root`` whose CPU configs use ``delay_us``."""
    repo = root / f"delay_{delay_us}"
    repo.mkdir(parents=True)
    shutil.copy(MODEL_REPOSITORY / SHARED_MODEL, repo)
    for name in with_series_models(tuple(models)):
        source, target = MODEL_REPOSITORY / name, repo / name
        if name in series_model_names():  # unbatched: no delay to set, served as it is
            target.symlink_to(source)
            continue
        (target / "configs").mkdir(parents=True)
        (target / "1").mkdir()
        shutil.copy(source / "labels.txt", target)
        config = (source / "configs" / "cpu.pbtxt").read_text()
        config = re.sub(
            r"max_queue_delay_microseconds: \d+",
            f"max_queue_delay_microseconds: {delay_us}",
            config,
        )
        (target / "configs" / "cpu.pbtxt").write_text(config)
        (target / "1" / "model.py").symlink_to(Path("..") / ".." / SHARED_MODEL)
        (target / "1" / "model.onnx").symlink_to(source / "1" / "model.onnx")
    return repo


def main(argv: list[str] | None = None) -> int:
    """Serve each delay in turn, measure, print one table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        nargs="+",
        default=["resnet18", "mobilenet_v2"],
        choices=[s.name for s in list_models()],
    )
    parser.add_argument("--delay-us", nargs="+", type=int, default=[0, 500, 2000, 5000, 10000])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--duration-s", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--data-dir", type=Path, default=data_dir_from_env())
    args = parser.parse_args(argv)
    out = sys.stdout
    out.write(text_header(_COLUMNS) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for delay_us in args.delay_us:
            repo = delayed_repository(Path(tmp), args.model, delay_us)
            with triton_on_free_ports(with_series_models(tuple(args.model)), repo) as server:
                for name in args.model:
                    spec = get_model(name)
                    slices = real_batch(spec, args.data_dir)
                    with TritonClassifier(spec, server.grpc_url, "grpc") as classifier:
                        classifier.predict(slices[:1])
                        for concurrency in args.concurrency:
                            c = measure_cell(
                                (name, "grpc"),
                                classifier.predict,
                                slices,
                                1,
                                concurrency,
                                args.duration_s,
                            )
                            row = (name, delay_us, concurrency, c.slices_per_s, c.p50_ms, c.p95_ms)
                            out.write(text_row(_COLUMNS, row) + "\n")
                            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

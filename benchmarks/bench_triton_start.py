"""What the embedded Triton costs a small box: seconds to ready and memory, by model set.

Every model the CPU server loads runs in a Python-backend stub process of its
own, so each model a deployer serves adds start time and resident memory. For
each model set this starts :class:`build_engines.serve.EmbeddedTriton` on free
ports ``--repeats`` times and measures, for each start:

* seconds from launching ``tritonserver`` until every model of the set reports
  ready (the launcher polls every 0.25 s);
* once ready and before any request, the memory of the server and its stubs
  (``psutil``): resident (RSS, which counts each shared library once per process)
  and proportional (PSS, shared pages split between the processes that map them:
  what the set takes from the machine).

The sets: the console's default model with what its series rule needs, the
ONNX Runtime slice models with the series models (the test suite's server), and
every registered model (``python -m build_engines serve`` without ``--model``).

    python -m benchmarks.bench_triton_start                  # every set, 3 starts each
    python -m benchmarks.bench_triton_start --set console_default --repeats 1

Writes ``triton_start.{md,json}`` to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.report import RESULTS_DIR, markdown_table, write_report
from benchmarks.stack import triton_on_free_ports
from client.registry import list_models, series_model_names
from console import DEFAULTS as CONSOLE_DEFAULTS

#: The model sets, by name: what each loads (None: every registered model).
MODEL_SETS: dict[str, tuple[str, ...] | None] = {
    "console_default": (CONSOLE_DEFAULTS["MODEL_NAME"],),
    "onnxruntime_and_series": (
        *(s.name for s in list_models(runtime="onnxruntime")),
        *series_model_names(),
    ),
    "every_model": None,
}

_MIB = 2**20


def _memory(pid: int) -> dict[str, float]:
    """Processes, RSS and PSS (MiB) of ``pid`` and its descendants."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    info = [p.memory_full_info() for p in processes]
    return {
        "processes": len(processes),
        "rss_mib": sum(i.rss for i in info) / _MIB,
        "pss_mib": sum(i.pss for i in info) / _MIB,
    }


def measure(models: tuple[str, ...] | None, repeats: int) -> dict:
    """Start the server on ``models`` ``repeats`` times: seconds to ready and memory each time."""
    starts = []
    for _ in range(repeats):
        server = triton_on_free_ports(models)
        began = time.monotonic()
        with server:
            ready_s = time.monotonic() - began
            starts.append({"ready_s": ready_s, **_memory(server.pid)})
    return {"models": list(server.settings.models), "starts": starts}


def _row(name: str, result: dict) -> list[str]:
    starts = result["starts"]
    ready = [s["ready_s"] for s in starts]
    rss = [s["rss_mib"] for s in starts]
    pss = [s["pss_mib"] for s in starts]
    return [
        name,
        str(len(result["models"])),
        str(starts[0]["processes"]),
        f"{np.median(ready):.1f} ({min(ready):.1f}-{max(ready):.1f})",
        f"{np.median(rss):,.0f}",
        f"{np.median(pss):,.0f}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Measure every requested set, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="+", choices=list(MODEL_SETS), default=list(MODEL_SETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1: a median needs one start")
    load = os.getloadavg()[0]
    results = {name: measure(MODEL_SETS[name], args.repeats) for name in args.set}
    text = "\n".join(
        [
            "# Embedded Triton (CPU): seconds to ready and memory, by model set",
            "",
            f"{args.repeats} starts per set, one after another; {os.cpu_count()} cores, "
            f"1-minute load average before the run {load:.2f}. Ready: from launching "
            "`tritonserver` until every model of the set is ready (polled every 0.25 s), "
            "median (range). Memory: the server and its Python-backend stubs once ready, "
            "before any request, median; RSS counts shared libraries once per process, "
            "PSS shares them out.",
            "",
            markdown_table(
                ["set", "models", "processes", "ready s", "RSS MiB", "PSS MiB"],
                [_row(name, result) for name, result in results.items()],
                align="lrrrrr",
            ),
            "",
            *(f"- `{name}`: {', '.join(r['models'])}" for name, r in results.items()),
        ]
    )
    sys.stdout.write(text + "\n")
    write_report(
        args.results_dir,
        "triton_start",
        text,
        {"load_average": load, "repeats": args.repeats, "sets": results},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

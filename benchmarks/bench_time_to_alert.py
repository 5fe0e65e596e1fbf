"""Time to alert: from the last slice of a series received to its flag on the SSE stream.

Starts the embedded CPU Triton and the console under gunicorn (or uses a running
console: ``--console-url`` and ``--token``), subscribes to ``/api/stream``, and
uploads a 40-slice head series ``--runs`` times, one at a time on an idle
console, through ``POST /api/scans`` with an API token.

When the clock starts: ``POST /api/scans`` answers 201 only after every file of
the upload is decoded, written and fsynced, and its slices are committed to the
queue. "The last slice received" is the moment this client has read the 201 of
the upload that carries the series' last slice; by default the whole series
goes up in one POST (a PACS bridge forwarding a finished series), and
``--slices-per-upload 1`` sends one POST per slice (a scanner's C-STORE order),
so the clock starts at the 201 of the 40th POST. The time to alert is read
at the study's first ``flagged`` event: a long series may be flagged before
its last slice is read (``client.series.early_flag``), even before its last
slice is received (then it is negative). The time to the decision is read at
the study's final ``study`` event (``flagged``; a ``negative`` run is reported
and left out of the percentiles): every slice finished, and the event read
after the study's last ``finished_at``. The console's own record,
``flagged_at - received_at`` (from the study's first slice), and its
batches' stage times (claimed, prepared, hand-off, inferred, committed) give
the breakdown of what the time was spent on, and the stage timeline of the
median run (``<--report-name>_timeline.png``).

The bare work is measured in the same run, on one series: decoding,
preprocessing and in-process inference in the model's own runtime (ONNX Runtime,
or OpenVINO at the entry's precision; in the console's batches) of every
slice, each stage timed alone on one thread, summed and divided by the cores.
It is what the slices cost with no queue, database, HTTP or Triton in the way;
the target is a time to alert within ``--target-ratio`` of it.

    python -m benchmarks.bench_time_to_alert                  # 20 runs + 1 warm-up
    flock /tmp/hemotriage-bench.lock python -m benchmarks.bench_time_to_alert
    HEMOTRIAGE_BATCH_SIZE=40 python -m benchmarks.bench_time_to_alert --runs 10
    python -m benchmarks.bench_time_to_alert --source phantom --slices 250 --runs 10 \
        --report-name time_to_alert_250
    python -m benchmarks.bench_time_to_alert --console-url http://127.0.0.1:5000 --token ht_...

Writes ``<--report-name>.{md,json,png}`` to ``--results-dir``. The series is a
synthetic phantom with a hyperdense lesion (``--source phantom``) or a real
hemorrhage series from ``ct_ich_dev``; with ``--source auto`` (default) a
warm-up upload checks that the model flags the phantom and falls back to the
real series when it does not. The report names the series used.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.console_api import ConsoleApi, EventStream, completes
from benchmarks.phantoms import phantom_series
from benchmarks.report import RESULTS_DIR, figure, markdown_table, percentiles, write_report
from benchmarks.stack import ConsoleStack, StackSettings
from build_engines.data import data_dir_from_env
from build_engines.runners import runner_for
from client.constants import ENV_PREFIX
from client.decode import decode_bytes
from client.preprocess import model_input, model_view
from client.registry import ModelSpec, get_model, list_models
from console import DEFAULTS as CONSOLE_DEFAULTS

logger = logging.getLogger(__name__)

SOURCES = ("auto", "phantom", "ct_ich_dev")
#: Study states after which no more slices are pending.
_TERMINAL = ("flagged", "negative", "failed")
#: Slice states that are final.
#: Worker-side parts of the console's time to its decision, from each batch's stage times.
STAGES = ("first_claim_ms", "prepare_ms", "inference_ms", "commit_ms", "overlapped_ms")
#: Columns of the time-to-alert table.
_STATS = ("p50", "p95", "p99", "max")
_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET")


@dataclass(frozen=True)
class Series:
    """One series to upload: files in slice order, and the ``study`` label for PNG/JPEG."""

    files: list[tuple[str, bytes]]
    label: str | None


@dataclass(frozen=True)
class Source:
    """Where series come from; ``make`` returns a new study each call."""

    name: str
    description: str
    make: Callable[[], Series]


def phantom_source(slices: int) -> Source:
    """Synthetic DICOM series with a 70 HU lesion, new UIDs for every upload."""
    return Source(
        "phantom",
        f"synthetic head phantom ({slices} DICOM slices, 512x512 int16, 5 mm apart, "
        "a 70 HU lesion on the middle third; benchmarks/phantoms.py)",
        lambda: Series(
            [(f"IM{i + 1:04d}.dcm", data) for i, data in enumerate(phantom_series(slices))],
            None,
        ),
    )


def ct_ich_dev_source(data_dir: Path, slices: int) -> Source:
    """The ct_ich_dev patient with the most hemorrhage slices, filled up to ``slices``.

    No patient there has 40 slices, so after the patient's own slices (skull base
    to vertex) the series repeats them from the base, re-encoded losslessly as
    PNG: the same bytes again would be dropped as duplicates. The repeats are
    named ``r<name>.png``, which the console orders after every original, so no
    slice sits next to its own copy (that would fake neighbour agreement in
    :func:`client.series.series_score`). JPEG and PNG slices carry no UIDs, so
    each upload gets a fresh ``study`` label.
    """
    folder = data_dir / "ct_ich_dev"
    with (folder / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    positives: dict[str, int] = {}
    for row in rows:
        positives[row["patient_id"]] = positives.get(row["patient_id"], 0) + int(row["label_ich"])
    patient = max(positives, key=positives.get)
    own = sorted(
        (r for r in rows if r["patient_id"] == patient), key=lambda r: int(r["slice_number"])
    )
    files = [(Path(r["file"]).name, (folder / r["file"]).read_bytes()) for r in own][:slices]
    repeats = [(f"r{Path(name).stem}.png", _as_png(data)) for name, data in files]
    files += repeats[: slices - len(files)]
    return Source(
        "ct_ich_dev",
        f"ct_ich_dev patient {patient} ({positives[patient]} of {len(own)} slices labelled "
        f"hemorrhage): {min(len(own), slices)} real JPEG slices"
        + (
            f" then the first {len(files) - len(own)} again as PNG" if len(files) > len(own) else ""
        ),
        lambda: Series(files, f"time-to-alert {patient} {uuid.uuid4().hex[:8]}"),
    )


def _as_png(data: bytes) -> bytes:
    """The decoded pixels of an image file, written as PNG (lossless: the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Run:
    """One measured upload.

    Attributes:
        study_id: The console's study.
        status: Final status (``flagged`` unless the model missed it, or ``timeout``).
        score: Series score.
        time_to_alert_s: Client clock, last 201 read to the first ``flagged`` event
            read (negative: flagged before the last slice was received).
        decision_s: Client clock, last 201 read to the final event read.
        server_time_to_alert_s: The console's ``flagged_at - received_at``.
        upload_s: Wall time of the upload(s) before the clock started.
        answer_after_receipt_ms: From the study's ``received_at`` to the last 201 read.
        sse_delivery_ms: From ``flagged_at`` to the event read here.
        early_results: Final-looking events (flagged, negative, failed) the study got
            on part of the series, before its last slice was classified.
        early_flags: Of those, ``flagged``: alerts raised on part of the series.
        stages: Worker-side breakdown of the server time, see :data:`STAGES`.
        batches: The worker's batches on the study's clock, see :func:`batch_timeline`.
        load_average_1m: The 1-minute load average when the upload started.
    """

    study_id: int
    status: str
    score: float | None
    time_to_alert_s: float
    decision_s: float
    server_time_to_alert_s: float | None
    upload_s: float
    answer_after_receipt_ms: float
    sse_delivery_ms: float | None
    early_results: int
    early_flags: int
    stages: dict[str, float]
    batches: list[dict[str, float]]
    load_average_1m: float


def measure(
    api: ConsoleApi, stream: EventStream, series: Series, per_upload: int, timeout_s: float
) -> Run:
    """Upload one series and time it until its final event; see the module docstring."""
    stream.drain()
    load_average = os.getloadavg()[0]
    step = per_upload or len(series.files)
    upload_start = time.monotonic()
    for i in range(0, len(series.files), step):
        study_id = api.upload(series.files[i : i + step], series.label)["study_id"]
    clock_start, clock_start_wall = time.monotonic(), time.time()
    early: list[str] = []
    final = alert = None
    while final is None and (left_s := timeout_s - (time.monotonic() - clock_start)) > 0:
        event = stream.get(left_s)
        if event is None or event.data.get("id") != study_id:
            continue
        if event.data["status"] == "flagged" and alert is None:
            alert = event
        if event.data["status"] in _TERMINAL:
            if completes(api.study(study_id), event, len(series.files)):
                final = event
            else:
                early.append(event.data["status"])
    detail = api.study(study_id)
    stopped = final.at if final else time.monotonic()
    alerted = alert.at if alert and final and detail["status"] == "flagged" else stopped
    flagged_at = detail["flagged_at"]
    return Run(
        study_id=study_id,
        status=detail["status"] if final else "timeout",
        score=detail["score"],
        time_to_alert_s=alerted - clock_start,
        decision_s=stopped - clock_start,
        server_time_to_alert_s=detail["time_to_alert_s"],
        upload_s=clock_start - upload_start,
        answer_after_receipt_ms=(clock_start_wall - detail["received_at"]) * 1000,
        sse_delivery_ms=(alert.wall - flagged_at) * 1000 if alert and flagged_at else None,
        early_results=len(early),
        early_flags=early.count("flagged"),
        stages=worker_stages(detail),
        batches=batch_timeline(detail),
        load_average_1m=load_average,
    )


def bare_work(series: Series, spec: ModelSpec, batch_size: int, repeats: int = 3) -> dict:
    """Seconds the slices of ``series`` cost with nothing in the way, each stage alone.

    Decoding and preprocessing every slice, then inference in the entry's runtime on
    ``spec.onnx_path`` in batches of ``batch_size`` (the console's), all on one
    thread; the best of ``repeats`` for each stage. ``bare_s`` divides the sum by
    the cores, the most a perfect pipeline could overlap.
    """
    predict = runner_for(spec, threads=1).run
    decode_s, preprocess_s, inference_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        images = [decode_bytes(data, name) for name, data in series.files]
        decoded = time.perf_counter()
        tensors = np.stack([model_input(model_view(image, spec)) for image in images])
        preprocessed = time.perf_counter()
        predict(tensors[:1])  # the session's first call allocates; keep it off the clock
        started = time.perf_counter()
        for i in range(0, len(tensors), batch_size):
            predict(tensors[i : i + batch_size])
        decode_s.append(decoded - start)
        preprocess_s.append(preprocessed - decoded)
        inference_s.append(time.perf_counter() - started)
    cores = os.cpu_count() or 1
    stages = {"decode_s": min(decode_s), "preprocess_s": min(preprocess_s)}
    stages["inference_s"] = min(inference_s)
    return {
        **stages,
        "cores": cores,
        "slices": len(series.files),
        "bare_s": sum(stages.values()) / cores,
    }


def batch_timeline(detail: dict) -> list[dict[str, float]]:
    """The worker's batches of one study, in seconds after its ``received_at``.

    Each batch: ``claimed`` (its slices' ``started_at``), ``prepared`` (decoded
    and preprocessed), ``inference_start`` (after the hand-off wait),
    ``inferred`` and ``committed`` (``finished_at``), and its ``slices``. The
    slices of a batch share ``prepared_at`` and ``inferred_at``.
    """
    batches: dict[tuple[float, float], list[dict]] = {}
    for s in detail["slice_list"]:
        if s["prepared_at"] is not None and s["inferred_at"] is not None:
            batches.setdefault((s["prepared_at"], s["inferred_at"]), []).append(s)
    t0 = detail["received_at"]
    timeline = []
    for (prepared_at, inferred_at), slices in sorted(batches.items()):
        timeline.append(
            {
                "claimed": min(s["started_at"] for s in slices) - t0,
                "prepared": prepared_at - t0,
                "inference_start": prepared_at + slices[0]["handoff_ms"] / 1000 - t0,
                "inferred": inferred_at - t0,
                "committed": max(s["finished_at"] for s in slices) - t0,
                "slices": len(slices),
            }
        )
    return timeline


def worker_stages(detail: dict) -> dict[str, float]:
    """Split the console's time to its decision on the whole series into worker stages (ms).

    From the batch timeline: the wait until the first claim, then per batch the
    preparation (claim to prepared: decoding and preprocessing), the inference
    call and the commit, summed over batches. The worker prepares the next batch
    while the classifier computes one, so these sums exceed the record by the
    time the two ran at once: ``overlapped_ms`` (0 for a one-batch series).
    """
    timeline = batch_timeline(detail)
    stages = {
        "first_claim_ms": min(b["claimed"] for b in timeline) * 1000,
        "prepare_ms": sum(b["prepared"] - b["claimed"] for b in timeline) * 1000,
        "inference_ms": sum(b["inferred"] - b["inference_start"] for b in timeline) * 1000,
        "commit_ms": sum(b["committed"] - b["inferred"] for b in timeline) * 1000,
    }
    total_ms = (detail["finished_at"] - detail["received_at"]) * 1000
    stages["overlapped_ms"] = sum(stages.values()) - total_ms
    return stages


def decision_record_ms(stages: dict[str, float]) -> float:
    """The console's ``finished_at - received_at`` that :func:`worker_stages` split."""
    return sum(v for k, v in stages.items() if k != "overlapped_ms") - stages["overlapped_ms"]


def choose_source(args: argparse.Namespace, api: ConsoleApi, stream: EventStream) -> Source:
    """The requested source; for ``auto``, the phantom if a warm-up upload gets flagged."""
    candidates = {
        "phantom": lambda: phantom_source(args.slices),
        "ct_ich_dev": lambda: ct_ich_dev_source(args.data_dir, args.slices),
    }
    names = ["phantom", "ct_ich_dev"] if args.source == "auto" else [args.source]
    for name in names:
        source = candidates[name]()
        warmup = measure(api, stream, source.make(), args.slices_per_upload, args.timeout_s)
        logger.info(
            "warm-up with %s: %s (score %s) in %.2f s",
            name,
            warmup.status,
            warmup.score,
            warmup.time_to_alert_s,
        )
        if warmup.status == "flagged":
            return source
    raise SystemExit(f"the model flags none of the sources {names}; no alert to time")


def triton_statistics(url: str | None, model: str) -> dict | None:
    """Triton's cumulative inference statistics for ``model`` (gRPC), if a URL is known."""
    if not url:
        return None
    from client.triton_client import TritonClassifier

    with TritonClassifier(get_model(model), url, "grpc") as classifier:
        return classifier.statistics()["model_stats"][0]


def triton_delta(before: dict | None, after: dict | None, runs: int) -> dict[str, float] | None:
    """What Triton did during the measured runs: requests, batches and time per run."""
    if before is None or after is None:
        return None

    def stat(stats: dict, key: str, field: str) -> float:
        return float(stats["inference_stats"].get(key, {}).get(field, 0))

    out = {
        "requests_per_run": (stat(after, "success", "count") - stat(before, "success", "count"))
        / runs,
        "executions_per_run": (
            float(after.get("execution_count", 0)) - float(before.get("execution_count", 0))
        )
        / runs,
    }
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        out[f"{key}_ms_per_run"] = (stat(after, key, "ns") - stat(before, key, "ns")) / 1e6 / runs
    return out


def report(result: dict) -> str:
    """The Markdown report: time to alert, then the breakdown of the console's share."""
    tta, server = result["time_to_alert_s"], result["server_time_to_alert_s"]
    bare = result["bare_work"]
    flagged = result["flagged_runs"]
    loads = [r["load_average_1m"] for r in result["run_details"]]
    lines = [
        f"# Time to alert ({result['model']}, {result['cpu_count']} CPU cores, no GPU)",
        "",
        f"Series: {result['source']}.",
        f"Upload: {result['upload']}. Runs: {result['runs']} (plus one warm-up), "
        f"flagged {flagged}/{result['runs']}. Results on part of a series (before its last "
        f"slice was classified): {result['early_results']}, of them flagged "
        f"{result['early_flags']}.",
        "",
        f"1-min load average before the stack started: {result['load_average_1m_before']:.2f}; "
        f"at the start of each run: {min(loads):.2f} to {max(loads):.2f} (this benchmark "
        "alone keeps it near 1; more means other processes shared the cores).",
        "",
        markdown_table(
            ["seconds", *_STATS],
            [
                [title, *(f"{stats[k]:.3f}" for k in _STATS)]
                for title, stats in (
                    ("time to alert (last 201 read -> first flag event read)", tta),
                    ("time to decision (last 201 read -> final event read)", result["decision_s"]),
                    ("console record (flagged_at - received_at)", server),
                )
            ],
            align="lrrrr",
        ),
        "",
        f"Target p95 <= {result['target_p95_s']:g} s: "
        f"**{'met' if tta['p95'] <= result['target_p95_s'] else 'missed'}** "
        f"(p95 {tta['p95']:.3f} s).",
        "",
        f"Bare work for the {bare['slices']} slices, each stage alone on one thread: decode "
        f"{bare['decode_s']:.3f} s + preprocess {bare['preprocess_s']:.3f} s + in-process "
        f"inference {bare['inference_s']:.3f} s, over {bare['cores']} cores = "
        f"**{bare['bare_s']:.3f} s**. p95 time to alert / bare work = **{bare_ratio(result):.2f}**"
        f" (target <= {result['target_ratio']:g}: "
        f"**{'met' if bare_ratio(result) <= result['target_ratio'] else 'missed'}**); "
        f"p95 time to decision / bare work = {result['decision_s']['p95'] / bare['bare_s']:.2f}.",
        "",
        f"![time to alert histogram]({result['report_name']}.png)",
        "",
        "Breakdown of the console's time to its decision on the whole series"
        " (`finished_at - received_at`), per run (milliseconds). Stages are summed over the"
        " worker's batches; the next batch is prepared while Triton computes one, so they"
        " add up to the record plus `overlapped_ms`:",
        "",
        markdown_table(
            ["stage", "p50 ms", "p95 ms", "share of the record"],
            [
                [stage, f"{v['p50']:.1f}", f"{v['p95']:.1f}", f"{v['share']:.0%}"]
                for stage, v in result["breakdown"].items()
            ],
            align="lrrr",
        ),
        "",
        f"![stage timeline of one run]({result['report_name']}_timeline.png)",
        "",
        "Outside the record: the 201 reached the client "
        f"{result['answer_after_receipt_ms']:.0f} ms (median) after `received_at` (the worker "
        f"had already started), and the flag event arrived {result['sse_delivery_ms']:.1f} ms "
        "(median) after `flagged_at`.",
    ]
    triton = result.get("triton")
    if triton:
        lines += [
            "",
            f"Triton per run: {triton['requests_per_run']:.1f} requests in "
            f"{triton['executions_per_run']:.1f} batches; "
            f"queue {triton['queue_ms_per_run']:.1f} ms, "
            f"compute {triton['compute_input_ms_per_run']:.1f} (input) + "
            f"{triton['compute_infer_ms_per_run']:.1f} (infer) + "
            f"{triton['compute_output_ms_per_run']:.1f} (output) ms.",
        ]
    if result["console_env"]:
        lines += [
            "",
            "Console overrides: "
            + ", ".join(f"`{k}={v}`" for k, v in result["console_env"].items()),
        ]
    return "\n".join(lines)


def summarize(
    args: argparse.Namespace,
    source: Source,
    runs: list[Run],
    triton: dict | None,
    bare: dict,
    load_average: float,
) -> dict:
    """Percentiles over the flagged runs and the stage breakdown.

    ``load_average`` is the 1-minute load average before anything started: the
    CPU use of other processes that the measurement shared the cores with.
    """
    flagged = [r for r in runs if r.status == "flagged"]
    if not flagged:
        raise SystemExit("no measured run was flagged; nothing to report")
    server = [r.server_time_to_alert_s for r in flagged]
    breakdown = {}
    for stage in STAGES:
        values = [r.stages[stage] for r in flagged]
        shares = [r.stages[stage] / decision_record_ms(r.stages) for r in flagged]
        breakdown[stage] = {**percentiles(values), "share": float(np.mean(shares))}
    return {
        "model": args.model,
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": load_average,
        "machine": platform.platform(),
        "source": source.description,
        "upload": (
            f"{args.slices_per_upload} slice(s) per POST"
            if args.slices_per_upload
            else "the whole series in one POST"
        ),
        "runs": len(runs),
        "flagged_runs": len(flagged),
        "early_results": sum(r.early_results for r in runs),
        "early_flags": sum(r.early_flags for r in runs),
        "target_p95_s": args.target_p95_s,
        "target_ratio": args.target_ratio,
        "report_name": args.report_name,
        "time_to_alert_s": percentiles([r.time_to_alert_s for r in flagged]),
        "decision_s": percentiles([r.decision_s for r in flagged]),
        "bare_work": bare,
        "server_time_to_alert_s": percentiles(server),
        "breakdown": breakdown,
        "answer_after_receipt_ms": float(np.median([r.answer_after_receipt_ms for r in flagged])),
        "sse_delivery_ms": float(np.median([r.sse_delivery_ms for r in flagged])),
        "triton": triton,
        "console_env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIX) and not any(w in k for w in _SECRET_WORDS)
        },
        "run_details": [asdict(r) for r in runs],
    }


def plot(result: dict, path: Path) -> None:
    """Histogram of the time to alert, with p50, p95 and the target."""
    values = [r["time_to_alert_s"] for r in result["run_details"] if r["status"] == "flagged"]
    stats = result["time_to_alert_s"]
    with figure(path) as (ax,):
        ax.hist(values, bins=min(20, max(5, len(values) // 2)), color="#4477aa")
        for x, style, label in (
            (stats["p50"], "-", f"p50 {stats['p50']:.2f} s"),
            (stats["p95"], "--", f"p95 {stats['p95']:.2f} s"),
            (result["target_p95_s"], ":", f"target p95 {result['target_p95_s']:g} s"),
        ):
            ax.axvline(x, color="black", linestyle=style, label=label)
        ax.set_xlabel("time to alert (s): last 201 read -> flag event read")
        ax.set_ylabel("runs")
        ax.set_title(f"{result['model']}, {len(values)} runs, {result['cpu_count']} CPU cores")
        ax.legend()


def plot_timeline(result: dict, path: Path) -> None:
    """The worker's batches of the median flagged run: preparation and inference lanes."""
    flagged = [r for r in result["run_details"] if r["status"] == "flagged"]
    run = sorted(flagged, key=lambda r: r["decision_s"])[len(flagged) // 2]
    lanes = (
        ("prepare (claim, decode, preprocess)", "claimed", "prepared", "#4477aa"),
        ("hand-off wait", "prepared", "inference_start", "#bbbbbb"),
        ("inference (Triton)", "inference_start", "inferred", "#ee6677"),
        ("commit", "inferred", "committed", "#228833"),
    )
    with figure(path, size_in=(8.0, 3.2)) as (ax,):
        for row, (_, start, end, colour) in enumerate(lanes):
            spans = [(b[start] * 1000, (b[end] - b[start]) * 1000) for b in run["batches"]]
            ax.broken_barh(spans, (row - 0.35, 0.7), facecolors=colour, edgecolor="white")
        if run["time_to_alert_s"] < run["decision_s"]:
            alert_ms = (run["server_time_to_alert_s"] or 0.0) * 1000
            ax.axvline(alert_ms, color="black", linestyle="--", label="flagged_at")
            ax.legend(loc="lower right")
        ax.set_yticks(range(len(lanes)), [lane[0] for lane in lanes])
        ax.invert_yaxis()
        ax.set_xlabel("ms after the study was received")
        ax.set_title(
            f"{result['model']}: {sum(b['slices'] for b in run['batches'])} slices, "
            f"{len(run['batches'])} batches (median run)",
            fontsize="medium",
        )


def benchmark(
    args: argparse.Namespace, api: ConsoleApi, triton_url: str | None, load_average: float
) -> dict:
    """Warm up, pick the source, time ``args.runs`` uploads, summarize."""
    with api.events() as stream:
        source = choose_source(args, api, stream)
        logger.info("series: %s", source.description)
        before = triton_statistics(triton_url, args.model)
        runs = []
        for index in range(args.runs):
            time.sleep(args.pause_s)  # an idle console for every run
            run = measure(api, stream, source.make(), args.slices_per_upload, args.timeout_s)
            logger.info(
                "run %d/%d: %s in %.3f s (console %.3f s, study %d, score %s)",
                index + 1,
                args.runs,
                run.status,
                run.time_to_alert_s,
                run.server_time_to_alert_s or float("nan"),
                run.study_id,
                run.score,
            )
            runs.append(run)
        triton = triton_delta(before, triton_statistics(triton_url, args.model), len(runs))
    batch_size = int(os.environ.get(f"{ENV_PREFIX}BATCH_SIZE", CONSOLE_DEFAULTS["BATCH_SIZE"]))
    bare = bare_work(source.make(), get_model(args.model), batch_size)
    return summarize(args, source, runs, triton, bare, load_average)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the benchmark, print and write the report; 1 if the target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--slices", type=int, default=40, help="slices per series")
    parser.add_argument(
        "--slices-per-upload", type=int, default=0, help="0: the whole series in one POST"
    )
    parser.add_argument("--source", choices=SOURCES, default="auto")
    parser.add_argument(
        "--model",
        default=CONSOLE_DEFAULTS["MODEL_NAME"],
        choices=[s.name for s in list_models()],
        help="the console's model (default: the console's default)",
    )
    parser.add_argument("--console-url", help="a running console; else start one")
    parser.add_argument(
        "--token",
        help="API token for --console-url (create-token --scope full: it reads the stream)",
    )
    parser.add_argument("--triton-url", help="gRPC host:port of its Triton, for statistics")
    parser.add_argument("--pause-s", type=float, default=1.0, help="idle time before each run")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="longest wait per run")
    parser.add_argument("--target-p95-s", type=float, default=1.5)
    parser.add_argument(
        "--target-ratio", type=float, default=1.5, help="p95 time to alert / bare work"
    )
    parser.add_argument("--report-name", default="time_to_alert", help="results file stem")
    parser.add_argument("--data-dir", type=Path, default=data_dir_from_env())
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if bool(args.console_url) != bool(args.token):
        parser.error("--console-url and --token go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    load_average = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if args.console_url:
            api, triton_url = ConsoleApi(args.console_url, args.token), args.triton_url
        else:
            console = stack.enter_context(ConsoleStack(StackSettings(models=(args.model,))))
            api, triton_url = ConsoleApi(console.url, console.token), console.triton_grpc_url
        result = benchmark(args, api, triton_url, load_average)
    text = report(result)
    sys.stdout.write(text + "\n")
    write_report(args.results_dir, args.report_name, text, result)
    plot(result, args.results_dir / f"{args.report_name}.png")
    plot_timeline(result, args.results_dir / f"{args.report_name}_timeline.png")
    return 0 if bare_ratio(result) <= args.target_ratio else 1


def bare_ratio(result: dict) -> float:
    """p95 time to alert over the bare work of the same slices (see :func:`bare_work`)."""
    return result["time_to_alert_s"]["p95"] / result["bare_work"]["bare_s"]


if __name__ == "__main__":
    sys.exit(main())

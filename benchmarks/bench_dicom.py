"""DICOM in and out: C-STORE series to the console, time to the flag, results back in a PACS.

Starts Orthanc (the PACS, benchmarks/orthanc.py), then the embedded CPU Triton and
the console under gunicorn (:class:`benchmarks.stack.ConsoleStack`) with
``HEMOTRIAGE_RESULTS_DESTINATION`` pointing at Orthanc. A pynetdicom scanner
then sends a 40-slice series by C-STORE every ``--interval-s`` (one association
per series, slices in order), ``--runs`` times or for ``--duration`` seconds (the
soak), while a screen holds ``/api/stream`` open.

Time to flag: from the moment the scanner read the C-STORE response of a
series' last instance (the console answers success only after the instance is
stored and committed) to the moment the screen read the study's final
``study`` event (every slice classified; ``flagged`` for the default series).
Slices are classified as they arrive, so the quiet period
(``HEMOTRIAGE_DICOM_QUIET_S``) is not part of it. Time to results in the PACS:
from the same moment to the outbox row's ``sent_at`` of the series' SR and
secondary capture; it includes the quiet period, which the report states and
also subtracts.

After the last series the benchmark waits for the outbox to drain, then audits:
every instance the scanner got success for must be a slice that ended
``classified`` (or ``failed`` with a reason) in the database, every series must
be completed with all its slices, and every result object must be ``sent`` and
found in Orthanc by its SOP Instance UID. Any lost instance or undelivered
result makes the command exit 1.

The series: the real CQ500 hemorrhage study (``../shared/data/cq500_ct1/
series_thin_every8``, 30 JPEG-lossless slices, flagged by mobilenet_v2), filled up
to ``--slices`` by sending its first slices again with new SOP Instance UIDs,
placed after the vertex (so no slice sits next to its own copy), with new study
and series UIDs for every series; or ``--source phantom`` (benchmarks/phantoms.py,
not flagged by mobilenet_v2, so the clock stops at ``negative``).

    python -m benchmarks.bench_dicom                       # 20 series, quiet period 10 s
    python -m benchmarks.bench_dicom --duration 600        # the 10-minute soak
    flock /tmp/hemotriage-bench.lock python -m benchmarks.bench_dicom --duration 120

Writes ``dicom.{md,json}`` (``dicom_soak`` with ``--duration``) to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from benchmarks.console_api import SLICE_DONE, ConsoleApi, StudyEvent, completes
from benchmarks.orthanc import ORTHANC_AE, Orthanc
from benchmarks.phantoms import phantom_series
from benchmarks.report import RESULTS_DIR, percentiles
from benchmarks.stack import ConsoleStack
from build_engines.data import data_dir_from_env
from client.constants import ENV_PREFIX

logger = logging.getLogger(__name__)

SOURCES = ("cq500", "phantom")
#: The scanner's calling AE title (the console's empty allow-list admits loopback senders).
SCANNER_AE = "BENCHSCANNER"
#: The console's AE title (its default).
NODE_AE = "HEMOTRIAGE"
_TERMINAL = ("flagged", "negative", "failed")
#: Associations a series may take when responses go missing (scanners resend too).
_SEND_TRIES = 3
#: The sender's wait for one C-STORE response (scanners use tens of seconds).
_DIMSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SentSeries:
    """One series as the scanner sent it.

    Attributes:
        study_uid: Its StudyInstanceUID.
        sop_uids: Instances the console answered success for.
        refused: Instances it answered otherwise (status and comment).
        last_response_wall: ``time.time()`` when the last C-STORE response was read.
        last_response_at: ``time.monotonic()`` of the same moment.
        send_s: From association request to the last response.
        reopened: Associations opened again after a response that never came.
    """

    study_uid: str
    sop_uids: list[str]
    refused: list[str]
    last_response_wall: float
    last_response_at: float
    send_s: float
    reopened: int = 0


def cq500_series(data_dir: Path, slices: int) -> Callable[[], list[pydicom.Dataset]]:
    """New copies of the CQ500 series (new UIDs), filled up to ``slices`` after the vertex."""
    folder = data_dir / "cq500_ct1" / "series_thin_every8"
    originals = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    originals.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    top = float(originals[-1].ImagePositionPatient[2])
    span = top - float(originals[0].ImagePositionPatient[2])

    def make() -> list[pydicom.Dataset]:
        study_uid, series_uid = generate_uid(), generate_uid()
        out = []
        for index in range(slices):
            ds = copy.deepcopy(originals[index % len(originals)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = index + 1
            if index >= len(originals):  # a repeat: placed above the vertex
                position = [float(v) for v in ds.ImagePositionPatient]
                position[2] += span + 5.0
                ds.ImagePositionPatient = position
            out.append(ds)
        return out

    return make


def phantom(slices: int) -> Callable[[], list[pydicom.Dataset]]:
    """New synthetic series (benchmarks/phantoms.py)."""
    return lambda: [pydicom.dcmread(io.BytesIO(d)) for d in phantom_series(slices)]


def send_series(port: int, datasets: list[pydicom.Dataset], timeout_s: float) -> SentSeries:
    """C-STORE a series over one association, as a scanner does, in slice order.

    An instance whose response never comes (the association was aborted, or the
    sender's DIMSE wait ran out) is sent again on a new association, up to
    :data:`_SEND_TRIES` times, as scanners and PACS routers resend: the console
    ignores an instance it already stored (same SOP Instance UID). Seen once under
    load: pynetdicom's sender logged "Received unexpected C-STORE service message"
    and lost the response it was waiting for (a race in its own reactor thread).
    """
    scu = AE(ae_title=SCANNER_AE)
    scu.acse_timeout = scu.network_timeout = timeout_s
    scu.dimse_timeout = min(timeout_s, _DIMSE_TIMEOUT_S)
    for syntax in sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        scu.add_requested_context(CTImageStorage, syntax)
    start = time.monotonic()
    sent, refused, pending, reopened = [], [], list(datasets), 0
    message_ids = itertools.count(1)
    while pending:
        assoc = scu.associate("127.0.0.1", port, ae_title=NODE_AE)
        if not assoc.is_established:
            raise RuntimeError(f"the console refused the association from {SCANNER_AE}")
        try:
            while pending and assoc.is_established:
                status = assoc.send_c_store(pending[0], msg_id=next(message_ids))
                if "Status" not in status:  # no response: resend on a new association
                    break
                ds = pending.pop(0)
                if int(status.Status) == 0x0000:
                    sent.append(str(ds.SOPInstanceUID))
                else:
                    comment = status.get("ErrorComment", "")
                    refused.append(f"{ds.SOPInstanceUID}: 0x{int(status.Status):04X} {comment}")
        finally:
            if assoc.is_established:
                assoc.release()
        if pending:
            reopened += 1
            logger.warning("an instance got no response: association reopened (%d)", reopened)
            if reopened >= _SEND_TRIES:
                raise RuntimeError(f"{len(pending)} instances unanswered after {reopened} tries")
    last_wall, last_at = time.time(), time.monotonic()
    return SentSeries(
        str(datasets[0].StudyInstanceUID),
        sent,
        refused,
        last_wall,
        last_at,
        last_at - start,
        reopened,
    )


@dataclass(frozen=True)
class Measured:
    """One series' times, seconds from its last C-STORE response.

    Attributes:
        study_id: The console's study.
        status: Its final status.
        to_flag_s: To the final study event read on the stream (None: not seen).
        to_results_s: To the later of its SR and secondary capture stored in the PACS.
    """

    study_id: int
    status: str
    to_flag_s: float | None
    to_results_s: float | None


def final_event_wall(
    events: list[StudyEvent], api: ConsoleApi, study_id: int, slices: int
) -> float | None:
    """Wall time the screen read the study's final event (every slice done)."""
    detail = api.study(study_id)
    for event in events:
        data = event.data
        if (
            data.get("id") == study_id
            and data["status"] in _TERMINAL
            and completes(detail, event, slices)
        ):
            return event.wall
    return None


def wait_for_outbox(database: Path, timeout_s: float) -> bool:
    """Wait until every completed series' results left the outbox (sent or failed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        db = sqlite3.connect(database)
        try:
            due = db.execute(
                "SELECT (SELECT COUNT(*) FROM studies WHERE source = 'dicom' AND "
                "(completed_slices IS NULL OR completed_slices != (SELECT COUNT(*) FROM slices "
                "WHERE study_id = studies.id))) + (SELECT COUNT(*) FROM outbox "
                "WHERE status = 'pending')"
            ).fetchone()[0]
        finally:
            db.close()
        if due == 0:
            return True
        time.sleep(0.5)
    return False


@dataclass(frozen=True)
class Audit:
    """The database and the PACS after the run.

    Attributes:
        instances_sent: Instances the scanner got success for.
        instances_lost: Of those, not a slice in the database, or not finished.
        slices_failed: Slices failed (with a reason; not lost, but reported).
        series_incomplete: Series not completed with all their slices.
        results: Result objects in the outbox.
        results_undelivered: Not ``sent``, or not found in Orthanc.
    """

    instances_sent: int
    instances_lost: int
    slices_failed: int
    series_incomplete: int
    results: int
    results_undelivered: int


def audit(database: Path, orthanc: Orthanc, sent: list[SentSeries]) -> Audit:
    """Check every sent instance and every result object against the database and Orthanc."""
    db = sqlite3.connect(database)
    db.row_factory = sqlite3.Row
    try:
        slices = {r["sop_uid"]: r for r in db.execute("SELECT sop_uid, status, error FROM slices")}
        sop_uids = [uid for series in sent for uid in series.sop_uids]
        lost = [
            uid
            for uid in sop_uids
            if uid not in slices
            or slices[uid]["status"] not in SLICE_DONE
            or (slices[uid]["status"] == "failed" and not slices[uid]["error"])
        ]
        studies = {
            r["study_uid"]: r
            for r in db.execute(
                "SELECT study_uid, completed_slices, (SELECT COUNT(*) FROM slices "
                "WHERE study_id = studies.id) AS n FROM studies"
            )
        }
        incomplete = [
            s.study_uid
            for s in sent
            if s.study_uid not in studies
            or studies[s.study_uid]["completed_slices"] != len(s.sop_uids)
        ]
        rows = db.execute("SELECT sop_uid, status FROM outbox").fetchall()
    finally:
        db.close()
    undelivered = [
        r["sop_uid"]
        for r in rows
        if r["status"] != "sent" or not orthanc.has_instance(r["sop_uid"])
    ]
    return Audit(
        instances_sent=len(sop_uids),
        instances_lost=len(lost),
        slices_failed=sum(slices[u]["status"] == "failed" for u in sop_uids if u in slices),
        series_incomplete=len(incomplete),
        results=len(rows),
        results_undelivered=len(undelivered),
    )


def results_times(database: Path, sent: list[SentSeries]) -> dict[str, float]:
    """Per study UID: seconds from the last C-STORE response to both objects sent."""
    by_uid = {s.study_uid: s.last_response_wall for s in sent}
    db = sqlite3.connect(database)
    try:
        rows = db.execute(
            "SELECT s.study_uid, MAX(o.sent_at), COUNT(o.sent_at) FROM outbox o "
            "JOIN studies s ON s.id = o.study_id WHERE o.version = 1 GROUP BY s.id"
        ).fetchall()
    finally:
        db.close()
    return {uid: sent_at - by_uid[uid] for uid, sent_at, n in rows if n == 2 and uid in by_uid}


def run(args: argparse.Namespace, stack: ConsoleStack, orthanc: Orthanc) -> dict:
    """Send the series, measure, wait for the outbox, audit; the result as a dict."""
    source = (
        cq500_series(args.data_dir, args.slices) if args.source == "cq500" else phantom(args.slices)
    )
    api = ConsoleApi(stack.url, stack.token)
    sent: list[SentSeries] = []
    loads = []
    with api.events() as stream:
        started = time.monotonic()
        while (
            len(sent) < args.runs
            if not args.duration
            else time.monotonic() - started < args.duration
        ):
            next_start = time.monotonic() + args.interval_s
            loads.append(os.getloadavg()[0])
            series = send_series(stack.dicom_port, source(), args.timeout_s)
            sent.append(series)
            logger.info(
                "series %d: %d instances stored in %.2f s (%d refused)",
                len(sent),
                len(series.sop_uids),
                series.send_s,
                len(series.refused),
            )
            time.sleep(max(0.0, next_start - time.monotonic()))
        drained = wait_for_outbox(stack.database, args.quiet_s + args.timeout_s)
        events = stream.drain()
    studies = _study_ids(stack.database)
    measured = []
    results = results_times(stack.database, sent)
    for series in sent:
        study_id = studies.get(series.study_uid)
        if study_id is None:
            continue
        seen = final_event_wall(events, api, study_id, len(series.sop_uids))
        measured.append(
            Measured(
                study_id=study_id,
                status=api.study(study_id)["status"],
                to_flag_s=seen - series.last_response_wall if seen else None,
                to_results_s=results.get(series.study_uid),
            )
        )
    checked = audit(stack.database, orthanc, sent)
    to_flag = [m.to_flag_s for m in measured if m.to_flag_s is not None]
    to_results = [m.to_results_s for m in measured if m.to_results_s is not None]
    return {
        "source": args.source,
        "slices": args.slices,
        "series": len(sent),
        "duration_s": args.duration or None,
        "interval_s": args.interval_s,
        "quiet_s": args.quiet_s,
        "outbox_drained": drained,
        "statuses": {s: sum(m.status == s for m in measured) for s in {m.status for m in measured}},
        "time_to_flag_s": percentiles(to_flag) if to_flag else None,
        "time_to_flag_seen": len(to_flag),
        "time_to_results_s": percentiles(to_results) if to_results else None,
        "time_to_results_minus_quiet_s": (
            percentiles([t - args.quiet_s for t in to_results]) if to_results else None
        ),
        "send_s": percentiles([s.send_s for s in sent]),
        "refused": [r for s in sent for r in s.refused],
        "associations_reopened": sum(s.reopened for s in sent),
        "audit": asdict(checked),
        "load_average_1m": {"min": min(loads), "max": max(loads)},
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "runs": [asdict(m) for m in measured],
    }


def _study_ids(database: Path) -> dict[str, int]:
    db = sqlite3.connect(database)
    try:
        return dict(db.execute("SELECT study_uid, id FROM studies"))
    finally:
        db.close()


def report(result: dict, target_p95_s: float) -> str:
    """The Markdown table the command prints and writes."""
    a = result["audit"]
    mode = (
        f"soak: a series every {result['interval_s']:.0f} s for {result['duration_s']:.0f} s"
        if result["duration_s"]
        else f"{result['series']} series, one every {result['interval_s']:.0f} s"
    )
    lines = [
        f"# DICOM in and out ({mode}; {result['cpu_count']} CPU cores, no GPU)",
        "",
        f"Series: {result['source']}, {result['slices']} slices each, sent by pynetdicom "
        f"C-STORE over one association per series; results to Orthanc by C-STORE. Quiet "
        f"period HEMOTRIAGE_DICOM_QUIET_S = {result['quiet_s']:.0f} s. Final statuses: "
        + ", ".join(f"{k} {v}" for k, v in sorted(result["statuses"].items()))
        + f". 1-min load average at each series' start: {result['load_average_1m']['min']:.2f}"
        f" to {result['load_average_1m']['max']:.2f} (2 cores shared with other work).",
        "",
        "| seconds from the last instance's C-STORE response | p50 | p95 | p99 | max |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("flag on the screen (quiet period not involved)", result["time_to_flag_s"]),
        ("SR + secondary capture stored in Orthanc", result["time_to_results_s"]),
        ("the same, minus the quiet period", result["time_to_results_minus_quiet_s"]),
        ("(sending the series: association to last response)", result["send_s"]),
    ]
    for title, stats in rows:
        if stats:
            lines.append(
                f"| {title} | {stats['p50']:.3f} | {stats['p95']:.3f} | {stats['p99']:.3f} "
                f"| {stats['max']:.3f} |"
            )
    flag = result["time_to_flag_s"]
    met = flag is not None and flag["p95"] <= target_p95_s
    lines += [
        "",
        f"Time to flag seen for {result['time_to_flag_seen']} of {result['series']} series. "
        f"Target p95 <= {target_p95_s} s: **{'met' if met else 'missed'}**"
        + (f" (p95 {flag['p95']:.3f} s)." if flag else "."),
        "",
        "| audit (database and Orthanc, after the outbox drained) | count |",
        "|---|---:|",
        f"| instances stored (C-STORE success) | {a['instances_sent']} |",
        f"| instances lost (no slice, or not finished) | **{a['instances_lost']}** |",
        f"| slices failed with a reason | {a['slices_failed']} |",
        f"| series not completed with all their slices | {a['series_incomplete']} |",
        f"| result objects in the outbox | {a['results']} |",
        f"| result objects undelivered (not sent, or not in Orthanc) | "
        f"**{a['results_undelivered']}** |",
        f"| instances refused by the console | {len(result['refused'])} |",
        "| sender associations reopened after a response that never came (resent,"
        f" duplicates ignored) | {result['associations_reopened']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, print and write the report; 1 on a lost instance or result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="series to send (without --duration)")
    parser.add_argument("--duration", type=float, default=0.0, help="soak: send for this many s")
    parser.add_argument("--interval-s", type=float, default=6.0, help="between series' starts")
    parser.add_argument("--slices", type=int, default=40, help="slices per series")
    parser.add_argument("--source", choices=SOURCES, default="cq500")
    parser.add_argument("--quiet-s", type=float, default=10.0, help="HEMOTRIAGE_DICOM_QUIET_S")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="longest wait per step")
    parser.add_argument("--target-p95-s", type=float, default=1.5)
    parser.add_argument("--data-dir", type=Path, default=data_dir_from_env())
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # a line per C-STORE otherwise

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orthanc-")))
        orthanc = stack.enter_context(Orthanc(folder))
        os.environ[f"{ENV_PREFIX}DICOM_QUIET_S"] = str(args.quiet_s)
        os.environ[f"{ENV_PREFIX}RESULTS_DESTINATION"] = (
            f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}"
        )
        console = stack.enter_context(ConsoleStack())
        orthanc.register_node((NODE_AE, console.dicom_port))
        result = run(args, console, orthanc)
    text = report(result, args.target_p95_s)
    sys.stdout.write(text + "\n")
    name = "dicom_soak" if args.duration else "dicom"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{name}.md").write_text(text + "\n")
    (args.results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    a = result["audit"]
    return 1 if a["instances_lost"] or a["results_undelivered"] or a["series_incomplete"] else 0


if __name__ == "__main__":
    sys.exit(main())

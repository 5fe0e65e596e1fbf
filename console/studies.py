"""Reading studies for the worklist, the study page and the JSON API.

Queries shared by the pages and the API:

    rows = worklist(get_db(), rule)        # ordered, with each study's priority terms
    study = get_study(get_db(), 7)         # raises StudyNotFoundError

In shadow mode only administrators see what the model said (console/shadow.py):
for everyone else ``show_results=False`` blanks the scores, the key slice and
the decision (a flagged or negative study reads ``classified``).
"""

from __future__ import annotations

import time
from dataclasses import asdict

from console.db import Connection, Row
from console.errors import StudyNotFoundError
from console.outbox import delivery
from console.priority import PriorityRule
from console.queue import ordered_slices

#: Study columns the API returns (study_key is internal).
_PUBLIC_COLUMNS = (
    "id",
    "label",
    "study_uid",
    "series_uid",
    "source",
    "status",
    "score",
    "threshold",
    "key_slice_id",
    "model_name",
    "model_version",
    "received_at",
    "finished_at",
    "flagged_at",
    "acknowledged_at",
    "acknowledged_by",
    "flag_score",
    "completed_at",
    "result_version",
)
#: What the model said about a study, blanked when results are hidden (shadow mode).
_RESULT_COLUMNS = ("score", "threshold", "key_slice_id", "flagged_at", "flag_score")
_SLICE_RESULT_COLUMNS = ("probability", "refined_probability", "head_fraction")
_SLICE_COLUMNS = (
    "id",
    "filename",
    "sop_uid",
    "instance_number",
    "slice_position_mm",
    "status",
    "probability",
    "refined_probability",
    "head_fraction",
    "error",
    "attempts",
    "ingest_ms",
    "decode_ms",
    "preprocess_ms",
    "queue_wait_ms",
    "handoff_ms",
    "inference_ms",
    "started_at",
    "prepared_at",
    "inferred_at",
    "finished_at",
    "purged_at",
)


def get_study(db: Connection, study_id: int) -> Row:
    """One study row.

    Raises:
        StudyNotFoundError: no such study.
    """
    row = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
    if row is None:
        raise StudyNotFoundError(f"no study {study_id}")
    return row


def study_json(
    study: Row,
    rule: PriorityRule,
    now: float,
    slice_counts: dict[str, int] | None = None,
    *,
    show_results: bool = True,
) -> dict:
    """A study as the API returns it, with its priority terms and time to alert.

    ``scored_lower``: the study stays flagged although a later result scored
    below the one that flagged it, or below its own threshold (a series has a
    stricter threshold than the lone image that raised the flag); console/queue.py
    never downgrades a flag.
    """
    out = {k: study[k] for k in _PUBLIC_COLUMNS}
    out["scored_lower"] = (
        study["status"] == "flagged"
        and study["flag_score"] is not None
        and (study["score"] < study["flag_score"] or study["score"] < study["threshold"])
    )
    terms = rule.explain(study, now)
    out["priority"] = {
        "total": round(terms.total, 3),
        **{k: round(v, 3) for k, v in asdict(terms).items()},
    }
    out["time_to_alert_s"] = (
        study["flagged_at"] - study["received_at"] if study["flagged_at"] else None
    )
    out["slices"] = slice_counts or {}
    out["result_hidden"] = not show_results
    if not show_results:
        out.update(dict.fromkeys(_RESULT_COLUMNS), time_to_alert_s=None, scored_lower=False)
        if out["status"] in ("flagged", "negative"):
            out["status"] = "classified"
    return out


def worklist(
    db: Connection, rule: PriorityRule, limit: int = 500, *, show_results: bool = True
) -> list[dict]:
    """The most recent studies as JSON, highest priority first."""
    now = time.time()
    studies = db.execute(
        "SELECT * FROM studies ORDER BY received_at DESC LIMIT ?", (limit,)
    ).fetchall()
    counts: dict[int, dict[str, int]] = {}
    for row in db.execute(
        "SELECT study_id, status, COUNT(*) AS n FROM slices WHERE study_id IN "
        "(SELECT id FROM studies ORDER BY received_at DESC LIMIT ?) GROUP BY study_id, status",
        (limit,),
    ):
        counts.setdefault(row["study_id"], {})[row["status"]] = row["n"]
    items = [
        study_json(s, rule, now, counts.get(s["id"], {}), show_results=show_results)
        for s in studies
    ]
    items.sort(key=lambda s: (-s["priority"]["total"], s["received_at"]))
    return items


def study_detail(
    db: Connection, study_id: int, rule: PriorityRule, *, show_results: bool = True
) -> dict:
    """One study with every slice (key slice first, then anatomical order) and its results.

    ``results`` lists the objects sent to the PACS for each completed version of a
    DICOM series, with their delivery state (pending, sent, failed), attempts and
    the last error.

    ``strip`` lists the slices skull base to vertex with their probabilities
    (and, where the series model decided, their refined probabilities), for the
    study page's probability strip along the series.

    Raises:
        StudyNotFoundError: no such study.
    """
    study = get_study(db, study_id)
    slices = [{k: s[k] for k in _SLICE_COLUMNS} for s in ordered_slices(db, study_id)]
    counts: dict[str, int] = {}
    for s in slices:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
        if not show_results:
            s.update(dict.fromkeys(_SLICE_RESULT_COLUMNS))
    out = study_json(study, rule, time.time(), counts, show_results=show_results)
    out["slice_list"] = sorted(slices, key=lambda s: s["id"] != out["key_slice_id"])
    out["strip"] = [
        {k: s[k] for k in ("id", "filename", "probability", "refined_probability")} for s in slices
    ]
    out["results"] = delivery(db, study_id)
    return out

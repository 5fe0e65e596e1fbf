"""Score the held-out CQ500 scanner series end to end, as the CLI would.

CQ500-CT-1 is a real DICOM series (JPEG Lossless, skull base to vertex) read by
three radiologists as hemorrhage; it is never used for training. Its per-slice
scores show where the model looks along the head, and whether skull-base slices
raise false alarms.

    result = check_cq500(get_model("resnet18"), data_dir)
"""

from __future__ import annotations

import json
from pathlib import Path

from client.classify import LocalClassifier, classify_series
from client.registry import ModelSpec

#: The held-out CQ500 bleeding series, under the data folder.
CQ500_SERIES = Path("cq500_ct1", "series_thin_every8")


def check_cq500(spec: ModelSpec, data_dir: Path, report_dir: Path) -> dict:
    """Classify the CQ500 series with the committed weights; write ``cq500.json``."""
    folder = data_dir / CQ500_SERIES
    result = classify_series(folder, LocalClassifier(spec))
    scored = sorted(
        (s for s in result.slices if s.probability is not None), key=lambda s: s.order_key
    )
    summary = {
        "series": "CQ500-CT-1 series_thin_every8 (hemorrhage per all 3 readers)",
        "rule": result.series.method,
        "score": round(result.series.score, 4),
        "series_threshold": round(result.series.threshold, 4),
        "flagged": result.series.flagged,
        "max_slice": round(max(s.probability for s in scored), 4),
        "key_slice": result.key_slice.name,
        "slice_probabilities_base_to_vertex": [round(s.probability, 3) for s in scored],
    }
    (report_dir / "cq500.json").write_text(json.dumps(summary, indent=1))
    return summary

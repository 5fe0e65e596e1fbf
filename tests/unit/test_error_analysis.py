"""The error analysis finds a false-alarm pattern planted in out-of-fold predictions."""

import csv
import json
from pathlib import Path

from build_engines.error_analysis import analyse_errors


def test_false_alarms_tied_to_head_fill_and_missed_subtypes_are_reported(data_dir: Path, tmp_path):
    with (data_dir / "ct_ich_dev" / "labels.csv").open() as f:
        labels = list(csv.DictReader(f))
    with (tmp_path / "oof.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", "source", "patient", "order", "label", "fold", "probability", "head_fraction"]
        )
        for i, row in enumerate(labels):
            head = (i % 10) / 10  # planted: the fuller the view, the likelier a false alarm
            bleeding = row["label_ich"] == "1"
            # Planted miss: every subdural slice scores 0; other bleeds score 1.
            p = (0.0 if row["subdural"] == "1" else 1.0) if bleeding else head
            writer.writerow(
                [
                    f"ct_ich_dev/{row['file']}",
                    "ct_ich_dev",
                    f"ct_ich_dev/{row['patient_id']}",
                    row["slice_number"],
                    row["label_ich"],
                    0,
                    p,
                    head,
                ]
            )
    (tmp_path / "metrics.json").write_text(json.dumps({"threshold": 0.55}))

    analysis = analyse_errors(tmp_path, data_dir)

    by_head = [g["rate"] for g in analysis["normal_false_alarm_by_head_fraction"]]
    assert by_head[0] == 0.0 and by_head[-1] > 0.9
    assert sum(g["slices"] for g in analysis["normal_false_alarm_by_fracture"]) == sum(
        row["label_ich"] == "0" for row in labels
    )
    subtypes = {g["group"]: g["rate"] for g in analysis["sensitivity_by_subtype"]}
    assert subtypes["subdural"] == 0.0 and subtypes["epidural"] > 0.0
    assert json.loads((tmp_path / "errors.json").read_text()) == analysis

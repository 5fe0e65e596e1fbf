import csv
from pathlib import Path

import pytest

from client.__main__ import main
from client.registry import get_model


@pytest.fixture
def weights_present():
    spec = get_model("mobilenet_v2")
    if not spec.weights_path.exists():
        pytest.fail(f"committed weights missing: {spec.weights_path}")
    return spec


def test_classify_local_prints_a_table_and_writes_csv(
    data_dir: Path, tmp_path, capsys, weights_present
):
    files = [
        data_dir / "kaggle_head_ct/head_ct/000.png",
        data_dir / "kaggle_head_ct/head_ct/150.png",
    ]
    out = tmp_path / "out.csv"
    assert (
        main(
            ["classify", "--local", "--model", "mobilenet_v2", *map(str, files), "--csv", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "probability" in printed and "000.png" in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for row in rows:
        assert row["model"] == "mobilenet_v2"
        assert 0.0 <= float(row["probability"]) <= 1.0
        assert row["label"] in ("hemorrhage", "normal")


def test_classify_local_reports_bad_files_and_keeps_going(
    data_dir: Path, tmp_path, capsys, weights_present
):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    good = data_dir / "kaggle_head_ct/head_ct/001.png"
    out = tmp_path / "out.csv"
    code = main(
        ["classify", "--local", "--model", "mobilenet_v2", str(bad), str(good), "--csv", str(out)]
    )
    assert code == 1
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert rows[str(bad)]["label"].startswith("error: notes.png: not an image")
    assert float(rows[str(good)]["probability"]) >= 0.0


@pytest.mark.parametrize("rule", [None, "series_model"])
def test_classify_series_scores_the_cq500_dicom_series(
    data_dir: Path, tmp_path, weights_present, rule
):
    series = data_dir / "cq500_ct1" / "series_thin_every8"
    out = tmp_path / "series.csv"
    chosen = ["--series-rule", rule] if rule else []
    command = ["classify", "--local", "--model", "mobilenet_v2", *chosen, "--series", str(series)]
    assert main([*command, "--csv", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["series"] == str(series)
    assert 0.0 <= float(row["score"]) <= 1.0
    assert row["key_slice"].endswith(".dcm")
    assert int(row["slices"]) >= 20  # vertex caps and blanks are not scored
    assert row["failed"] == "0"


def test_classify_refuses_a_series_rule_the_model_has_no_threshold_for(tmp_path, capsys):
    image = tmp_path / "a.png"
    assert main(["classify", "--local", "--series-rule", "mean", str(image)]) != 0
    assert "no threshold for series rule 'mean'" in capsys.readouterr().err


def test_classify_series_at_a_site_threshold_decides_by_it(
    data_dir: Path, tmp_path, capsys, weights_present
):
    series = data_dir / "cq500_ct1" / "series_thin_every8"
    base = ["classify", "--local", "--model", "mobilenet_v2", "--series", str(series)]
    rows = {}
    for chosen in ([], ["--series-threshold", "0.99"]):
        out = tmp_path / f"{len(chosen)}.csv"
        assert main([*base, *chosen, "--csv", str(out)]) == 0
        (rows[len(chosen)],) = list(csv.DictReader(out.open()))
    assert rows[0]["score"] == rows[2]["score"] and float(rows[2]["score"]) < 0.99
    assert (rows[0]["label"], rows[2]["label"]) == ("hemorrhage", "normal")
    with pytest.raises(SystemExit):
        main([*base, "--series-threshold", "1.5"])
    assert "a series threshold is a number in (0, 1], not '1.5'" in capsys.readouterr().err


def test_classify_unknown_model_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        main(["classify", "--local", "--model", "vgg16", "x.png"])

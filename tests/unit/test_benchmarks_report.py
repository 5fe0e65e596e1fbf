"""benchmarks/report.py on known numbers: percentiles, tables, the written report, a plot."""

import json

import pytest

from benchmarks.report import (
    Column,
    figure,
    markdown_table,
    percentiles,
    text_header,
    text_row,
    write_report,
)


def test_percentiles_interpolate_linearly_and_keep_the_max():
    stats = percentiles([float(v) for v in range(1, 101)])  # 1..100
    assert stats == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0})
    assert all(type(v) is float for v in stats.values())  # JSON-ready, not numpy scalars


def test_percentiles_of_one_value_are_that_value():
    assert percentiles([0.25]) == {"p50": 0.25, "p95": 0.25, "p99": 0.25, "max": 0.25}


def test_markdown_table_aligns_numeric_columns_right_when_asked():
    rows = [["resnet18", 1.5], ["mobilenet_v2", 12]]
    assert markdown_table(["model", "ms"], rows).splitlines() == [
        "| model | ms |",
        "|---|---|",
        "| resnet18 | 1.5 |",
        "| mobilenet_v2 | 12 |",
    ]
    assert markdown_table(["model", "ms"], rows, align="lr").splitlines()[1] == "|---|---:|"


def test_text_table_pads_names_left_and_numbers_right():
    columns = (Column("model", 8, left=True), Column("conc", 4), Column("p95 ms", 7, ".1f"))
    assert text_header(columns) == "model    conc  p95 ms"
    assert text_row(columns, ("resnet", 8, 20.55)) == "resnet      8    20.6"


def test_write_report_writes_markdown_with_one_final_newline_and_json(tmp_path):
    folder = tmp_path / "results"
    write_report(folder, "serving", "# Serving\n\n| a |\n\n", {"p95_ms": 1.5})
    assert (folder / "serving.md").read_text() == "# Serving\n\n| a |\n"
    assert json.loads((folder / "serving.json").read_text()) == {"p95_ms": 1.5}


def test_figure_saves_a_png_with_one_axis_per_column(tmp_path):
    path = tmp_path / "plot.png"
    with figure(path, columns=2, size_in=(4, 2), dpi=50) as axes:
        assert len(axes) == 2
        axes[0].plot([1, 8], [10.0, 20.0])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

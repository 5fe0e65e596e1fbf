from pathlib import Path

import cv2
import numpy as np
import pytest

REPORT = """# Serving benchmark

| model | path | images/s |
|---|---|---|
| mobilenet_v2 | grpc | 123.4 |

<script>alert(1)</script>

![throughput](serving_throughput.png)

[raw numbers](serving.json)
"""


def _png() -> bytes:
    ok, encoded = cv2.imencode(".png", np.full((4, 4), 200, np.uint8))
    assert ok
    return encoded.tobytes()


@pytest.fixture
def results(app, tmp_path) -> Path:
    """A results folder with one report, the plot it embeds, a plot it does not, and JSON."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "serving.md").write_text(REPORT)
    (folder / "serving_throughput.png").write_bytes(_png())
    (folder / "time_to_alert.png").write_bytes(_png())
    (folder / "serving.json").write_text('{"cells": []}')
    (tmp_path / "secret.png").write_bytes(b"outside the results folder")
    app.config["RESULTS_DIR"] = str(folder)
    return folder


def test_latency_page_renders_report_tables_and_plots(logged_in, results):
    page = logged_in.get("/latency").get_data(as_text=True)
    assert "<table>" in page and "<td>123.4</td>" in page
    assert '<img src="/latency/results/serving_throughput.png"' in page
    assert 'href="/latency/results/serving.json"' in page
    assert 'src="/latency/results/time_to_alert.png"' in page  # not embedded: listed as a plot
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_latency_results_route_serves_plots_and_json(logged_in, results):
    png = logged_in.get("/latency/results/serving_throughput.png")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.data == (results / "serving_throughput.png").read_bytes()
    assert logged_in.get("/latency/results/serving.json").get_json() == {"cells": []}


@pytest.mark.parametrize(
    "path",
    [
        "/latency/results/../secret.png",
        "/latency/results/..%2Fsecret.png",
        "/latency/results/%2E%2E%2Fsecret.png",
        "/latency/results/..",
        "/latency/results/serving.md",
        "/latency/results/missing.png",
    ],
)
def test_latency_results_refuse_traversal_and_other_files(logged_in, results, path):
    response = logged_in.get(path)
    assert response.status_code == 404
    assert b"outside the results folder" not in response.data


@pytest.mark.parametrize("path", ["/latency", "/latency/results/serving_throughput.png"])
def test_latency_page_and_results_need_login(client, results, path):
    response = client.get(path)
    assert response.status_code == 302 and "/auth/login" in response.headers["Location"]


def test_latency_page_without_results_says_how_to_make_them(logged_in, app, tmp_path):
    app.config["RESULTS_DIR"] = str(tmp_path / "none")
    page = logged_in.get("/latency").get_data(as_text=True)
    assert "No results yet" in page and "benchmarks.bench_serving" in page


def test_results_dir_defaults_to_the_repo_and_follows_the_env(app_factory, monkeypatch, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    default = app_factory(tmp_path / "a")
    assert default.config["RESULTS_DIR"] == str(repo / "benchmarks" / "results")
    monkeypatch.setenv("HEMOTRIAGE_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert app_factory(tmp_path / "b").config["RESULTS_DIR"] == str(tmp_path / "elsewhere")


def test_latency_page_shows_no_server_paths(logged_in, results, storage):
    page = logged_in.get("/latency").get_data(as_text=True)
    for path in (results, storage, Path(__file__).resolve().parents[2]):
        assert str(path) not in page

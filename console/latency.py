"""The latency page: the latest benchmark results, rendered from ``RESULTS_DIR``.

The benchmarks (``bench_serving.py``, ``bench_triton.py``, the time-to-alert
run) leave Markdown reports and PNG plots in one folder
(``HEMOTRIAGE_RESULTS_DIR``, default ``<repo>/benchmarks/results``). This page
renders every ``*.md`` there (raw HTML in them is escaped), points the images
and files a report names to the results route, and shows the plots no report
embeds after the reports. The route serves only ``.png`` and ``.json`` files
directly inside that folder.

Routes:

    GET /latency                    every report and plot in RESULTS_DIR
    GET /latency/results/<name>     one .png or .json file from RESULTS_DIR
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, abort, current_app, render_template, send_from_directory, url_for
from markdown_it import MarkdownIt
from markupsafe import Markup

bp = Blueprint("latency", __name__)

#: Files the results route sends; reports are rendered into the page, never sent raw.
SERVED_SUFFIXES = frozenset({".png", ".json"})
#: Token attribute that names a file, per inline token type.
_FILE_ATTRIBUTES = {"image": "src", "link_open": "href"}


@dataclass(frozen=True)
class Report:
    """One rendered results file."""

    name: str
    html: Markup


@bp.get("/latency")
def index():
    """Every benchmark report (tables and embedded plots), then the remaining plots."""
    folder = Path(current_app.config["RESULTS_DIR"])
    embedded: set[str] = set()
    reports = [
        Report(path.stem, _render(path.read_text(), embedded))
        for path in sorted(folder.glob("*.md"))
    ]
    plots = [path.name for path in sorted(folder.glob("*.png")) if path.name not in embedded]
    # The page names files only, never the server's folders.
    return render_template("latency/index.html", reports=reports, plots=plots)


@bp.get("/latency/results/<name>")
def result_file(name: str):
    """One plot or JSON file from the results folder (``safe_join`` refuses ``..``)."""
    if Path(name).suffix not in SERVED_SUFFIXES:
        abort(404)
    return send_from_directory(current_app.config["RESULTS_DIR"], name)


def _render(text: str, embedded: set[str]) -> Markup:
    """Markdown (tables on, raw HTML escaped) to HTML; bare result file names become routes."""
    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = markdown.parse(text)
    for token in tokens:
        for child in token.children or ():
            attribute = _FILE_ATTRIBUTES.get(child.type)
            target = child.attrGet(attribute) if attribute else None
            if isinstance(target, str) and _is_result_file(target):
                child.attrSet(attribute, url_for(".result_file", name=target))
                embedded.add(target)
    return Markup(markdown.renderer.render(tokens, markdown.options, {}))


def _is_result_file(target: str) -> bool:
    """A bare file name the results route serves (not a URL, not a path)."""
    return "/" not in target and ":" not in target and Path(target).suffix in SERVED_SUFFIXES

"""How every benchmark reports: the results folder, percentiles, tables and plots.

One place, so the reports read alike and a change of format (a column
alignment, the percentile method, the plot backend) reaches every benchmark.

    stats = percentiles(latencies_ms)                  # {"p50": ..., "p95": ..., ...}
    text = markdown_table(["model", "p95 ms"], [["resnet18", f"{stats['p95']:.1f}"]])
    write_report(RESULTS_DIR, "serving", text, {"p95_ms": stats["p95"]})
    with figure(RESULTS_DIR / "serving_p95.png") as (axis,):
        axis.plot([1, 8], [10.0, 20.0])
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.constants import REPO_ROOT

#: Where every benchmark writes by default; the console's Latency page reads it.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: The percentiles every latency report gives.
LEVELS = (50, 95, 99)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95 and p99 (numpy's linear interpolation) and the maximum.

    Args:
        values: At least one measurement.

    Returns:
        ``{"p50": ..., "p95": ..., "p99": ..., "max": ...}`` as plain floats (JSON-ready).
    """
    stats = {f"p{q}": float(v) for q, v in zip(LEVELS, np.percentile(values, LEVELS), strict=True)}
    return {**stats, "max": float(np.max(values))}


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = ""
) -> str:
    """A GitHub-flavoured Markdown table, cells as ``str()``.

    Args:
        headers: Column titles.
        rows: One sequence of values per row.
        align: One letter per column, ``l`` or ``r`` (numbers); empty: the default alignment.
    """
    rules = [":" if a == "r" else "" for a in align] if align else [""] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "".join(f"---{r}|" for r in rules)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Column:
    """One column of a fixed-width text table printed on a terminal.

    Attributes:
        header: Its title.
        width: Characters, title included.
        spec: Format spec of each value (``.1f``); empty for ``str()``.
        left: Left-aligned (names) rather than right-aligned (numbers).
    """

    header: str
    width: int
    spec: str = ""
    left: bool = False

    def cell(self, value: object, spec: str | None = None) -> str:
        """``value`` padded to the column (``spec`` overrides the column's, for titles)."""
        align = "<" if self.left else ">"
        return f"{value:{align}{self.width}{self.spec if spec is None else spec}}"


def text_header(columns: Sequence[Column]) -> str:
    """The title line of a fixed-width table."""
    return " ".join(c.cell(c.header, "") for c in columns)


def text_row(columns: Sequence[Column], values: Sequence[object]) -> str:
    """One line of a fixed-width table; it can be printed as soon as it is measured."""
    return " ".join(c.cell(v) for c, v in zip(columns, values, strict=True))


def write_report(results_dir: Path, name: str, markdown: str, data: object) -> None:
    """``<name>.md`` and ``<name>.json`` in ``results_dir`` (created if missing).

    Args:
        results_dir: The results folder, :data:`RESULTS_DIR` unless a flag says otherwise.
        name: File stem, e.g. ``time_to_alert``.
        markdown: The report; written with exactly one final newline.
        data: Everything measured, JSON-serializable, for later comparison.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
    (results_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def figure(
    path: Path, columns: int = 1, size_in: tuple[float, float] = (7.0, 4.0), dpi: int = 120
) -> Iterator[Sequence]:
    """A row of ``columns`` matplotlib axes, laid out and saved as PNG to ``path`` on exit.

    matplotlib is imported here, on the Agg backend, so benchmarks run on
    headless machines and import fast when they do not plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=size_in, squeeze=False)
    try:
        yield axes[0]
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)

"""The benchmark table of the papers: methods as columns, metrics as rows, the best of each row in bold.

Input: one ``summary.csv`` (or ``per_video.csv``, whose ``mean`` row is read) per method, as
``dlightning evaluate`` writes them; a CSV with a ``method`` column and several rows gives several
methods. The best value of a row is the highest or lowest by the metric's direction; ties are all bold;
a metric missing for a method shows as ``-``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from dlightning.errors import ConfigError
from dlightning.metrics.registry import METRICS, higher_is_better


def read_results(spec: str) -> list[tuple[str, dict[str, float]]]:
    """``[(method, {metric: mean})]`` of one ``[NAME=]PATH`` argument.

    Without ``NAME=``, the method is the CSV's ``method`` column, else the name of its folder.

    Raises:
        ConfigError: The file is missing or holds no result row.
    """
    name, sep, path_text = spec.partition("=")
    path = Path(path_text if sep else name)
    if not path.is_file():
        raise ConfigError(f"results file {path} does not exist; pass a summary.csv written by dlightning evaluate")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and "clip" in rows[0]:
        rows = [r for r in rows if r["clip"] == "mean"]
    if not rows:
        raise ConfigError(f"{path} holds no result row (a summary.csv, or a per_video.csv with its mean row)")
    found = []
    for row in rows:
        method = name if sep else (row.get("method") or path.parent.name)
        values = {k: float(v) for k, v in row.items() if k in METRICS and v not in ("", None)}
        found.append((method, values))
    return found


def _best(values: list[float | None], metric: str) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return None
    return max(known) if higher_is_better(metric) else min(known)


def benchmark_table(results: Sequence[tuple[str, dict[str, float]]], metrics: Sequence[str] | None = None,
                    digits: int = 4) -> str:
    """The Markdown table of ``results`` (methods in the given order; metrics in registry order by default)."""
    if not results:
        raise ConfigError("no results to tabulate; pass at least one summary.csv")
    methods = [m for m, _ in results]
    if len(set(methods)) != len(methods):
        raise ConfigError(f"method names {methods} repeat; name them with NAME=PATH")
    present = {k for _, values in results for k in values}
    rows = list(metrics) if metrics else [m for m in METRICS if m in present]
    lines = ["| metric | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for metric in rows:
        values = [values.get(metric) for _, values in results]
        best = _best(values, metric)
        cells = []
        for v in values:
            if v is None:
                cells.append("-")
            else:
                text = "nan" if math.isnan(v) else f"{v:.{digits}f}"
                cells.append(f"**{text}**" if best is not None and v == best else text)
        arrow = "↑" if higher_is_better(metric) else "↓"
        label = METRICS[metric].label if metric in METRICS else metric
        lines.append(f"| {label} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

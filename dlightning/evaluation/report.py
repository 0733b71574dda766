"""Writing evaluation results: per-video CSV, a Markdown table, a W&B table.

``per_video.csv`` has one row per clip (``clip`` then one column per metric) and a last row ``mean``;
``summary.csv`` is the mean row alone with a ``method`` column (the input of the benchmark table).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlightning.metrics.registry import METRICS, higher_is_better


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with ``columns`` in order; floats with full precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def markdown_table(rows: Sequence[dict[str, Any]], names: Sequence[str], mean: dict[str, float]) -> str:
    """Clips as rows, metrics as columns (arrow = direction), the mean as the last row in bold."""
    labels = [f"{METRICS[n].label if n in METRICS else n} {'↑' if higher_is_better(n) else '↓'}" for n in names]
    lines = ["| clip | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        lines.append(f"| {row['clip']} | " + " | ".join(_fmt(row[n]) for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(mean[n])}**" for n in names) + " |")
    return "\n".join(lines) + "\n"


def log_wandb_tables(logging_cfg, run_dir: Path, rows: Sequence[dict[str, Any]], names: Sequence[str],
                     mean: dict[str, float], config: dict[str, Any]) -> str:
    """Log the per-video table, the mean table and the means as the run summary to one W&B run.

    The mode follows ``logging.wandb_mode`` (offline without credentials); the run writes under
    ``<run_dir>/logs/wandb``. Returns the run's id.
    """
    import wandb

    from dlightning.contracts.run_layout import logger_dir
    from dlightning.tracking.wandb_run import resolve_wandb_mode

    save = logger_dir(run_dir, "wandb")
    save.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=logging_cfg.project, entity=logging_cfg.entity, name=logging_cfg.run_name,
                     dir=str(save.parent), mode=resolve_wandb_mode(logging_cfg.wandb_mode), job_type="evaluate",
                     tags=list(logging_cfg.wandb_tags) or None, group=logging_cfg.wandb_group, config=config,
                     reinit="finish_previous")
    try:
        columns = ["clip", *names]
        per_video = wandb.Table(columns=columns, data=[[r["clip"], *[r[n] for n in names]] for r in rows])
        means = wandb.Table(columns=list(names), data=[[mean[n] for n in names]])
        run.log({"evaluate/per_video": per_video, "evaluate/mean": means})
        run.summary.update({f"evaluate/{n}": mean[n] for n in names if not math.isnan(mean[n])})
        return run.id
    finally:
        run.finish()

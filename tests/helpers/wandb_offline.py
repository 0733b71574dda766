"""Read what W&B wrote for an offline run, with wandb's own reader (``wandb leet inspect --json``).

wandb 0.31 keeps an offline run only in its ``run-<id>.wandb`` transaction log (no ``wandb-summary.json``
or ``config.yaml`` in ``files/``) and ships no Python reader for it; its CLI prints the records as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OfflineRun:
    """The records of one offline run folder."""

    folder: Path
    run_id: str
    config: dict[str, Any] = field(default_factory=dict)
    """The run config with every update applied (top-level keys replaced, as ``wandb.config.update``)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per ``log`` call, in order."""
    exit_code: int | None = None
    """None when the run was cut off before ``finish`` (no exit record)."""
    record: dict[str, Any] = field(default_factory=dict)
    """The run record: ``tags``, ``run_group``, ``notes``, ``job_type``, ``project``, ..."""
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    """One dict per logged artifact (``type``, ``name``, ``aliases``, ``manifest``, ...)."""


def offline_runs(run_dir: str | Path) -> list[Path]:
    """The ``offline-run-<time>-<id>`` folders of a run folder (``<run_dir>/logs/wandb``), oldest first."""
    from dlightning.contracts.run_layout import logger_dir

    return sorted(logger_dir(run_dir, "wandb").glob("offline-run-*"))


def read_offline_run(folder: str | Path) -> OfflineRun:
    """Parse an offline run folder through ``python -m wandb leet inspect --json``."""
    folder = Path(folder)
    # offline + no error reporting: the reader then passes --no-observability to wandb-core (no network)
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"wandb leet inspect failed ({result.returncode}): {result.stderr[-2000:]}")
    run: OfflineRun | None = None
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind == "run":
            run = OfflineRun(folder, record["run"]["run_id"], record=record["run"])
            run.config.update(record["run"].get("config", {}).get("update", {}))
        elif run is None:
            continue
        elif kind == "config":
            run.config.update(record["config"].get("update", {}))
        elif kind == "history":
            run.history.append(record["history"]["item"])
        elif kind == "artifact":
            run.artifacts.append(record["artifact"])
        elif kind == "exit":
            run.exit_code = record["exit"].get("exit_code", 0)
    if run is None:
        raise RuntimeError(f"no run record in {folder}:\n{result.stdout[-2000:]}")
    return run

"""Experiment tracking: W&B (online, offline, disabled), TensorBoard or CSV through Lightning's loggers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from dlightning.training.checkpointing import stable_run_id
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

def resolve_wandb_mode(mode: str) -> str:
    """``auto`` is online when an API key is configured and offline otherwise."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def build_logger(cfg: Any, run_dir: str | Path, *, run_id: str | None = None) -> Logger | bool:
    """The Lightning logger chosen by ``logging.backend`` (a LoggingConfig section)."""
    run_dir = Path(run_dir)
    if cfg.backend == "none":
        return False
    if cfg.backend == "csv":
        return CSVLogger(str(run_dir), name="logs")  # version_N per (re)start: a resume never overwrites
    if cfg.backend == "tensorboard":
        return TensorBoardLogger(str(run_dir), name="tb")
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_wandb_mode(cfg.wandb_mode)
    run_id = run_id or stable_run_id(run_dir)
    os.environ["WANDB_MODE"] = mode
    log.info("W&B run %s in %s mode", run_id, mode)
    return WandbLogger(project=cfg.project, entity=cfg.entity, name=cfg.run_name, id=run_id, resume="allow",
                       save_dir=str(run_dir), offline=(mode == "offline"), mode=mode)

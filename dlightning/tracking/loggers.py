"""Experiment tracking: the Lightning loggers of ``logging.backend`` (W&B, TensorBoard, CSV, or any
``lightning.pytorch.loggers.Logger`` in LightningCLI's ``class_path``/``init_args`` form), several at once.

Every logger gets every metric; each built-in one writes under ``<run_dir>/logs/<backend>/``
(:mod:`dlightning.contracts.run_layout`). W&B specifics live in :mod:`.wandb_run`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from dlightning.contracts.run_layout import logs_dir
from dlightning.errors import ConfigError
from dlightning.tracking.config import logger_class
from dlightning.tracking.wandb_run import (
    build_wandb_logger,
    finish_tracking,
    resolve_wandb_mode,
    stable_run_id,
    wandb_mode_decision,
)

__all__ = ["LogResolvedConfig", "build_logger", "build_loggers", "finish_tracking", "resolve_wandb_mode",
           "stable_run_id", "wandb_mode_decision"]


def build_loggers(cfg: Any, run_dir: str | os.PathLike[str], *, run_id: str | None = None) -> list[Logger]:
    """The Lightning loggers of ``logging.backend`` (a LoggingConfig section), in its order; empty for ``none``.

    Raises:
        ConfigError: a ``class_path`` that cannot be imported, is not a Lightning Logger, or refuses its arguments.
    """
    run_dir = Path(run_dir)
    return [_build_one(spec, i, cfg, run_dir, run_id) for i, spec in enumerate(cfg.backends)]


def build_logger(cfg: Any, run_dir: str | os.PathLike[str], *, run_id: str | None = None) -> list[Logger] | bool:
    """``Trainer(logger=...)`` for ``logging.backend``: the list of loggers, or False for ``none``."""
    return build_loggers(cfg, run_dir, run_id=run_id) or False


def _build_one(spec: str | dict[str, Any], index: int, cfg: Any, run_dir: Path, run_id: str | None) -> Logger:
    root = str(logs_dir(run_dir))
    if spec == "csv":
        return CSVLogger(root, name="csv")  # version_N per (re)start: a resume never overwrites
    if spec == "tensorboard":
        # no hp_metric placeholder: it would show up as a metric nobody logs
        return TensorBoardLogger(root, name="tensorboard", default_hp_metric=False)
    if spec == "wandb":
        return build_wandb_logger(cfg, run_dir, run_id=run_id)
    assert isinstance(spec, dict), spec  # LoggingConfig checked the entries
    return _instantiate_logger(spec, index, root)


def _instantiate_logger(spec: dict[str, Any], index: int, root: str) -> Logger:
    """A Logger from ``{class_path, init_args}``; ``save_dir`` defaults to ``<run_dir>/logs`` when it takes one."""
    cls = logger_class(spec, index)
    args = dict(spec.get("init_args") or {})
    if "save_dir" in inspect.signature(cls).parameters:
        args.setdefault("save_dir", root)
    try:
        return cls(**args)
    except TypeError as err:
        raise ConfigError(f"logging.backend.{index}: {spec['class_path']} refuses its init_args ({err})") from err


class LogResolvedConfig(Callback):
    """Log the resolved configuration to every logger of the trainer, on global rank 0, when ``fit`` starts.

    It runs after the strategy has set up the process group, so the rank is known on every launcher.
    W&B shows it as the run config (updated in place on a resume), CSV writes ``hparams.yaml`` next to
    ``metrics.csv``, TensorBoard its hparams table.

    Args:
        config: the resolved config as plain containers (``dlightning.config.to_container``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Send the config to each logger once per ``fit``."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)

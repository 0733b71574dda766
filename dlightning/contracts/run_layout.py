"""The run folder (``trainer.run_dir``): the one place that names what goes where inside it.

One rule: each kind of output has its own sub-folder directly under the run folder, and each logger
writes under ``logs/<backend>/``::

    RUN/
      config.yaml              the resolved config of the latest start
      config_changes.log       config changes a resume accepted
      wandb_run_id             the W&B run id every (re)start of this folder logs into
      checkpoints/             step-N.ckpt, last.ckpt, preempt-N.ckpt (the resume reads only here)
      validation/step-N/       side-by-side videos, temporal profiles, metrics.json
      logs/csv/version_K/      metrics.csv and hparams.yaml, one version per (re)start
      logs/tensorboard/version_K/
      logs/wandb/              W&B's own folder: offline-run-* / run-* (unless WANDB_DIR is set)

The training, validation and tracking components and the composition roots all build their paths
from here, so the layout cannot drift between them.
"""

from __future__ import annotations

import os
from pathlib import Path

from dlightning.contracts.checkpoint_format import CHECKPOINT_SUBDIR

CONFIG_FILE = "config.yaml"
CHECKPOINTS = CHECKPOINT_SUBDIR
VALIDATION = "validation"
LOGS = "logs"
WANDB_ID_FILE = "wandb_run_id"
"""File holding the W&B run id, so requeued jobs and manual restarts log into the same run."""

BACKENDS = ("wandb", "tensorboard", "csv")
"""The built-in loggers; each owns ``logs/<name>/``."""


def logs_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN/logs``: the parent of every logger's folder (W&B adds its own ``wandb/`` below it)."""
    return Path(run_dir) / LOGS


def logger_dir(run_dir: str | os.PathLike[str], backend: str) -> Path:
    """``RUN/logs/<backend>``: where one logger writes (``csv``, ``tensorboard``, ``wandb``)."""
    return logs_dir(run_dir) / backend


def validation_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``RUN/validation/step-NNNNNNNN``: the outputs of the validation after optimizer step ``step``."""
    return Path(run_dir) / VALIDATION / f"step-{step:08d}"

"""A callback that makes every training batch take at least ``seconds`` longer (for the time-limit test).

The SLURM tests need a run whose length in seconds does not depend on how fast this machine trains the
tiny model, so that it needs a known number of time-limit requeues. The job imports it by class path
(``trainer.callbacks``), with this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StepDelay(Callback):
    """Sleep ``seconds`` after each training batch (on every rank, so they stay in step)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Wait before the next batch."""
        time.sleep(self.seconds)

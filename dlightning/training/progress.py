"""Progress a person can follow: a bar over the run's optimizer steps, or plain lines in a log file.

Lightning's own bar counts batches of an epoch (``data.batches_per_epoch``, with ``max_epochs=-1``), not
the optimizer steps the run is made of, and shows nothing useful when the output is a file (every
SLURM job's ``slurm-%j.out``). This callback replaces it: on a terminal a tqdm bar whose total is
``trainer.max_steps``, with the phase and the latest losses; otherwise one plain line per
``trainer.log_every`` steps with the step, phase, each loss term, learning rate, clips/s and time left.
It reads the metrics the module computed for its log line (``pl_module.last_metrics``) and prints on
global rank 0 only.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lightning.pytorch import Callback, LightningModule, Trainer

from dlightning.contracts.phases import LOSS_TERMS, PHASES
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, metrics: dict[str, float], seconds_left: float | None) -> str:
    """One plain progress line from a log line's ``train/...`` metrics."""
    phase = PHASES[int(metrics.get("train/phase", 0))]
    parts = [f"step {step}/{total}", phase]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4g}")
    parts += [f"{term} {metrics[f'train/loss_{term}']:.4g}" for term in LOSS_TERMS if f"train/loss_{term}" in metrics]
    rates = [v for k, v in metrics.items() if k.startswith("train/lr_") and v > 0]
    if rates:
        parts.append(f"lr {max(rates):.3g}")
    if "train/clips_per_s" in metrics:
        parts.append(f"{metrics['train/clips_per_s']:.3g} clips/s")
    if seconds_left is not None:
        parts.append(f"{format_duration(seconds_left)} left")
    return " | ".join(parts)


class StepProgress(Callback):
    """The run's progress over optimizer steps (see the module docstring).

    Args:
        total_steps: ``trainer.max_steps``.
        stream: Where the bar goes (stderr by default); a stream that is not a terminal gets plain lines.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._start_step = 0
        self._t0 = time.perf_counter()
        self._shown_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the bar at the (possibly resumed) step."""
        self._start_step = int(pl_module.optimizer_step)
        self._t0 = time.perf_counter()
        if trainer.is_global_zero and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self._start_step, unit="step", file=self.stream,
                             dynamic_ncols=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Advance at each optimizer-step boundary; show the metrics of each new log line."""
        if not trainer.is_global_zero or not getattr(pl_module, "at_step_boundary", False):
            return
        step = int(pl_module.optimizer_step)
        metrics = getattr(pl_module, "last_metrics", {}) or {}
        logged = int(metrics.get("train/optimizer_step", -1)) == step and step != self._shown_step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if logged:
                self._bar.set_postfix_str(progress_line(step, self.total, metrics, None).split(" | ", 1)[1])
        elif logged:
            log.info("%s", progress_line(step, self.total, metrics, self._seconds_left(step)))
        if logged:
            self._shown_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _seconds_left(self, step: int) -> float | None:
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * max(self.total - step, 0)

"""Non-finite losses: every rank agrees to skip a step together, and the run stops after K in a row.

Use in a manual-optimisation ``training_step``::

    finite = all_ranks_finite(loss, self.trainer.strategy)
    self.nonfinite.update(finite, step=self.optimizer_step)   # raises NonFiniteLossError after K
    if not finite:
        opt.zero_grad(set_to_none=True)
        return                                                # every rank skips this step
    self.manual_backward(loss)
    ...

The loss is never replaced by zero: a NaN is a signal, and silencing it hides bad data or a diverged
run. Calling ``all_ranks_finite`` before ``manual_backward`` keeps the DDP gradient all-reduce in step:
either every rank runs backward or none does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dlightning.errors import ConfigError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses (on every rank at the same step)."""


def all_ranks_finite(loss: Tensor, strategy: Any) -> bool:
    """Return True only if ``loss`` is finite on every rank (a MAX all-reduce of a not-finite flag).

    Args:
        loss: this rank's loss (any shape; every element must be finite).
        strategy: the Lightning strategy; its ``reduce`` with ``reduce_op="max"`` is used when it
            runs more than one process, else only the local value counts.

    Returns:
        The same bool on every rank.
    """
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    if getattr(strategy, "world_size", 1) > 1:
        bad = strategy.reduce(bad.to(strategy.root_device), reduce_op="max")
    return not bool(bad.item())


class NonFiniteTracker:
    """Count skipped steps and raise :class:`NonFiniteLossError` after ``max_consecutive`` in a row.

    Checkpoint it (``state_dict``/``load_state_dict``) so a resumed run keeps the totals.
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"trainer.max_nonfinite_steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        """Non-finite losses in a row up to now."""
        self.skipped_total = 0
        """Steps skipped over the whole run."""
        self.last_bad_step: int | None = None

    def update(self, finite: bool, *, step: int | None = None) -> None:
        """Record one step's verdict; raise once ``max_consecutive`` non-finite losses came in a row.

        Args:
            finite: the all-rank verdict from :func:`all_ranks_finite`.
            step: the optimizer step, for the log line and the error message.
        """
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        self.last_bad_step = step
        log.warning(
            "Non-finite loss at step %s: skipping the step on all ranks (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.skipped_total,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"The loss was NaN or inf on at least one rank for {self.consecutive} consecutive steps "
                f"(last at optimizer step {step}; {self.skipped_total} skipped in total). Check the learning "
                "rate and warm-up, mixed precision (try precision=32-true or bf16-mixed instead of "
                "16-mixed), "
                "the loss weights, and the data around this step (corrupt or constant frames); resume from "
                "the last checkpoint after fixing it. Raise trainer.max_nonfinite_steps only if rare spikes "
                "are expected."
            )

    def state_dict(self) -> dict[str, int | None]:
        """Plain-type state for the checkpoint's dlightning block."""
        return {
            "consecutive": self.consecutive,
            "skipped_total": self.skipped_total,
            "last_bad_step": self.last_bad_step,
        }

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        """Restore the counters written by :meth:`state_dict`."""
        self.consecutive = int(state["consecutive"] or 0)
        self.skipped_total = int(state["skipped_total"] or 0)
        self.last_bad_step = state.get("last_bad_step")

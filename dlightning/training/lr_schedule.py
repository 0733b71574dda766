"""Learning rate per optimizer group as a pure function of the optimizer step: warm-up, then decay.

Written by hand rather than with ``torch.optim.lr_scheduler``: torch's schedulers count their own
``step()`` calls, while the step that drives the phases and this schedule is the module's own
counter (which also advances on a skipped non-finite step, and is restored from checkpoints), and
``zero_lr`` masking writes the learning rates of inactive groups every step anyway.
"""

from __future__ import annotations

import math

import torch

from dlightning.contracts.phases import ACTIVE_GROUPS
from dlightning.training.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - floor) * progress


def group_lr(group: str, step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate of ``group`` at ``step``: its base rate (``group_lr`` or ``lr``) times the factor."""
    return cfg.group_lr.get(group, cfg.lr) * lr_factor(step, cfg, max_steps)


def apply_learning_rates(optimizer: torch.optim.Optimizer, step: int, phase: str, cfg: OptimConfig, *,
                         max_steps: int, zero_inactive: bool) -> None:
    """Set every group's learning rate for ``step``; with ``zero_inactive`` (``zero_lr`` masking) the groups
    that do not train in ``phase`` get 0 (no update, and AdamW's decoupled weight decay, scaled by lr, is 0
    too)."""
    active = ACTIVE_GROUPS[phase]
    for group in optimizer.param_groups:
        inactive = zero_inactive and group["name"] not in active
        group["lr"] = 0.0 if inactive else group_lr(group["name"], step, cfg, max_steps)

"""The optimizer layout: one AdamW with a named parameter group per trainable part.

Groups: ``c_lora`` and ``cfr`` step in the consistency phase, ``d_lora`` in the detail phase and
``conv_in`` in both (docs/METHOD.md 4.5). Every trainable tensor requires grad for the whole run; a phase
only decides whose gradients are kept. Dropping a group's gradients (``grad = None``) before the
step makes AdamW skip it entirely, so an inactive group gets neither an update nor weight decay.
One optimizer also is the form that Lightning's DeepSpeed strategy requires.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dlightning.contracts.phases import ACTIVE_GROUPS, PARAM_GROUPS
from dlightning.training.config import OptimConfig


def build_optimizer(groups: dict[str, list[nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """One AdamW over the named parameter groups (empty groups are left out)."""
    param_groups = [{"params": list(groups[name]), "name": name, "lr": cfg.group_lr.get(name, cfg.lr)}
                    for name in PARAM_GROUPS if groups.get(name)]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def drop_inactive_gradients(optimizer: torch.optim.Optimizer, phase: str) -> None:
    """Set ``grad = None`` on every group that does not train in ``phase``."""
    active = ACTIVE_GROUPS[phase]
    for group in optimizer.param_groups:
        if group["name"] not in active:
            for p in group["params"]:
                p.grad = None


def reset_moments(optimizer: torch.optim.Optimizer, names: Iterable[str]) -> None:
    """Forget the Adam state (moments, step) of the named groups, e.g. when their phase starts again."""
    wanted = set(names)
    for group in optimizer.param_groups:
        if group["name"] in wanted:
            for p in group["params"]:
                optimizer.state.pop(p, None)


def clip_group_norms(optimizer: torch.optim.Optimizer, max_norms: dict[str, float]) -> dict[str, float]:
    """Clip the gradient norm of each group separately; return the norm of every group before clipping.

    Groups whose gradients were dropped report no norm. A max norm of 0 means no clipping.
    """
    norms: dict[str, float] = {}
    for group in optimizer.param_groups:
        grads = [p for p in group["params"] if p.grad is not None]
        if not grads:
            continue
        limit = float(max_norms.get(group["name"], 0.0))
        if limit > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, limit)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
        norms[group["name"]] = float(norm)
    return norms

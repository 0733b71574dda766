"""Small collective helpers that work the same inside and outside a process group."""

from __future__ import annotations

from typing import Any

import torch


def this_rank() -> int:
    """The global rank in the default process group, 0 outside one."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_from_ranks(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; a one-element list outside a process group.

    A collective: every rank of the group must call it at the same point.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

"""DDP gradient all-reduce of the active phase's groups only (a DDP communication hook).

Every trainable tensor stays a DDP parameter for the whole run (docs/DESIGN.md decision 2), so DDP's
default hook all-reduces both LoRA families every step, although a phase drops the gradients of
the groups it does not train (``optim.mask_mode=drop_grad``). That is half the traffic wasted: at
SD 2.1 size 32.6 MB of fp32 gradients per step, of which 16.4 MB (consistency: C-LoRA, CFR,
conv_in) or 16.3 MB (detail: D-LoRA, conv_in) are used. :func:`active_allreduce_hook` packs the
active tensors of each bucket into one flat tensor, all-reduces its mean (optionally in bf16,
halving the bytes again) and writes the result back; inactive gradients stay rank-local and are
dropped before the step, as before. The arithmetic of the active gradients is the same as DDP's
default (divide by the world size, sum), so training results are unchanged bit for bit in fp32.

Only valid with ``drop_grad`` masking: under ``zero_lr`` the inactive groups' Adam moments would see
unsynchronised gradients and the ranks' optimizer states would drift apart (refused by the config).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from dlightning.contracts.phases import ACTIVE_GROUPS
from dlightning.training.config import OptimConfig, TrainerConfig, resolve_grad_sync

COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_grad_sync(trainer: TrainerConfig, optim: OptimConfig) -> PhaseGradSync | None:
    """The DDP hook state the config asks for, or None for DDP's default fp32 all-reduce of everything."""
    mode = resolve_grad_sync(trainer, optim)
    if mode == "all" and trainer.grad_sync_dtype == "fp32":
        return None
    return PhaseGradSync(trainer.grad_sync_dtype, phase_aware=mode == "active")


class HookedDDPStrategy(DDPStrategy):
    """DDPStrategy that registers its communication hook on CPU (gloo) as well.

    Lightning registers DDP communication hooks on CUDA only (a limit of PyTorch 1.8 that no longer
    holds), which would leave CPU runs, and so the test suite, on a different code path.
    """

    def _register_ddp_hooks(self) -> None:
        if self.root_device.type == "cuda" or self._ddp_comm_hook is None:
            super()._register_ddp_hooks()
            return
        model: Any = self.model
        model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)


class PhaseGradSync:
    """State of :func:`active_allreduce_hook`: which parameters the current phase trains.

    Args:
        comm_dtype: ``fp32`` (exact) or ``bf16`` (half the bytes; every rank gets the same rounded mean).
        phase_aware: False to all-reduce every gradient (only the dtype changes); :meth:`bind` and
            :meth:`set_phase` then do nothing.

    Until :meth:`bind` is called the hook all-reduces whole buckets, like DDP's default.
    """

    def __init__(self, comm_dtype: str = "fp32", *, phase_aware: bool = True) -> None:
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype must be one of {sorted(COMM_DTYPES)}, got {comm_dtype!r}")
        self.dtype = COMM_DTYPES[comm_dtype]
        self.phase_aware = phase_aware
        self.bytes_reduced = 0
        """Bytes handed to all-reduce since construction (for benchmarks and tests)."""
        self._ids_by_phase: dict[str, frozenset[int]] = {}
        self._active: frozenset[int] | None = None

    def bind(self, groups: dict[str, Iterable[torch.nn.Parameter]]) -> None:
        """Learn which parameters each phase trains from the optimizer's named groups."""
        if not self.phase_aware:
            return
        ids = {name: {id(p) for p in params} for name, params in groups.items()}
        self._ids_by_phase = {
            phase: frozenset().union(*(ids.get(name, set()) for name in names))
            for phase, names in ACTIVE_GROUPS.items()
        }

    def set_phase(self, phase: str) -> None:
        """Synchronise only ``phase``'s parameters from the next backward on."""
        if not self.phase_aware:
            return
        if not self._ids_by_phase:
            raise RuntimeError("PhaseGradSync.set_phase called before bind()")
        self._active = self._ids_by_phase[phase]

    def is_active(self, param: torch.nn.Parameter) -> bool:
        """Whether ``param``'s gradient is all-reduced in the current phase (all, before a phase is set)."""
        return self._active is None or id(param) in self._active


def active_allreduce_hook(state, bucket):  # no annotations: DDP inspects the hook's signature
    """All-reduce the mean of the bucket's active gradients; leave the others untouched.

    The bucket buffer holds the gradients back to back in ``bucket.parameters()`` order; the future
    returns that buffer with the active slices replaced by their cross-rank mean, and DDP copies it
    into the ``.grad`` tensors.
    """
    buffer = bucket.buffer()
    slices, offset = [], 0
    for param in bucket.parameters():
        if state.is_active(param):
            slices.append((offset, param.numel()))
        offset += param.numel()
    if offset != buffer.numel():
        raise RuntimeError(f"DDP bucket holds {buffer.numel()} elements, its parameters {offset}; "
                           "set trainer.grad_sync=all")
    if not slices:
        done = torch.futures.Future()
        done.set_result(buffer)
        return done
    flat = torch.cat([buffer[start:start + n] for start, n in slices]).to(state.dtype)
    flat.div_(dist.get_world_size())
    state.bytes_reduced += flat.numel() * flat.element_size()
    future = dist.all_reduce(flat, async_op=True).get_future()

    def unpack(fut):
        reduced = fut.value()[0]
        position = 0
        for start, n in slices:
            buffer[start:start + n].copy_(reduced[position:position + n])
            position += n
        return buffer

    return future.then(unpack)

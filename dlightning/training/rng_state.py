"""Per-rank random state: what a checkpoint keeps so a resumed run draws what an uninterrupted one would.

Each rank has its own streams: the global torch, numpy and python RNGs (plus the CUDA RNG of its own
GPU), and a private :class:`torch.Generator` for the CSD timesteps and noise, seeded from the run's
seed and the rank. :class:`RankRNG` owns the private generator and captures / restores all of them;
:func:`dlightning.utils.distributed.gather_from_ranks` collects every rank's capture, so a checkpoint
continues each rank's stream, not rank 0's. Everything captured is plain types and tensors
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from dlightning.utils.logging import get_logger

log = get_logger(__name__)

_RANK_STRIDE = 1000
"""Seed of rank r's private generator: ``seed * 1000 + r``."""


def global_rng_state(device: torch.device) -> dict[str, Any]:
    """The torch, numpy and python RNG states, and the CUDA one of ``device`` when it is a GPU."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if device.type == "cuda":
        # this rank's GPU only: get_rng_state_all() would open a context on every visible GPU
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_global_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`global_rng_state` captured (the CUDA part only onto a GPU ``device``)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _numpy_state() -> dict[str, Any]:
    # numpy's tuple holds a uint32 array, which weights_only loading refuses: keep it as an int64 tensor
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def state_of_rank(block: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's capture from a checkpoint block holding ``rng_per_rank`` (and rank 0's at the top).

    A checkpoint written by a run with another number of ranks gives every rank rank 0's streams.
    """
    per_rank = block.get("rng_per_rank") or []
    if len(per_rank) == world_size:
        return per_rank[rank]
    if world_size > 1:
        log.warning("checkpoint holds RNG states of %d ranks, this run has %d: every rank continues "
                    "rank 0's random stream", len(per_rank), world_size)
    return block


class RankRNG:
    """This rank's private generator (CSD draws) and the capture / restore of all its random streams.

    Args:
        seed: The run's seed (``trainer.seed``); rank r's generator starts from ``seed * 1000 + r``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None
        """A restored generator state, applied when the generator is next created."""

    def generator(self, device: torch.device, rank: int) -> torch.Generator:
        """The private generator on ``device``, created (seeded, or from a restored state) on first use."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed * _RANK_STRIDE + rank)
            if self._pending is not None:
                self._generator.set_state(self._pending.to("cpu"))
                self._pending = None
        return self._generator

    def state(self, device: torch.device, generator_device: torch.device, rank: int) -> dict[str, Any]:
        """``{"rng": global streams (CUDA of ``device``), "module_rng": the private generator's state}``."""
        return {"rng": global_rng_state(device),
                "module_rng": self.generator(generator_device, rank).get_state()}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore a :meth:`state` capture; ``device`` is the strategy's (the module may not be there yet)."""
        set_global_rng_state(state["rng"], device)
        self._generator = None
        self._pending = state["module_rng"]

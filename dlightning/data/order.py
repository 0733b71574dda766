"""The global sample order of the indexed loader (docs/DATA.md 2.3 and 2.6).

Three pure functions of the data seed define every sample a run reads:

* **Source of a micro-batch.** Micro-batch m draws all its clips, on every rank, from the source that a
  uniform number u(seed, m) picks by the weights of ``phase_fn(m)`` (:class:`SourcePlan`).
* **Stream position.** Each source has one global stream of positions 0, 1, 2, ... consumed in
  global-batch units: micro-batch m takes positions ``P_s(m) .. P_s(m) + G - 1`` of its source s, where
  ``G = world_size x batch_size`` and ``P_s(m) = G x (micro-batches before m that drew from s)``. Rank r
  takes ``P_s(m) + r*B .. + B - 1``. A resume with another G continues at the same positions
  (:class:`OrderOrigin`).
* **Sample of a position.** Position p of a source with N slots is slot
  ``permutation(seed, source, epoch = p // N)[p % N]`` (:class:`EpochOrder`): a fresh permutation per
  epoch of that source.

Nothing here depends on workers, on how often the run was resumed, or on state other than the
micro-batch index, so the data module's ``micro_batch`` stays the one position a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dlightning.contracts.phases import PHASES, PhaseFn
from dlightning.data.config import DataConfig
from dlightning.data.transforms import derive_seed
from dlightning.errors import ConfigError

# Purpose tags keep the seeds of different random decisions independent (loader.py uses 1-3 and 9, synthetic 4).
TAG_SOURCE, TAG_PERMUTATION, TAG_CLIP, TAG_DEGRADE = 5, 6, 7, 8
CHUNK = 1024
"""Micro-batches whose source draws come from one generator (one seed per chunk: cheap to compute ahead)."""


def phase_weights(cfg: DataConfig, phase: str) -> np.ndarray:
    """The sources' mixing weights of ``phase`` as an array."""
    return np.array([s.weight_consistency if phase == "consistency" else s.weight_detail for s in cfg.sources],
                    dtype=np.float64)


class SourcePlan:
    """Which source each micro-batch draws from, and how many earlier micro-batches drew from each.

    Computed ahead in chunks of :data:`CHUNK` micro-batches and kept (2 bytes per micro-batch), so the
    count before micro-batch m costs one look-up after the first call.

    Args:
        cfg: The data section (sources, their weights and the seed).
        phase_fn: Micro-batch index -> phase.
    """

    def __init__(self, cfg: DataConfig, phase_fn: PhaseFn) -> None:
        self.seed, self.phase_fn = cfg.seed, phase_fn
        self.num_sources = len(cfg.sources)
        self._cdf = {phase: _cdf(phase_weights(cfg, phase)) for phase in PHASES}
        self._chunks: list[np.ndarray] = []
        """Source of every micro-batch, one array per chunk."""
        self._counts: list[np.ndarray] = [np.zeros(self.num_sources, dtype=np.int64)]
        """Entry k: micro-batches before chunk k that drew from each source."""

    def source(self, micro_batch: int) -> int:
        """Source index micro-batch ``micro_batch`` draws from."""
        chunk, offset = divmod(int(micro_batch), CHUNK)
        self._extend(chunk)
        return int(self._chunks[chunk][offset])

    def counts_before(self, micro_batch: int) -> np.ndarray:
        """Per source, how many micro-batches before ``micro_batch`` drew from it (int64 array)."""
        chunk, offset = divmod(int(micro_batch), CHUNK)
        self._extend(chunk)
        return self._counts[chunk] + np.bincount(self._chunks[chunk][:offset], minlength=self.num_sources)

    def _extend(self, chunk: int) -> None:
        while len(self._chunks) <= chunk:
            choices = self._draw_chunk(len(self._chunks))
            self._chunks.append(choices)
            self._counts.append(self._counts[-1] + np.bincount(choices, minlength=self.num_sources))

    def _draw_chunk(self, chunk: int) -> np.ndarray:
        first = chunk * CHUNK
        uniform = np.random.default_rng(derive_seed(self.seed, TAG_SOURCE, chunk)).random(CHUNK)
        choices = np.empty(CHUNK, dtype=np.int16)
        for i, u in enumerate(uniform):
            phase = checked_phase(self.phase_fn, first + i)
            cdf = self._cdf[phase]
            if cdf is None:
                raise ConfigError(f"micro-batch {first + i} is in phase {phase!r} but no data.sources[] entry "
                                  f"has weight_{phase} > 0; give the source that feeds it a positive weight")
            choices[i] = min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)
        return choices


def _cdf(weights: np.ndarray) -> np.ndarray | None:
    """Cumulative weights normalised to end at 1 (None when every weight is 0); the last positive
    source ends the array so rounding can never pick a zero-weight source after it."""
    if weights.sum() <= 0:
        return None
    last = int(np.flatnonzero(weights > 0)[-1])
    cdf = np.cumsum(weights[:last + 1]) / weights.sum()
    cdf[-1] = 1.0
    return cdf


def checked_phase(phase_fn: PhaseFn, micro_batch: int) -> str:
    """``phase_fn(micro_batch)``, or ValueError when it is not a known phase."""
    phase = phase_fn(micro_batch)
    if phase not in PHASES:
        raise ValueError(f"phase_fn({micro_batch}) returned {phase!r}; expected one of {PHASES}")
    return phase


@dataclass(frozen=True)
class OrderOrigin:
    """Where the current global batch took over the order: a micro-batch and each source's position there.

    A run that never changed its global batch has the origin (0, zeros): positions are a function of the
    micro-batch alone. A resume with another global batch moves the origin to the resumed micro-batch.
    """

    micro_batch: int = 0
    positions: tuple[int, ...] = ()
    """Per source; empty means all zero."""

    def positions_at(self, plan: SourcePlan, global_batch: int, micro_batch: int) -> np.ndarray:
        """Each source's stream position at ``micro_batch`` (its next unread position)."""
        if micro_batch < self.micro_batch:
            raise ValueError(f"micro-batch {micro_batch} lies before the order's origin {self.micro_batch}")
        base = np.asarray(self.positions or [0] * plan.num_sources, dtype=np.int64)
        consumed = plan.counts_before(micro_batch) - plan.counts_before(self.micro_batch)
        return base + consumed * int(global_batch)

    def rebased(self, plan: SourcePlan, old_global_batch: int, micro_batch: int) -> OrderOrigin:
        """The origin that continues this order at ``micro_batch`` with any new global batch."""
        return OrderOrigin(micro_batch, tuple(int(p) for p in self.positions_at(plan, old_global_batch,
                                                                               micro_batch)))


class EpochOrder:
    """Slot of each stream position: ``permutation(seed, source, p // N)[p % N]`` for N slots.

    Args:
        seed: The data seed.
        sizes: Slots per source.
    """

    def __init__(self, seed: int, sizes: Sequence[int]) -> None:
        self.seed, self.sizes = seed, [int(n) for n in sizes]
        self._cache: dict[int, tuple[int, np.ndarray]] = {}
        """Per source, the last permutation used (a source is read one epoch at a time)."""

    def epoch_of(self, source: int, position: int) -> int:
        """Epoch of the source that position ``position`` falls in."""
        return int(position) // self.sizes[source]

    def slot(self, source: int, position: int) -> int:
        """Slot read at ``position`` of ``source``'s stream."""
        n = self.sizes[source]
        epoch, index = divmod(int(position), n)
        cached = self._cache.get(source)
        if cached is None or cached[0] != epoch:
            cached = (epoch, permutation(self.seed, source, epoch, n))
            self._cache[source] = cached
        return int(cached[1][index])


def permutation(seed: int, source: int, epoch: int, size: int) -> np.ndarray:
    """The order of the slots of ``source`` in ``epoch``: a pure function of its arguments."""
    return np.random.default_rng(derive_seed(seed, TAG_PERMUTATION, source, epoch)).permutation(size)

"""``data.access: indexed``: micro-batch m of one rank from the global sample order (docs/DATA.md 2.3).

Micro-batch m reads, from its source s (``SourcePlan``), the stream positions
``P_s(m) + rank*B + j`` (j < B) of the global order (``dlightning.data.order``); each position names a
slot of the source's tar index (``dlightning.data.tar_index``). A slot that cannot be used (a fault
slot, a sample missing fields, an undecodable or mismatched frame) is counted and replaced by the
next position's slot, then the next, until one decodes: the substitute is a function of the position,
so the batch still is. Window, crop and flips of position p use a generator seeded by
(data seed, source, p); an online-LQ source draws its degradation parameters from a seed of
(data seed, source, epoch, slot of p) (docs/DATA.md 1.8). A batch is therefore a function of
(seed, m, rank, global batch, order origin) and the shard sets, whichever worker builds it and however
often the run was resumed.
"""

from __future__ import annotations

import numpy as np

from dlightning.data.config import DataConfig
from dlightning.data.loader import SkipCounter, prepare_clip, validated_sample
from dlightning.data.online import source_recipes
from dlightning.data.order import TAG_CLIP, TAG_DEGRADE, EpochOrder, OrderOrigin, SourcePlan
from dlightning.data.tar_index import SourceIndex
from dlightning.data.transforms import SampleError, collate_clips, derive_seed
from dlightning.degradation.presets import DegradationPreset


class IndexedBatchBuilder:
    """Builds micro-batch m of one rank from the global order (see the module docstring).

    Args:
        cfg: Data section.
        indexes: One :class:`SourceIndex` per ``cfg.sources`` entry.
        plan: The sources of the micro-batches.
        origin: Where the current global batch took over the order.
        rank: This rank.
        world_size: Number of ranks.
        recipes: Per source, its online-LQ recipe or None (``source_recipes``; read from the config if None).
    """

    def __init__(self, cfg: DataConfig, indexes: list[SourceIndex], *, plan: SourcePlan, origin: OrderOrigin,
                 rank: int, world_size: int, recipes: list[DegradationPreset | None] | None = None) -> None:
        self.cfg, self.indexes, self.plan, self.origin = cfg, indexes, plan, origin
        self.recipes = recipes if recipes is not None else source_recipes(cfg)
        self.rank, self.global_batch = rank, world_size * cfg.batch_size
        self.order = EpochOrder(cfg.seed, [len(index) for index in indexes])
        self.counter = SkipCounter(cfg.max_consecutive_skips)

    def first_position(self, micro_batch: int) -> tuple[int, int]:
        """``(source, position of this rank's first clip)`` of micro-batch ``micro_batch``."""
        source = self.plan.source(micro_batch)
        start = self.origin.positions_at(self.plan, self.global_batch, micro_batch)[source]
        return source, int(start) + self.rank * self.cfg.batch_size

    def build(self, micro_batch: int, epoch: int = 0) -> dict:
        """Batch dict of micro-batch ``micro_batch`` (``epoch``, the loop's, plays no part)."""
        source, first = self.first_position(micro_batch)
        self.counter.context = f"from data.sources.{source}.path={self.cfg.sources[source].path!r}"
        clips = [self._clip(source, first + j) for j in range(self.cfg.batch_size)]
        return collate_clips(clips, micro_batch=micro_batch, skipped=self.counter.pop())

    def _clip(self, source: int, position: int) -> dict:
        """The clip of ``position``: its slot's sample, or the first usable one after it."""
        index, recipe = self.indexes[source], self.recipes[source]
        # the position's own epoch and slot: a substitute (below) still gets this position's draw
        online = None
        if recipe is not None:
            epoch, slot = self.order.epoch_of(source, position), self.order.slot(source, position)
            online = (recipe, derive_seed(self.cfg.seed, TAG_DEGRADE, source, epoch, slot))
        candidate = position
        while True:
            slot = self.order.slot(source, candidate)
            # a fresh generator per try: the clip depends on the position and the sample used, not on
            # how many draws a failed try made
            rng = np.random.default_rng(derive_seed(self.cfg.seed, TAG_CLIP, source, position))
            try:
                sample = validated_sample(index.read(slot), self.cfg.frames, lq=recipe is None)
                clip = prepare_clip(sample, self.cfg, rng, online)
            except SampleError as err:
                self.counter.add(err.reason, f"{index.describe(slot)}: {err}")
                candidate += 1
                continue
            self.counter.ok()
            return clip

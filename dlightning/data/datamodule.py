"""LightningDataModule around the training loader: rank wiring, resume position, skip counts.

Resume contract: the LightningModule calls ``set_position(micro_batch)`` with the index of the next
micro-batch it will consume before a checkpoint is written; Lightning stores ``state_dict()`` in the
checkpoint and calls ``load_state_dict()`` on restore, before ``train_dataloader()``. The loader then
starts at that micro-batch, so phases stay aligned with the optimizer step.

With the indexed access (default) every batch is a function of its micro-batch index, the rank and
the global batch (``dlightning.data.order``), so ``micro_batch`` is the whole position and a resume
continues the order bit for bit at any ``num_workers``. The checkpoint also records the global batch
and the order's origin: a resume with another world size or batch size rebases the origin at the
resumed micro-batch, so the same global order continues from the same position (docs/DATA.md 2.6).
``resume_count`` grows by one per restore; only the stream access folds it into its stream seeds (a
resumed stream draws fresh data, docs/DATA.md 0.4). The synthetic backend resumes bit for bit.

Online LQ (docs/DATA.md 1.8): a batch from a source with ``lq=online`` carries its clips' degradation
parameters instead of ``lq``; ``on_after_batch_transfer`` degrades the HR clips on the training device
and sets ``batch["lq"]`` before the LightningModule sees the batch.

Skip counts: every batch carries ``batch["skipped"]`` (counts since the worker's previous batch);
``on_before_batch_transfer`` pops it in the main process and adds it to ``skip_counts()``. Lightning
prefers this datamodule hook over a LightningModule hook of the same name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from dlightning.contracts.phases import PHASES, PhaseFn
from dlightning.data.config import DataConfig
from dlightning.data.loader import build_train_dataloader, check_phase_weights, index_shard_sets, load_shard_urls
from dlightning.data.online import apply_online_degradation, source_recipes
from dlightning.data.order import OrderOrigin, SourcePlan
from dlightning.data.tar_index import SourceIndex
from dlightning.degradation.presets import DegradationPreset
from dlightning.utils.distributed import gather_from_ranks, this_rank
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


class VSRDataModule(L.LightningDataModule):
    """Training data of dlightning (shards or synthetic), one loader per rank.

    Args:
        cfg: The ``data`` config section.
        phase_fn: Micro-batch index -> phase; the composition root builds it from the schedule
            (``dlightning.training.schedule.SchedulePhase``), so the data layer never reads the schedule.
        phases: Phases that occur (default: ``phase_fn.phases`` if it has them, else both).
        rank: Overrides the rank read from the trainer in ``setup`` (tests, tools).
        world_size: Overrides the world size read from the trainer.
    """

    def __init__(self, cfg: DataConfig, *, phase_fn: PhaseFn, phases: Sequence[str] | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.cfg, self.phase_fn = cfg, phase_fn
        self.phases = tuple(phases or getattr(phase_fn, "phases", PHASES))
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.resume_count = 0, 0
        self._skips: Counter[str] = Counter()
        self._shard_urls: list[list[str]] | None = None
        self._indexes: list[SourceIndex] | None = None
        self._recipes: list[DegradationPreset | None] | None = None
        self._checked_world_size: int | None = None
        self._plan: SourcePlan | None = None
        self._stored_order: dict[str, Any] | None = None
        """The checkpoint's order record (None: a fresh run); resolved for this global batch on use."""
        self._origin: tuple[int, OrderOrigin] | None = None
        """(global batch, origin) once resolved."""
        self._resumed_at = 0
        """The checkpoint's micro-batch: where a changed global batch takes over the order."""

    @property
    def indexed(self) -> bool:
        """Whether batches come from the global sample order (shards backend, indexed access)."""
        return self.cfg.backend == "shards" and self.cfg.access == "indexed"

    def check_sources(self, world_size: int) -> None:
        """Check the phase weights, find every shard and index it now, so bad data fails before the model
        is built."""
        check_phase_weights(self.cfg, self.phases)
        if self.cfg.backend == "shards":
            self._shard_urls = load_shard_urls(self.cfg, world_size=world_size)
            self._recipes = source_recipes(self.cfg)
            if self.indexed:
                self._indexes = index_shard_sets(self.cfg, self._shard_urls)
        self._checked_world_size = world_size

    def setup(self, stage: str) -> None:
        """Read rank and world size from the trainer, then check the sources unless :meth:`check_sources`
        already did for this world size."""
        if self.trainer is not None:
            self.rank = self.trainer.global_rank if self.rank is None else self.rank
            self.world_size = self.trainer.world_size if self.world_size is None else self.world_size
        if stage == "fit" and self._checked_world_size != (self.world_size or 1):
            self.check_sources(self.world_size or 1)

    def train_dataloader(self) -> DataLoader:
        """The rank's loader, starting at the resumed micro-batch."""
        if self.indexed and self._indexes is None:
            self.check_sources(self.world_size or 1)
        order = {"plan": self._source_plan(), "origin": self.order_origin()} if self.indexed else {}
        return build_train_dataloader(self.cfg, rank=self.rank or 0, world_size=self.world_size or 1,
                                      phase_fn=self.phase_fn, phases=self.phases,
                                      start_micro_batch=self.micro_batch, resume_count=self.resume_count,
                                      shard_urls=self._shard_urls, indexes=self._indexes, recipes=self._recipes,
                                      **order)

    @property
    def global_batch(self) -> int:
        """Clips per micro-batch over all ranks: world size x ``data.batch_size``."""
        return (self.world_size or 1) * self.cfg.batch_size

    def _source_plan(self) -> SourcePlan:
        if self._plan is None:
            self._plan = SourcePlan(self.cfg, self.phase_fn)
        return self._plan

    def order_origin(self) -> OrderOrigin:
        """Where the current global batch took over the order: the checkpoint's origin, rebased at the
        resumed micro-batch when the global batch changed (world size or ``data.batch_size``)."""
        if self._origin is None or self._origin[0] != self.global_batch:
            self._origin = (self.global_batch, self._resolve_origin())
        return self._origin[1]

    def _resolve_origin(self) -> OrderOrigin:
        stored = self._stored_order
        if stored is None:
            return OrderOrigin()  # a fresh run, or a checkpoint written before the order existed
        origin = OrderOrigin(int(stored["origin_micro_batch"]), tuple(int(p) for p in stored["origin_positions"]))
        if len(origin.positions) != len(self.cfg.sources):
            log.warning("data: the checkpoint's order has %d sources, data.sources has %d: the order restarts "
                        "as if this run had always read these sources", len(origin.positions), len(self.cfg.sources))
            return OrderOrigin()
        slots = self._slots()
        if slots is not None and stored.get("slots") not in (None, slots):
            log.warning("data: the shard sets changed since the checkpoint (slots per source %s -> %s): the "
                        "positions continue, but in a different order", stored["slots"], slots)
        old_batch = int(stored["global_batch"])
        if old_batch == self.global_batch:
            return origin
        log.info("data: global batch %d -> %d; the sample order continues at micro-batch %d from the same "
                 "positions", old_batch, self.global_batch, self._resumed_at)
        return origin.rebased(self._source_plan(), old_batch, self._resumed_at)

    def _slots(self) -> list[int] | None:
        return [len(index) for index in self._indexes] if self._indexes is not None else None

    def _order_state(self) -> dict[str, Any]:
        origin = self.order_origin()
        return {"global_batch": self.global_batch, "origin_micro_batch": origin.micro_batch,
                "origin_positions": list(origin.positions) or [0] * len(self.cfg.sources), "slots": self._slots()}

    def set_position(self, micro_batch: int) -> None:
        """Record the index of the next micro-batch to consume (call before saving a checkpoint)."""
        self.micro_batch = int(micro_batch)

    def state_dict(self) -> dict[str, Any]:
        """``{"micro_batch", "resume_count", "skips_per_rank"}`` for the checkpoint, plus ``"order"``
        (global batch, order origin, slots per source) with the indexed access.

        Runs on every rank (only rank 0 writes the file), so the skip counts of all ranks are gathered
        here and each rank continues its own after a resume.
        """
        state = {"micro_batch": self.micro_batch, "resume_count": self.resume_count,
                 "skips_per_rank": gather_from_ranks(dict(self._skips))}
        if self.indexed:
            state["order"] = self._order_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position, the order record and this rank's skip counts; counts one more resume."""
        self.micro_batch = int(state_dict["micro_batch"])
        self.resume_count = int(state_dict["resume_count"]) + 1
        self._stored_order, self._origin = state_dict.get("order"), None
        self._resumed_at = self.micro_batch
        per_rank = state_dict.get("skips_per_rank") or []
        rank = self.rank if self.rank is not None else this_rank()
        self._skips = Counter(per_rank[rank] if rank < len(per_rank) else {})

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Pop ``batch["skipped"]`` into the running totals (main process)."""
        if isinstance(batch, dict) and "skipped" in batch:
            self.record_skips(batch.pop("skipped"))
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Make the LQ of an online-LQ batch on the device the batch now lives on (docs/DATA.md 1.8)."""
        return apply_online_degradation(batch, scale=self.cfg.scale, codec=self.cfg.online_codec)

    def record_skips(self, skipped: dict[str, int]) -> None:
        """Add one batch's skip counts to the totals."""
        self._skips.update(skipped)

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples/shards per reason on this rank since the datamodule was built."""
        return dict(self._skips)

"""LightningDataModule around the training loader: rank wiring, resume position, skip counts.

Resume contract: the LightningModule calls ``set_position(micro_batch)`` with the index of the next
micro-batch it will consume before a checkpoint is written; Lightning stores ``state_dict()`` in the
checkpoint and calls ``load_state_dict()`` on restore, before ``train_dataloader()``. The loader then
starts at that micro-batch, so phases stay aligned with the optimizer step. ``resume_count`` grows by
one per restore and is folded into the shard stream seeds: a resumed WebDataset run draws a fresh
stream instead of replaying the start of the first epoch (WebDataset offers no exact mid-epoch
resume, docs/DATA.md 0.4). The synthetic backend ignores it and resumes bit for bit.

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
from dlightning.data.loader import build_train_dataloader, check_phase_weights, load_shard_urls
from dlightning.utils.distributed import gather_from_ranks, this_rank


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
        self._checked_world_size: int | None = None

    def check_sources(self, world_size: int) -> None:
        """Check the phase weights and find every shard now, so bad data fails before the model is built."""
        check_phase_weights(self.cfg, self.phases)
        if self.cfg.backend == "shards":
            self._shard_urls = load_shard_urls(self.cfg, world_size=world_size)
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
        return build_train_dataloader(self.cfg, rank=self.rank or 0, world_size=self.world_size or 1,
                                      phase_fn=self.phase_fn, phases=self.phases,
                                      start_micro_batch=self.micro_batch, resume_count=self.resume_count,
                                      shard_urls=self._shard_urls)

    def set_position(self, micro_batch: int) -> None:
        """Record the index of the next micro-batch to consume (call before saving a checkpoint)."""
        self.micro_batch = int(micro_batch)

    def state_dict(self) -> dict[str, Any]:
        """``{"micro_batch", "resume_count", "skips_per_rank"}`` for the checkpoint.

        Runs on every rank (only rank 0 writes the file), so the skip counts of all ranks are gathered
        here and each rank continues its own after a resume.
        """
        return {"micro_batch": self.micro_batch, "resume_count": self.resume_count,
                "skips_per_rank": gather_from_ranks(dict(self._skips))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position and this rank's skip counts; counts one more resume (fresh shard streams)."""
        self.micro_batch = int(state_dict["micro_batch"])
        self.resume_count = int(state_dict["resume_count"]) + 1
        per_rank = state_dict.get("skips_per_rank") or []
        rank = self.rank if self.rank is not None else this_rank()
        self._skips = Counter(per_rank[rank] if rank < len(per_rank) else {})

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Pop ``batch["skipped"]`` into the running totals (main process)."""
        if isinstance(batch, dict) and "skipped" in batch:
            self.record_skips(batch.pop("skipped"))
        return batch

    def record_skips(self, skipped: dict[str, int]) -> None:
        """Add one batch's skip counts to the totals."""
        self._skips.update(skipped)

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples/shards per reason on this rank since the datamodule was built."""
        return dict(self._skips)

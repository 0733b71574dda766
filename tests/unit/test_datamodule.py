"""VSRDataModule: resume position, bit-exact synthetic resume, the indexed order across world-size changes,
skip aggregation, schedule phases."""

from __future__ import annotations

import lightning as L
import torch
from helpers.shard_sets import write_faulty_set, write_good_set

from dlightning.data.config import DataConfig, SourceConfig
from dlightning.data.datamodule import VSRDataModule
from dlightning.training.config import ScheduleConfig, SegmentConfig
from dlightning.training.schedule import SchedulePhase


def synthetic_cfg(**overrides) -> DataConfig:
    base = dict(backend="synthetic", crop_size=32, batch_size=1, num_workers=0, batches_per_epoch=6, seed=11)
    base.update(overrides)
    return DataConfig(**base)


def consistency(m: int) -> str:
    return "consistency"


def test_state_dict_round_trip_counts_resumes_and_restarts_at_position():
    dm = VSRDataModule(synthetic_cfg(), phase_fn=consistency)
    dm.set_position(7)
    dm.record_skips({"decode_error": 2})
    state = dm.state_dict()
    assert state == {"micro_batch": 7, "resume_count": 0, "skips_per_rank": [{"decode_error": 2}]}
    resumed = VSRDataModule(synthetic_cfg(), phase_fn=consistency)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == {"micro_batch": 7, "resume_count": 1, "skips_per_rank": [{"decode_error": 2}]}
    assert resumed.skip_counts() == {"decode_error": 2}  # skip counts continue across the resume
    first = next(iter(resumed.train_dataloader()))
    assert first["micro_batch"] == 7


def test_synthetic_resume_is_bit_exact():
    full = list(VSRDataModule(synthetic_cfg(), phase_fn=consistency).train_dataloader())
    resumed = VSRDataModule(synthetic_cfg(), phase_fn=consistency)
    resumed.load_state_dict({"micro_batch": 3, "resume_count": 0})
    tail = list(resumed.train_dataloader())[:3]
    for a, b in zip(full[3:], tail, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["hr"], b["hr"]) and torch.equal(a["lq"], b["lq"])


def test_skip_counts_are_popped_and_aggregated(tmp_path):
    write_faulty_set(tmp_path / "video")
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "video"))], crop_size=32, batch_size=2,
                     num_workers=0, batches_per_epoch=10, shuffle_buffer=4, resampled=False)
    dm = VSRDataModule(cfg, phase_fn=consistency, phases=["consistency"])
    expected: dict[str, int] = {}
    for batch in dm.train_dataloader():
        for reason, n in batch["skipped"].items():
            expected[reason] = expected.get(reason, 0) + n
        out = dm.on_before_batch_transfer(batch, 0)
        assert "skipped" not in out and set(out) == {"hr", "lq", "caption", "key", "kind", "micro_batch"}
    assert dm.skip_counts() == expected and sum(expected.values()) > 0


def test_schedule_phase_follows_optimizer_steps():
    schedule = ScheduleConfig(segments=[SegmentConfig(phase="consistency", end=1),
                                        SegmentConfig(phase="detail", end=None)])
    phase = SchedulePhase(schedule, accumulate=2)
    # steps 0, 1 are consistency (end inclusive) = micro-batches 0..3; step 2 = micro-batches 4, 5
    assert [phase(m) for m in range(6)] == ["consistency"] * 4 + ["detail"] * 2
    assert phase.phases == ("consistency", "detail")
    dm = VSRDataModule(synthetic_cfg(), phase_fn=phase)
    assert [b["kind"][0] for b in dm.train_dataloader()] == ["video"] * 4 + ["image"] * 2


class _Consumer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["micro_batch"])
        assert "skipped" not in batch
        return self.layer(batch["hr"].mean().view(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_reads_rank_and_consumes_batches(tmp_path):
    dm = VSRDataModule(synthetic_cfg(batches_per_epoch=2), phase_fn=consistency)
    model = _Consumer()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert dm.rank == 0 and dm.world_size == 1
    assert model.seen == [0, 1, 2]  # micro-batch indices continue across epochs


def shard_cfg(path, **overrides) -> DataConfig:
    base = dict(sources=[SourceConfig(path=str(path), weight_consistency=1.0, weight_detail=1.0)], crop_size=32,
                batch_size=1, num_workers=0, batches_per_epoch=4, seed=3)
    base.update(overrides)
    return DataConfig(**base)


def _keys(dm: VSRDataModule, count: int) -> list[str]:
    batches = list(dm.train_dataloader())[:count]
    dm.set_position(batches[-1]["micro_batch"] + 1)
    return [k for b in batches for k in b["key"]]


def test_indexed_state_records_the_order_and_a_world_size_change_continues_it(tmp_path):
    """2 ranks x 1 clip for 3 micro-batches, then 1 rank x 1 clip: 12 clips, each exactly once."""
    clips = write_good_set(tmp_path / "video", name="v", kind="video", num_shards=4, per_shard=3, seed=4)
    seen, states = [], []
    for rank in (0, 1):
        dm = VSRDataModule(shard_cfg(tmp_path / "video"), phase_fn=consistency, rank=rank, world_size=2)
        seen += _keys(dm, 3)
        states.append(dm.state_dict())
    assert states[0]["order"] == {"global_batch": 2, "origin_micro_batch": 0, "origin_positions": [0],
                                  "slots": [12]}
    resumed = VSRDataModule(shard_cfg(tmp_path / "video", batches_per_epoch=6), phase_fn=consistency, rank=0,
                            world_size=1)
    resumed.load_state_dict(states[0])
    seen += _keys(resumed, 6)
    assert sorted(seen) == sorted(clips)
    assert resumed.state_dict()["order"] == {"global_batch": 1, "origin_micro_batch": 3, "origin_positions": [6],
                                             "slots": [12]}


def test_indexed_resume_with_the_same_global_batch_keeps_the_order(tmp_path):
    """1 rank x 2 clips resumed as 2 ranks x 1 clip reads the straight run's clips."""
    write_good_set(tmp_path / "video", name="v", kind="video", num_shards=4, per_shard=3, seed=4)
    straight = VSRDataModule(shard_cfg(tmp_path / "video", batch_size=2, batches_per_epoch=6), phase_fn=consistency)
    expected = [b["key"] for b in straight.train_dataloader()]
    first = VSRDataModule(shard_cfg(tmp_path / "video", batch_size=2), phase_fn=consistency)
    _keys(first, 2)
    state = first.state_dict()
    per_rank = []
    for rank in (0, 1):
        dm = VSRDataModule(shard_cfg(tmp_path / "video"), phase_fn=consistency, rank=rank, world_size=2)
        dm.load_state_dict(state)
        per_rank.append([b["key"] for b in dm.train_dataloader()])
    assert [a + b for a, b in zip(*per_rank, strict=True)] == expected[2:6]

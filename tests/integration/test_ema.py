"""EMA of the trainable tensors: phase-aware, resumed exactly, chosen by export and validation; TF32 switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.train_probe import DEMO_CONFIG, parameter_group_names, tiny_overrides
from lightning.pytorch import Callback

from dlightning import train
from dlightning.config import load_config
from dlightning.contracts.checkpoint_format import read_training_checkpoint, resolve_resume_checkpoint
from dlightning.contracts.phases import ACTIVE_GROUPS
from dlightning.errors import MissingWeightsError
from dlightning.models.restore import restore_generator
from dlightning.training.schedule import phase_at

EMA = ["optim.ema.enabled=true", "optim.ema.decay=0.5", "optim.ema.start_step=1"]


def _cfg(run_dir: Path, steps: int, *extra: str):
    # consistency steps 0-1, detail 2-3, consistency after
    return load_config([DEMO_CONFIG], tiny_overrides(run_dir, steps, c_end=1, d_end=3, extra=[*EMA, *extra]))


class _EMADump(Callback):
    """The EMA shadow after every optimizer step, with the phase of that step."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str, dict[str, torch.Tensor]]] = []
        self.groups: dict[str, str] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.at_step_boundary:
            step = pl_module.optimizer_step - 1
            self.groups = parameter_group_names(pl_module)
            self.records.append((step, phase_at(step, pl_module.schedule_cfg).phase,
                                 {k: v.clone() for k, v in pl_module.ema.shadow.items()}))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _EMADump]:
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    dump = _EMADump()
    train.fit(_cfg(run_dir, 6), fresh=True, callbacks=[dump])
    return run_dir, dump


def test_frozen_family_keeps_its_average(uninterrupted) -> None:
    _, dump = uninterrupted
    assert [phase for _, phase, _ in dump.records] == ["consistency"] * 2 + ["detail"] * 2 + ["consistency"] * 2
    for (_, _, before), (step, phase, after) in zip(dump.records, dump.records[1:], strict=False):
        moved = {dump.groups[k] for k in after if not torch.equal(after[k], before[k])}
        assert moved == set(ACTIVE_GROUPS[phase]), f"step {step} ({phase}): the average of {moved} moved"


def test_average_is_the_decayed_weights(uninterrupted) -> None:
    run_dir, dump = uninterrupted
    ckpt = read_training_checkpoint(resolve_resume_checkpoint(run_dir))
    final = dump.records[-1][2]
    assert set(ckpt.block["ema"]) == set(final)
    assert all(torch.equal(ckpt.block["ema"][k], final[k].cpu()) for k in final)
    assert any(not torch.equal(ckpt.block["ema"][k], ckpt.state_dict[k]) for k in final)  # not the raw weights


def test_resumed_average_equals_the_uninterrupted_one_bit_for_bit(uninterrupted, tmp_path: Path) -> None:
    run_dir, _ = uninterrupted
    resumed = tmp_path / "run"
    train.fit(_cfg(resumed, 3), fresh=True)
    train.fit(_cfg(resumed, 6))
    ours = read_training_checkpoint(resolve_resume_checkpoint(resumed)).block["ema"]
    ref = read_training_checkpoint(resolve_resume_checkpoint(run_dir)).block["ema"]
    assert ours.keys() == ref.keys()
    diff = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not diff, f"{len(diff)} averaged tensors differ after the resume, e.g. {diff[:3]}"


def test_restore_chooses_raw_or_averaged_weights(uninterrupted, tmp_path: Path) -> None:
    run_dir, _ = uninterrupted
    ckpt = read_training_checkpoint(resolve_resume_checkpoint(run_dir))
    gen = restore_generator(ckpt, weights="ema")
    params = dict(gen.named_parameters())
    for key, value in ckpt.generator_tensors("ema").items():
        assert torch.equal(params[key].detach(), value)
    plain = tmp_path / "plain"
    train.fit(load_config([DEMO_CONFIG], tiny_overrides(plain, 1, c_end=0, d_end=1)), fresh=True)
    with pytest.raises(MissingWeightsError, match="no EMA weights"):
        restore_generator(read_training_checkpoint(resolve_resume_checkpoint(plain)), weights="ema")


def test_tf32_switch(tmp_path: Path) -> None:
    try:
        train.fit(load_config([DEMO_CONFIG], tiny_overrides(tmp_path / "run", 1, c_end=0, d_end=1,
                                                            extra=["trainer.tf32=true"])), fresh=True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")

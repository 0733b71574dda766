"""Real DeepSpeed ZeRO-2 training on CPU (DeepSpeed's CPU accelerator, gloo), 2 processes, bf16-mixed.

Three runs of ``tests/helpers/train_probe.py`` through consistency -> detail -> consistency:

* ``deepspeed``: 6 steps under ZeRO-2, checkpoints (directories) after steps 3 and 6;
* ``ddp``: the same under DDP (same masking: lr 0 for inactive groups, no clipping);
* ``resumed``: ZeRO-2 again, resumed from a copy of the first run holding only the step-3 checkpoint.

With clipping off, ZeRO-2 and DDP do the same arithmetic (fp32 trainables and gradients, the same
all-reduce of two addends), so the trainable tensors must agree bit for bit at every step. The first
DeepSpeed start on a machine compiles DeepSpeed's shared-memory op (about 30 s, cached afterwards).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from helpers import train_probe

# Multi-process runs of minutes: in the `slow` group, which `.ci/run` runs by file after the default suite.
pytestmark = pytest.mark.slow

pytest.importorskip("deepspeed")

STEPS = 6
C_END, D_END = 1, 3
"""Consistency steps 0-1, detail steps 2-3, consistency steps 4-5."""
COMMON = ["trainer.devices=2", "optim.accumulate=1", "optim.mask_mode=zero_lr", "trainer.precision=bf16-mixed",
          "optim.clip_norm={c_lora: 0, cfr: 0, d_lora: 0, conv_in: 0}", "trainer.checkpoint_every=3"]


def _run(root: Path, strategy: str, *, resume: bool = False) -> None:
    overrides = train_probe.tiny_overrides(root / "run", STEPS, c_end=C_END, d_end=D_END,
                                           extra=[*COMMON, f"trainer.strategy={strategy}"])
    train_probe.run_probe(root / "dump", overrides, resume=resume)


def _load_dumps(root: Path, steps: range) -> dict[tuple[int, int], dict]:
    return train_probe.load_dumps(root / "dump", range(2), steps)


def _metrics(root: Path) -> list[dict[str, str]]:
    (path,) = (root / "run" / "logs").rglob("metrics.csv")
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("deepspeed")
    roots = {name: base / name for name in ("deepspeed", "ddp", "resumed")}
    _run(roots["deepspeed"], "deepspeed_stage_2")
    _run(roots["ddp"], "ddp")
    shutil.copytree(roots["deepspeed"] / "run", roots["resumed"] / "run")
    shutil.rmtree(roots["resumed"] / "run" / "checkpoints" / "step-00000006.ckpt")
    _run(roots["resumed"], "deepspeed_stage_2", resume=True)
    return roots


@pytest.fixture(scope="module")
def ds_dumps(runs) -> dict[tuple[int, int], dict]:
    return _load_dumps(runs["deepspeed"], range(STEPS + 1))


def test_zero2_equals_ddp_bit_for_bit(runs, ds_dumps):
    ddp = _load_dumps(runs["ddp"], range(STEPS + 1))
    for (rank, step), dump in ds_dumps.items():
        theirs = ddp[rank, step]["params"]
        assert dump["params"].keys() == theirs.keys()
        diff = [k for k in theirs if not torch.equal(dump["params"][k], theirs[k])]
        assert not diff, f"rank {rank} step {step}: {len(diff)} tensors differ from DDP, e.g. {diff[:3]}"
    ours, theirs = _metrics(runs["deepspeed"]), _metrics(runs["ddp"])
    assert [r["train/loss"] for r in ours] == [r["train/loss"] for r in theirs]
    assert [r["train/phase"] for r in ours] == ["0.0", "0.0", "1.0", "1.0", "0.0", "0.0"]


def test_ranks_identical_and_fp32(ds_dumps):
    for step in range(STEPS + 1):
        p0, p1 = ds_dumps[0, step]["params"], ds_dumps[1, step]["params"]
        assert all(torch.equal(p0[k], p1[k]) for k in p0), f"ranks differ at step {step}"
        assert {v.dtype for v in p0.values()} == {torch.float32}  # bf16-mixed: trainables stay fp32


@pytest.mark.parametrize(("start", "end", "frozen", "trained"), [
    (0, C_END + 1, ("d_lora",), ("c_lora", "cfr", "conv_in")),
    (C_END + 1, D_END + 1, ("c_lora", "cfr"), ("d_lora", "conv_in")),
    (D_END + 1, STEPS, ("d_lora",), ("c_lora", "cfr", "conv_in")),
])
def test_zero_lr_masking_holds_groups_still(ds_dumps, start, end, frozen, trained):
    groups = ds_dumps[0, 0]["groups"]
    before, after = ds_dumps[0, start]["params"], ds_dumps[0, end]["params"]
    for name in frozen:
        assert all(torch.equal(before[k], after[k]) for k, g in groups.items() if g == name), name
    for name in trained:
        moved = [not torch.equal(before[k], after[k]) for k, g in groups.items() if g == name]
        assert any(moved), f"{name} did not train in steps [{start}, {end})"


def test_global_grad_norm_logged(runs):
    norms = [float(r["train/grad_norm_global"]) for r in _metrics(runs["deepspeed"])]
    assert len(norms) == STEPS and all(n > 0 and n == n for n in norms)


def test_checkpoints_are_complete_directories(runs):
    from dlightning.contracts.checkpoint_format import (
        list_valid_checkpoints,
        read_checkpoint_payload,
        resolve_resume_checkpoint,
    )

    folder = runs["deepspeed"] / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003.ckpt", "step-00000006.ckpt"]
    assert all(p.is_dir() for p in folder.iterdir())  # no .tmp leftovers, no last.ckpt copy
    assert [s for _, s in list_valid_checkpoints(runs["deepspeed"] / "run")] == [3, 6]
    assert resolve_resume_checkpoint(runs["deepspeed"] / "run") == str(folder / "step-00000006.ckpt")
    block = read_checkpoint_payload(folder / "step-00000006.ckpt")["dlightning"]
    per_rank = block["rng_per_rank"]
    assert len(per_rank) == 2  # each rank's CSD noise stream, not rank 0's twice
    assert not torch.equal(per_rank[0]["module_rng"], per_rank[1]["module_rng"])


def test_resume_matches_uninterrupted_run(runs, ds_dumps):
    resumed = _load_dumps(runs["resumed"], range(3, STEPS + 1))
    assert resumed[0, 3]["optimizer_step"] == 3 and resumed[0, STEPS]["micro_step"] == STEPS
    for rank in (0, 1):
        for step in range(3, STEPS + 1):
            ours, ref = resumed[rank, step]["params"], ds_dumps[rank, step]["params"]
            diff = [k for k in ref if not torch.equal(ours[k], ref[k])]
            assert not diff, f"rank {rank} step {step}: resumed run differs, e.g. {diff[:3]}"
        assert resumed[rank, STEPS]["keys"] == ds_dumps[rank, STEPS]["keys"]


def test_export_reads_deepspeed_checkpoint(runs, ds_dumps, tmp_path):
    from dlightning.contracts.checkpoint_format import read_training_checkpoint
    from dlightning.export import export_checkpoint

    ckpt = runs["deepspeed"] / "run" / "checkpoints" / "step-00000006.ckpt"
    read = read_training_checkpoint(ckpt)
    state, config = read.state_dict, read.config
    final = ds_dumps[0, STEPS]["params"]
    assert set(final) <= set(state)
    assert all(torch.equal(state[k], final[k]) for k in final)
    assert config["trainer"]["strategy"] == "deepspeed_stage_2"
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert (out / "dlightning_export.json").is_file() and (out / "unet").is_dir()
    # the run folder stands for its newest valid checkpoint
    newest = read_training_checkpoint(runs["deepspeed"] / "run").state_dict
    assert all(torch.equal(newest[k], final[k]) for k in final)


@pytest.mark.parametrize("damage", ["no_latest", "missing_shard", "empty_shard", "no_block"])
def test_resolver_skips_incomplete_directories(runs, tmp_path, damage, caplog):
    from dlightning.contracts.checkpoint_format import resolve_resume_checkpoint

    src = runs["deepspeed"] / "run" / "checkpoints"
    folder = tmp_path / "run" / "checkpoints"
    shutil.copytree(src, folder)
    broken = folder / "step-00000006.ckpt"
    tag = broken / "checkpoint"
    if damage == "no_latest":
        (broken / "latest").unlink()
    elif damage == "missing_shard":
        (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif damage == "empty_shard":
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    else:
        states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
        del states["dlightning"]
        torch.save(states, tag / "mp_rank_00_model_states.pt")
    # a directory left by a crash mid-write keeps its .tmp name and is never a candidate
    shutil.copytree(src / "step-00000006.ckpt", folder / "step-00000009.ckpt.tmp")
    assert resolve_resume_checkpoint(tmp_path / "run") == str(folder / "step-00000003.ckpt")
    assert "step-00000006.ckpt" in caplog.text

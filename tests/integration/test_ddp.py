"""A real 2-process CPU DDP (gloo) run through consistency -> detail -> consistency with accumulation 2.

The helper script ``tests/helpers/train_probe.py`` is launched as a subprocess; Lightning's DDP launcher
re-executes it for rank 1. Each rank dumps its trainable tensors at every optimizer-step boundary.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import train_probe

# ~30-50 s on two shared cores: two interpreters import torch/diffusers and build the model.
from helpers.paths import HELPERS

HELPER = HELPERS / "train_probe.py"
STEPS = 6
C_END, D_END = 1, 3
"""Consistency steps 0-1, detail steps 2-3, consistency steps 4-5."""



@pytest.fixture(scope="module")
def ddp_dumps(tmp_path_factory) -> dict[tuple[int, int], dict]:
    root = tmp_path_factory.mktemp("ddp")
    dump = root / "dump"
    overrides = train_probe.tiny_overrides(root / "run", STEPS, c_end=C_END, d_end=D_END,
                               extra=["trainer.strategy=ddp", "trainer.devices=2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HELPER), "--dump", str(dump), *overrides], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    dumps = {}
    for rank in (0, 1):
        for step in range(STEPS + 1):
            path = dump / f"rank{rank}_step{step}.pt"
            assert path.is_file(), f"rank {rank} wrote no dump for step {step}"
            dumps[rank, step] = torch.load(path, weights_only=True)
    return dumps


def _changed(before: dict, after: dict, groups: dict[str, str], group: str) -> list[bool]:
    return [not torch.equal(before[k], after[k]) for k, g in groups.items() if g == group]


def test_ranks_identical_at_every_step(ddp_dumps):
    for step in range(STEPS + 1):
        p0, p1 = ddp_dumps[0, step]["params"], ddp_dumps[1, step]["params"]
        assert p0.keys() == p1.keys() and p0
        diff = [k for k in p0 if not torch.equal(p0[k], p1[k])]
        assert not diff, f"step {step}: {len(diff)} tensors differ between ranks, e.g. {diff[:3]}"
    assert ddp_dumps[0, STEPS]["optimizer_step"] == STEPS
    assert ddp_dumps[0, STEPS]["micro_step"] == 2 * STEPS


def test_every_trainable_tensor_trained(ddp_dumps):
    init, final = ddp_dumps[0, 0]["params"], ddp_dumps[0, STEPS]["params"]
    same = [k for k in init if torch.equal(init[k], final[k])]
    assert not same, f"{len(same)} trainable tensors never changed, e.g. {same[:3]}"
    assert set(ddp_dumps[0, 0]["groups"].values()) == {"c_lora", "cfr", "d_lora", "conv_in"}


@pytest.mark.parametrize(("start", "end", "frozen", "trained"), [
    (0, C_END + 1, ("d_lora",), ("c_lora", "cfr", "conv_in")),          # consistency
    (C_END + 1, D_END + 1, ("c_lora", "cfr"), ("d_lora", "conv_in")),   # detail
    (D_END + 1, STEPS, ("d_lora",), ("c_lora", "cfr", "conv_in")),      # consistency again
])
def test_inactive_family_frozen_in_its_phase(ddp_dumps, start, end, frozen, trained):
    groups = ddp_dumps[0, 0]["groups"]
    before, after = ddp_dumps[0, start]["params"], ddp_dumps[0, end]["params"]
    for group in frozen:
        changed = _changed(before, after, groups, group)
        assert changed and not any(changed), f"{group} changed during steps [{start}, {end})"
    for group in trained:
        changed = _changed(before, after, groups, group)
        assert changed and all(changed), f"{group}: only {sum(changed)}/{len(changed)} tensors moved"
    conv_in = _changed(before, after, groups, "conv_in")
    assert all(conv_in), "conv_in trains in both phases"


def test_only_the_active_groups_gradients_travel(ddp_dumps):
    """trainer.grad_sync=auto: the phase-aware hook all-reduces the active groups' fp32 gradients only."""
    groups, params = ddp_dumps[0, 0]["groups"], ddp_dumps[0, 0]["params"]
    group_bytes = {g: sum(4 * params[k].numel() for k, gk in groups.items() if gk == g) for g in set(groups.values())}
    for step in range(1, STEPS + 1):
        phase = "detail" if C_END < step - 1 <= D_END else "consistency"
        active = ("d_lora", "conv_in") if phase == "detail" else ("c_lora", "cfr", "conv_in")
        sent = ddp_dumps[0, step]["sync_bytes"] - ddp_dumps[0, step - 1]["sync_bytes"]
        assert sent == sum(group_bytes[g] for g in active), f"step {step} ({phase})"


def test_ranks_saw_different_data(ddp_dumps):
    for rank in (0, 1):
        keys = [k for step in range(1, STEPS + 1) for k in ddp_dumps[rank, step]["keys"]]
        assert keys == [f"synthetic_r{rank}_m{m}_0" for m in range(2 * STEPS)]


def test_synthetic_batches_depend_on_rank():
    from dlightning.data.config import DataConfig
    from dlightning.data.synthetic import SyntheticBatchBuilder

    cfg = DataConfig(backend="synthetic", crop_size=32, batch_size=1)
    batches = [SyntheticBatchBuilder(cfg, rank=r, phase_fn=lambda m: "consistency").build(0) for r in (0, 1)]
    assert not torch.equal(batches[0]["hr"], batches[1]["hr"])
    again = SyntheticBatchBuilder(cfg, rank=1, phase_fn=lambda m: "consistency").build(0)
    assert torch.equal(again["hr"], batches[1]["hr"])

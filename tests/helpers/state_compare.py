"""Compare two dlightning checkpoints bit for bit (the resume and pre-emption tests share this)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint the safe way, on CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Trainable tensors, optimizer state and counters of two checkpoints are bit-identical."""
    assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} trainable tensors differ, e.g. {diff[:3]}"

    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for idx, state in opt_a["state"].items():
        assert state.keys() == opt_b["state"][idx].keys() == {"step", "exp_avg", "exp_avg_sq"}, idx
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], opt_b["state"][idx][key]), f"optimizer state {idx}.{key} differs"

    block_a, block_b = a["dlightning"], b["dlightning"]
    for key in ("optimizer_step", "micro_step", "last_phase", "nonfinite"):
        assert block_a[key] == block_b[key], key
    assert torch.equal(block_a["module_rng"], block_b["module_rng"]), "private RNG (CSD draws) differs"
    assert a["VSRDataModule"]["micro_batch"] == b["VSRDataModule"]["micro_batch"]

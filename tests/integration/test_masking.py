"""Both ways of holding inactive groups still give the same guarantee: no update, no weight decay.

``drop_grad`` (the DDP default) sets the inactive groups' gradients to None; ``zero_lr`` (used under
DeepSpeed, whose partitioned gradients cannot be dropped per group) sets their learning rate to 0.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers.train_probe import DEMO_CONFIG, parameter_group_names, tiny_overrides

from dlightning.config import load_config
from dlightning.train import fit
from dlightning.training.schedule import phase_at


class Snapshots(L.Callback):
    """Trainable tensors after every optimizer step, keyed by the step just taken."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        self.by_step[0] = pl_module.trainable_state_dict()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.at_step_boundary:
            self.by_step[pl_module.optimizer_step] = pl_module.trainable_state_dict()


@pytest.mark.parametrize("mask_mode", ["drop_grad", "zero_lr"])
def test_inactive_groups_do_not_move(mask_mode, tmp_path):
    cfg = load_config([DEMO_CONFIG], tiny_overrides(
        tmp_path, 4, c_end=1, d_end=3, extra=[f"optim.mask_mode={mask_mode}", "optim.weight_decay=0.1",
                                              "optim.accumulate=1"]))
    snaps = Snapshots()
    module = fit(cfg, fresh=True, callbacks=[snaps])
    groups = parameter_group_names(module)
    inactive = {"consistency": {"d_lora"}, "detail": {"c_lora", "cfr"}}
    for step in range(4):  # the update of step s takes the tensors from by_step[s] to by_step[s + 1]
        phase = phase_at(step, cfg.schedule).phase
        before, after = snaps.by_step[step], snaps.by_step[step + 1]
        for name, group in groups.items():
            moved = not torch.equal(before[name], after[name])
            if group in inactive[phase]:
                assert not moved, f"{name} ({group}) moved in the {phase} step {step} under {mask_mode}"
        assert any(not torch.equal(before[n], after[n]) for n, g in groups.items() if g == "conv_in")
    if mask_mode == "zero_lr":
        lrs = {g["name"]: g["lr"] for g in module.optimizers().optimizer.param_groups}
        assert lrs["c_lora"] == lrs["cfr"] == 0.0 and lrs["d_lora"] == lrs["conv_in"] == cfg.optim.lr

"""Learning-rate warm-up and schedules per group, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dlightning.config import load_config
from dlightning.errors import ConfigError
from dlightning.training.config import OptimConfig
from dlightning.training.lr_schedule import apply_learning_rates, group_lr, lr_factor


def test_constant_without_warmup_is_the_base_rate() -> None:
    cfg = OptimConfig(lr=2e-4)
    assert [group_lr("c_lora", s, cfg, 100) for s in (0, 50, 99)] == [2e-4] * 3


def test_linear_warmup_then_cosine_to_the_floor() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg, 104) == pytest.approx(1.0)
    assert lr_factor(54, cfg, 104) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(104, cfg, 104) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 104) == pytest.approx(0.1)  # past max_steps the floor holds


def test_linear_decay() -> None:
    cfg = OptimConfig(lr=1.0, lr_schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, cfg, 10) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_per_group_base_rates_and_zero_lr_masking() -> None:
    cfg = OptimConfig(lr=1e-4, group_lr={"conv_in": 1e-5}, warmup_steps=2)
    params = {n: torch.nn.Parameter(torch.zeros(1)) for n in ("c_lora", "cfr", "d_lora", "conv_in")}
    opt = torch.optim.AdamW([{"params": [p], "name": n} for n, p in params.items()])
    apply_learning_rates(opt, 0, "detail", cfg, max_steps=10, zero_inactive=True)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"c_lora": 0.0, "cfr": 0.0, "d_lora": 0.5e-4, "conv_in": 0.5e-5}
    apply_learning_rates(opt, 1, "detail", cfg, max_steps=10, zero_inactive=False)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"c_lora": 1e-4, "cfr": 1e-4, "d_lora": 1e-4,
                                                              "conv_in": 1e-5}


@pytest.mark.parametrize(("override", "key"), [
    ("optim.lr_schedule=step", "optim.lr_schedule"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"), ("optim.group_lr.unet=1e-4", "optim.group_lr"),
    ("optim.ema.decay=1.5", "optim.ema.decay"),
])
def test_bad_schedule_settings_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])

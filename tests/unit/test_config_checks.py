"""Every check that needs only the config runs when it loads (``dlightning config``), before anything is built
or written: numeric ranges, impossible combinations, and the local paths the run reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.paths import CONFIGS

from dlightning.cli import main
from dlightning.config import load_config, local_path_problems

DEMO = str(CONFIGS / "demo.yaml")


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.lr=-1", "optim.lr=-1.0 is out of range"),
    ("optim.lr=0", "optim.lr=0.0 is out of range"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.clip_norm.cfr=-1", "optim.clip_norm.cfr=-1.0 is out of range"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every=0 is out of range"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0 is out of range"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0 is out of range"),
    ("trainer.log_every=0", "trainer.log_every=0 is out of range"),
    ("model.cfr.temperature=0", "model.cfr.temperature=0.0 is out of range"),
    ("model.lora.alpha=0", "model.lora.alpha=0.0 is out of range"),
    ("loss.csd.t_max=2000", "loss.csd.t_min=20 / loss.csd.t_max=2000"),
    ("schedule.segments.1.end=3", "schedule.segments.1.end=3 must be > schedule.segments.0.end=29"),
    ("validation.upscale.min_short_side=200000", "upscale.min_short_side=200000 is out of range"),
])
def test_bad_value_exits_2_at_config_time(override: str, expected: str, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    assert main(["config", "--config", DEMO, override]) == 2
    assert expected in caplog.text
    assert main(["fit", "--config", DEMO, f"trainer.run_dir={run_dir}", override]) == 2
    assert not run_dir.exists()  # refused before the run folder is made


def test_config_names_every_missing_local_path(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
                                               ) -> None:
    assert main(["config", "--config", str(CONFIGS / "sd21.yaml")]) == 2
    assert "model:" in capsys.readouterr().out  # the resolved config is still shown
    for key in ("model.pretrained_path", "model.cfr.spynet_path", "loss.lpips.backbone_path",
                "loss.temporal.flow_path", "data.sources.0.path", "data.sources.1.path"):
        assert f"{key}='/path/to/" in caplog.text


def test_paths_that_exist_pass(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    shards = tmp_path / "shards"
    cfg = load_config([DEMO], [f"data.sources.0.path={shards}", f"data.sources.1.path={shards}",
                               f"validation.shards={shards}"])
    assert local_path_problems(cfg) == []
    unset = load_config([DEMO], ["loss.lpips.allow_random_backbone=false", "data.backend=synthetic",
                                 "validation.every_n_steps=0"])
    assert [p.split(" ")[0] for p in local_path_problems(unset)] == ["loss.lpips.backbone_path"]

"""``fit`` refuses unusable run folders and unreadable data before it builds the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.train_probe import DEMO_CONFIG, tiny_overrides

from dlightning import train as run
from dlightning.config import load_config
from dlightning.errors import ConfigError


@pytest.fixture
def no_model_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(run, "build_module", refuse)


def _cfg(run_dir: Path, *extra: str):
    return load_config([DEMO_CONFIG], tiny_overrides(run_dir, 2, c_end=0, d_end=1, extra=list(extra)))


def _checkpoint(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "optimizer_states": [], "dlightning": {"optimizer_step": step}}, path)


def test_fresh_refused_while_checkpoints_exist(tmp_path: Path, no_model_build: None) -> None:
    # a fresh run would write step-2 next to the old step-500, and pruning keeps the old run's files
    _checkpoint(tmp_path / "checkpoints" / "step-00000500.ckpt", 500)
    with pytest.raises(ConfigError, match="move or delete"):
        run.fit(_cfg(tmp_path), fresh=True)


def test_only_unreadable_checkpoints_refused(tmp_path: Path, no_model_build: None) -> None:
    bad = tmp_path / "checkpoints" / "step-00000500.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="none is readable"):
        run.fit(_cfg(tmp_path))


def test_missing_shards_fail_before_the_model_is_built(tmp_path: Path, no_model_build: None) -> None:
    cfg = _cfg(tmp_path, "data.backend=shards",
               f"data.sources=[{{path: {tmp_path / 'no_shards'}, weight_consistency: 1, weight_detail: 1}}]")
    with pytest.raises(ConfigError, match="no_shards"):
        run.fit(cfg)
    assert not (tmp_path / "config.yaml").exists()  # nothing written for a run that cannot start

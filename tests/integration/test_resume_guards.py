"""Resuming a run folder: a changed config is checked before the model is built, one fit holds the folder,
and the data skip counts continue across the resume."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.shard_sets import write_faulty_set
from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from lightning.pytorch import Callback

from dlightning import train
from dlightning.cli import main
from dlightning.config import load_config
from dlightning.errors import ConfigError
from dlightning.resume_check import LOG_NAME
from dlightning.training.run_lock import RunLock


def _cfg(run_dir: Path, steps: int, *extra: str):
    return load_config([DEMO_CONFIG], tiny_overrides(run_dir, steps, c_end=0, d_end=1, extra=list(extra)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a 2-step checkpoint of the tiny config."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    train.fit(_cfg(run_dir, 2), fresh=True)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(("override", "key"), [
    ("model.lora.rank_consistency=8", "model.lora.rank_consistency"),
    ("optim.accumulate=1", "optim.accumulate"),
    ("schedule.segments.1.weights.lpips=0.5", "schedule.segments.1.weights.lpips"),
])
def test_incompatible_change_is_refused_before_the_model_is_built(trained: Path, tmp_path: Path, override: str,
                                                                  key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _copy(trained, tmp_path)

    def refuse(*args):
        raise AssertionError("the model was built before the config check")

    monkeypatch.setattr(train, "build_module", refuse)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        train.fit(_cfg(run_dir, 4, override))
    assert "restore these values, or start a new run" in str(err.value)


def test_compatible_change_is_logged_and_recorded(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    train.fit(_cfg(run_dir, 3, "data.batch_size=2", "optim.lr=1e-3"))
    record = (run_dir / LOG_NAME).read_text()
    assert "data.batch_size: 1 -> 2" in record and "optim.lr: 0.003 -> 0.001" in record
    assert "trainer.max_steps: 2 -> 3" in record
    assert "resume from" in record and "checkpoints/" in record


def test_second_fit_on_a_held_folder_exits_2_naming_the_holder(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dlightning.training.run_lock import RunLock; "
        f"lock = RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["fit", "--config", DEMO_CONFIG, *tiny_overrides(run_dir, 2, c_end=0, d_end=1)])
        assert code == 2
        assert f"PID {holder.pid}" in caplog.text and socket.gethostname() in caplog.text
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: its stale lock is taken over
    RunLock(run_dir).acquire().release()


def test_lock_is_released_when_fit_ends(trained: Path) -> None:
    lock = RunLock(trained).acquire()  # fit of the fixture has returned: the folder is free
    lock.release()
    assert str(os.getpid()) in (trained / "run.lock").read_text()


class _SkipCounts(Callback):
    """Records the data module's skip counts when training starts (after a restore) and ends."""

    def __init__(self) -> None:
        self.at_start: dict[str, int] = {}
        self.at_end: dict[str, int] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = dict(trainer.datamodule.skip_counts())

    def on_train_end(self, trainer, pl_module) -> None:
        self.at_end = dict(trainer.datamodule.skip_counts())


def test_skip_counts_continue_after_a_resume(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_faulty_set(shards)
    run_dir = tmp_path / "run"
    data = ["data.backend=shards", f"data.sources=[{{path: {shards}, weight_consistency: 1, weight_detail: 1}}]",
            "data.crop_size=32"]
    first, second = _SkipCounts(), _SkipCounts()
    train.fit(_cfg(run_dir, 3, *data), fresh=True, callbacks=[first])
    assert sum(first.at_end.values()) > 0, "the faulty set must make the loader skip samples"
    train.fit(_cfg(run_dir, 6, *data), callbacks=[second])
    assert second.at_start == first.at_end  # restored from the checkpoint, not restarted at 0
    assert all(second.at_end[k] >= v for k, v in first.at_end.items())
    rows = csv.DictReader((run_dir / "logs" / "csv" / "version_1" / "metrics.csv").open())
    logged = [float(r["train/skipped_samples"]) for r in rows if r.get("train/skipped_samples")]
    assert logged[0] >= sum(first.at_end.values())

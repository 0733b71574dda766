"""Lightning's own Trainer features from the config: any Trainer argument, callbacks in LightningCLI's form,
every precision the method can train with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.train_probe import DEMO_CONFIG, tiny_overrides

from dlightning import train
from dlightning.config import load_config
from dlightning.errors import ConfigError


def _cfg(run_dir: Path, steps: int, *extra: str):
    return load_config([DEMO_CONFIG], tiny_overrides(run_dir, steps, c_end=1, d_end=3, extra=list(extra)))


def test_profiler_prints_lightnings_report(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path / "run", 2, c_end=0, d_end=1, extra=["trainer.profiler=simple"])
    proc = subprocess.run([sys.executable, "-m", "dlightning", "fit", "--config", DEMO_CONFIG, *overrides],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT Profiler Report" in proc.stdout + proc.stderr


def test_early_stopping_and_model_checkpoint_monitor_a_logged_loss(tmp_path: Path) -> None:
    best = tmp_path / "best"
    callbacks = ("trainer.callbacks=["
                 "{class_path: lightning.pytorch.callbacks.EarlyStopping, init_args: {monitor: train/loss, "
                 "stopping_threshold: 100.0, check_on_train_epoch_end: true}}, "
                 "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {monitor: train/loss, "
                 f"dirpath: '{best}', filename: best, every_n_train_steps: 1, save_top_k: 1}}}}]")
    # two micro-batches per epoch = one optimizer step: EarlyStopping checks after every step
    module = train.fit(_cfg(tmp_path / "run", 6, "data.batches_per_epoch=2", callbacks), fresh=True)
    assert module.optimizer_step < 6  # the loss is below the threshold at the first check: stopped early
    assert (best / "best.ckpt").is_file()


def test_bad_callback_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", 2, "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.NoSuchThing}]")
    with pytest.raises(ConfigError, match="cannot be imported"):
        train.fit(cfg, fresh=True)
    assert not (tmp_path / "run").exists()


def test_fast_dev_run_and_detect_anomaly_pass_through(tmp_path: Path) -> None:
    module = train.fit(_cfg(tmp_path / "run", 4, "trainer.fast_dev_run=true", "trainer.detect_anomaly=true"),
                       fresh=True)
    assert module.optimizer_step <= 1 and module.trainer.fast_dev_run


@pytest.mark.parametrize(("precision", "reason"), [("bf16-true", "use bf16-mixed"), ("16-true", "use 16-mixed"),
                                                    ("64-true", "use 32-true")])
def test_precisions_the_method_cannot_use_are_refused(precision: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_config([], [f"trainer.precision={precision}"])

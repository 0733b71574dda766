"""Experiment tracking: W&B offline/disabled/auto through a real tiny ``fit``, and CSV across a resume.

Nothing touches the network or the home folder: W&B runs offline (or disabled) with its config, cache
and data folders inside the test's tmp folder. The offline runs are read back with wandb's own reader.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from helpers.wandb_offline import offline_runs, read_offline_run

C_END, D_END = 1, 3  # steps 0-1 consistency (phase 0.0), 2-3 detail (phase 1.0)
GROUPS = ("c_lora", "cfr", "d_lora", "conv_in")  # the generator's optimizer groups
CONSISTENCY_GROUPS = ("c_lora", "cfr", "conv_in")  # the ones with gradients in the consistency phase


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Point every folder W&B (and wandb-core) reads or writes into ``root``; no credentials; quiet.

    HOME moves too (no ``~/.netrc``), and WANDB_DIR / WANDB_MODE are unset: they would win over the run
    folder and the config."""
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts"), ("XDG_CACHE_HOME", "xdg"), ("HOME", "home")):
        mp.setenv(var, str(root / sub))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_ERROR_REPORTING", "false")
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        mp.delenv(var, raising=False)


def _fit(run_dir: Path, steps: int, *extra: str):
    from dlightning.config import load_config
    from dlightning.train import fit

    cfg = load_config([DEMO_CONFIG], tiny_overrides(run_dir, steps, c_end=C_END, d_end=D_END, extra=list(extra)))
    return fit(cfg)


@pytest.fixture(scope="module")
def wandb_resumed(tmp_path_factory):
    """Two fits in one run folder with W&B offline: 2 steps, then resumed to 3 steps."""
    root = tmp_path_factory.mktemp("wandb")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root / "home")
        wandb_args = ("logging.backend=wandb", "logging.wandb_mode=offline", "logging.project=dlightning-test")
        _fit(run_dir, 2, *wandb_args)
        _fit(run_dir, 3, *wandb_args)
        return run_dir, [read_offline_run(f) for f in offline_runs(run_dir)]


def test_wandb_offline_run_holds_the_training_metrics(wandb_resumed):
    run_dir, runs = wandb_resumed
    assert len(runs) == 2, [r.folder.name for r in runs]
    first = runs[0]
    assert first.exit_code == 0  # fit finished the run
    assert len(first.history) == 2  # log_every=1: one row per optimizer step
    for row in first.history:
        expected = {"train/loss", "train/loss_l2", "train/phase", "train/skipped_steps", "train/clips_per_s",
                    *(f"train/lr_{g}" for g in GROUPS), *(f"train/grad_norm_{g}" for g in CONSISTENCY_GROUPS)}
        assert expected <= row.keys(), sorted(expected - row.keys())
        assert row["train/phase"] == 0.0 and row["train/skipped_steps"] == 0
        assert row["train/loss"] > 0 and row["train/clips_per_s"] > 0
        assert row["train/lr_c_lora"] == pytest.approx(3.0e-3)  # configs/demo.yaml optim.lr
    # the x-axis is our optimizer step (1 after the first step), not W&B's own log counter
    assert [row["trainer/global_step"] for row in first.history] == [1, 2]


def test_wandb_run_id_is_stable_across_a_resume(wandb_resumed):
    run_dir, (first, second) = wandb_resumed
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert first.run_id == second.run_id == run_id
    assert first.folder.name.endswith(f"-{run_id}") and second.folder.name.endswith(f"-{run_id}")
    # the resumed run goes on from step 2: step 3, in the detail phase, monotonic after the first run
    assert [row["trainer/global_step"] for row in second.history] == [3]
    assert second.history[0]["train/phase"] == 1.0
    assert second.exit_code == 0


def test_wandb_run_has_the_resolved_config(wandb_resumed):
    run_dir, (first, second) = wandb_resumed
    written = yaml.safe_load((run_dir / "config.yaml").read_text())  # the second fit's resolved config
    logged = {k: v for k, v in second.config.items() if k != "_wandb"}
    assert logged == written
    assert first.config["trainer"]["max_steps"] == 2 and second.config["trainer"]["max_steps"] == 3
    assert second.config["logging"]["backend"] == "wandb" and second.config["model"]["preset"] == "tiny"


def test_wandb_disabled_trains_and_writes_no_run(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path / "home")
    module = _fit(tmp_path / "run", 1, "logging.backend=wandb", "logging.wandb_mode=disabled")
    assert module.optimizer_step == 1
    assert (tmp_path / "run" / "checkpoints" / "step-00000001.ckpt").is_file()
    assert offline_runs(tmp_path / "run") == [] and not list((tmp_path / "home").rglob("*.wandb"))


def test_auto_mode_is_offline_without_an_api_key(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from dlightning.tracking.config import LoggingConfig
    from dlightning.tracking.loggers import build_logger, resolve_wandb_mode

    _isolate_wandb(monkeypatch, tmp_path / "home")
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")

    [logger] = build_logger(LoggingConfig(backend="wandb", wandb_mode="auto"), tmp_path / "run", run_id="autotest01")
    assert isinstance(logger, WandbLogger)
    logger.log_metrics({"train/loss": 0.5}, step=7)
    logger.experiment.finish()
    [run] = [read_offline_run(f) for f in offline_runs(tmp_path / "run")]
    assert run.run_id == "autotest01"
    assert run.history == [{**run.history[0], "train/loss": 0.5, "trainer/global_step": 7}]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_resume_keeps_the_previous_metrics(tmp_path):
    run_dir = tmp_path / "run"
    _fit(run_dir, 1)
    _fit(run_dir, 2)
    logs = run_dir / "logs" / "csv"
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["csv"]  # logs/<backend>/, nothing else
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]
    assert [r["step"] for r in _csv_rows(logs / "version_0" / "metrics.csv")] == ["1"]
    assert [r["step"] for r in _csv_rows(logs / "version_1" / "metrics.csv")] == ["2"]
    for version, steps in (("version_0", 1), ("version_1", 2)):  # the resolved config of each start
        hparams = yaml.safe_load((logs / version / "hparams.yaml").read_text())
        assert hparams["trainer"]["max_steps"] == steps and hparams["logging"]["backend"] == "csv"

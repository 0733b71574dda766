"""Several loggers at once through a real tiny ``fit``: W&B offline, CSV and TensorBoard side by side under
``<run_dir>/logs/<backend>/``, validation media on W&B and TensorBoard, W&B run metadata and checkpoint
artifacts; and the environment's WANDB_MODE / WANDB_DIR winning over the config.

Nothing touches the network or the home folder: W&B's folders and HOME are inside the test's tmp folder,
and what W&B wrote is read back with wandb's own reader (``helpers.wandb_offline``), TensorBoard's
event files with TensorBoard's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import pytest
from helpers.media import smooth_frames, write_video
from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from helpers.wandb_offline import offline_runs, read_offline_run

STEPS = 2


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    """W&B's folders and HOME (no ``~/.netrc``) inside ``root``; no credentials, WANDB_DIR or WANDB_MODE."""
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts"), ("XDG_CACHE_HOME", "xdg"), ("HOME", "home")):
        mp.setenv(var, str(root / sub))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_ERROR_REPORTING", "false")
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        mp.delenv(var, raising=False)


def _val_clips(root: Path) -> tuple[Path, Path]:
    """One 3-frame validation clip: 12x16 LQ and its 48x64 GT."""
    gt = smooth_frames(3, 48, 64, seed=0)
    lq = [cv2.resize(f, (16, 12), interpolation=cv2.INTER_AREA) for f in gt]
    for kind, frames in (("lq", lq), ("gt", gt)):
        (root / kind).mkdir(parents=True)
        write_video(root / kind / "clipa.mp4", frames, fps=6)
    return root / "lq", root / "gt"


@pytest.fixture(scope="module")
def three_loggers(tmp_path_factory):
    """One fit of 2 steps with W&B (offline, tags, group, notes, job type, checkpoint artifacts), CSV and
    TensorBoard, a ModelCheckpoint from the config and a validation at step 2."""
    from dlightning.config import load_config
    from dlightning.train import fit

    root = tmp_path_factory.mktemp("loggers")
    run_dir = root / "run"
    lq, gt = _val_clips(root / "val")
    extra = [
        "logging.backend=[wandb, csv, tensorboard]", "logging.wandb_mode=offline", "logging.project=dlightning-test",
        "logging.wandb_tags=[tiny, ci]", "logging.wandb_group=loggers", "logging.wandb_notes=three at once",
        "logging.wandb_job_type=train", "logging.wandb_log_model=all",
        "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
        f"{{dirpath: '{root / 'mc'}', every_n_train_steps: 1, save_top_k: -1}}}}]",
        "validation.every_n_steps=2", "validation.shards=null", f"validation.lq_dir={lq}", f"validation.gt_dir={gt}",
        "validation.max_frames=3",
        "validation.flow_net=farneback", "validation.compute_lpips=false", "validation.upscale.min_short_side=0",
    ]
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root / "wandb-home")
        fit(load_config([DEMO_CONFIG], tiny_overrides(run_dir, STEPS, c_end=1, d_end=3, extra=extra)))
        [run] = [read_offline_run(f) for f in offline_runs(run_dir)]
    return run_dir, run


def test_each_logger_writes_its_own_folder_under_logs(three_loggers):
    run_dir, _ = three_loggers
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["csv", "tensorboard", "wandb"]
    assert [p.name for p in (run_dir / "logs" / "csv").iterdir()] == ["version_0"]
    assert [p.name for p in (run_dir / "logs" / "tensorboard").iterdir()] == ["version_0"]
    assert (run_dir / "validation" / "step-00000002" / "clipa_profile.png").is_file()
    assert not (run_dir / "wandb").exists() and not (run_dir / "tb").exists()  # the old scattered names


def test_csv_and_wandb_hold_the_same_training_metrics(three_loggers):
    run_dir, run = three_loggers
    with (run_dir / "logs" / "csv" / "version_0" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    csv_loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    wandb_loss = {r["trainer/global_step"]: r["train/loss"] for r in run.history if "train/loss" in r}
    assert sorted(csv_loss) == sorted(wandb_loss) == [1, 2]
    assert wandb_loss == pytest.approx(csv_loss)
    assert any(r.get("val/psnr") for r in rows)


def test_tensorboard_has_scalars_and_validation_images_and_no_hp_metric(three_loggers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = three_loggers
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/psnr"} <= set(tags["scalars"]), tags["scalars"]
    assert "hp_metric" not in tags["scalars"]
    assert tags["images"] == ["val/profile/clipa"]
    [image] = events.Images("val/profile/clipa")
    profile = cv2.imread(str(run_dir / "validation" / "step-00000002" / "clipa_profile.png"))
    assert image.step == 2 and (image.height, image.width) == profile.shape[:2]


def test_wandb_gets_the_validation_media_on_the_step_axis(three_loggers):
    run_dir, run = three_loggers
    # wandb's reader flattens a media value into "<key>.<field>" entries
    [media] = [r for r in run.history if "val/video/clipa._type" in r]
    assert media["trainer/global_step"] == 2
    assert media["val/video/clipa._type"] == "video-file"
    assert media["val/profile/clipa._type"] == "image-file"
    assert media["val/clips._type"] == "table-file" and media["val/clips.nrows"] == 1
    assert media["val/video/clipa.size"] == (run_dir / "validation" / "step-00000002" / "clipa.mp4").stat().st_size


def test_wandb_run_metadata_and_checkpoint_artifacts(three_loggers):
    run_dir, run = three_loggers
    assert run.record["tags"] == ["tiny", "ci"]
    assert run.record["run_group"] == "loggers" and run.record["notes"] == "three at once"
    assert run.record["job_type"] == "train" and run.record["project"] == "dlightning-test"
    assert run.exit_code == 0
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert len(models) == STEPS  # log_model=all: each ModelCheckpoint save, kept for `wandb sync`
    assert {a["name"] for a in models} == {f"model-{run.run_id}"}


def test_wandb_mode_and_dir_from_the_environment_win(tmp_path, monkeypatch):
    from dlightning.tracking.config import LoggingConfig
    from dlightning.tracking.loggers import build_logger

    _isolate_wandb(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "user-wandb"))
    (tmp_path / "user-wandb").mkdir()
    # the config says disabled (no run at all) and the run folder: the environment's choices win
    [logger] = build_logger(LoggingConfig(backend="wandb", wandb_mode="disabled"), tmp_path / "run", run_id="envwins1")
    logger.log_metrics({"train/loss": 0.25}, step=3)
    logger.experiment.finish()
    [folder] = sorted((tmp_path / "user-wandb" / "wandb").glob("offline-run-*"))
    run = read_offline_run(folder)
    assert run.run_id == "envwins1" and run.exit_code == 0
    assert [r["train/loss"] for r in run.history] == [0.25]
    assert offline_runs(tmp_path / "run") == []


def test_a_logger_from_class_path_writes_under_logs(tmp_path):
    from dlightning.config import load_config
    from dlightning.tracking.loggers import build_loggers

    cfg = load_config([], ["logging.backend=[csv, {class_path: lightning.pytorch.loggers.CSVLogger, "
                           "init_args: {name: mine}}]"])
    built, mine = build_loggers(cfg.logging, tmp_path / "run")
    assert Path(built.log_dir) == tmp_path / "run" / "logs" / "csv" / "version_0"
    assert Path(mine.log_dir) == tmp_path / "run" / "logs" / "mine" / "version_0"  # save_dir defaults to logs/


def test_an_export_becomes_a_model_artifact_of_the_training_run(tmp_path, monkeypatch):
    from dlightning.tracking.artifacts import log_export_artifact
    from dlightning.tracking.config import LoggingConfig
    from dlightning.tracking.wandb_run import stable_run_id

    _isolate_wandb(monkeypatch, tmp_path / "home")
    export = tmp_path / "export"
    export.mkdir()
    (export / "model_index.json").write_text("{}")
    (export / "unet.safetensors").write_bytes(b"\0" * 64)
    run_dir = tmp_path / "run"
    assert log_export_artifact(export, run_dir, LoggingConfig(backend="csv")) is None  # no W&B, nothing logged
    assert not (run_dir / "logs").exists()
    cfg = LoggingConfig(backend=["wandb", "csv"], wandb_mode="offline")
    name = log_export_artifact(export, run_dir, cfg, metadata={"optimizer_step": 7})
    [run] = [read_offline_run(f) for f in offline_runs(run_dir)]
    assert run.run_id == stable_run_id(run_dir) and name == f"export-{run.run_id}"
    [artifact] = run.artifacts
    assert artifact["type"] == "model" and artifact["name"] == name and artifact["aliases"] == ["latest"]
    assert sorted(c["path"] for c in artifact["manifest"]["contents"]) == ["model_index.json", "unet.safetensors"]
    assert run.record["job_type"] == "export" and run.exit_code == 0


def test_export_wandb_artifact_flag_logs_to_the_checkpoints_run(three_loggers, tmp_path, monkeypatch):
    """``dlightning export --wandb-artifact`` adds the export to the training run it came from."""
    from dlightning.cli import main

    run_dir, _ = three_loggers
    _isolate_wandb(monkeypatch, tmp_path / "home")
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--wandb-artifact"]) == 0
    exports = [a for f in offline_runs(run_dir) for a in read_offline_run(f).artifacts
               if a["name"].startswith("export-")]
    assert len(exports) == 1
    assert "model_index.json" in {c["path"] for c in exports[0]["manifest"]["contents"]}
    # no run folder: refused before anything is built
    assert main(["export", "--checkpoint", str(tmp_path / "nothing.ckpt"), "--out", str(tmp_path / "e2"),
                 "--wandb-artifact"]) == 2
    assert not (tmp_path / "e2").exists()

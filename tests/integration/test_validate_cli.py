"""``dlightning validate`` on a checkpoint written by a real (tiny, 2-step) training run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import pytest
from helpers.media import smooth_frames, write_video
from helpers.train_probe import DEMO_CONFIG, tiny_overrides

from dlightning.cli import main as dlightning_main

CLI = Path(sys.executable).parent / "dlightning"
METRICS = ("val/psnr", "val/ssim", "val/lpips", "val/ewarp")
# Both data sources: the training config names validation.shards, the command line may name folders.
COMMON = ["validation.lpips.allow_random_backbone=true", "validation.flow_net=farneback",
          "validation.upscale.min_short_side=0", "validation.max_frames=3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dlightning.config import load_config
    from dlightning.train import fit

    run = tmp_path_factory.mktemp("run")
    cfg = load_config([DEMO_CONFIG], tiny_overrides(run, 2, c_end=100, d_end=200,
                                                    extra=["optim.accumulate=1", "trainer.checkpoint_every=2"]))
    fit(cfg, fresh=True)
    ckpt = run / "checkpoints" / "step-00000002.ckpt"
    assert ckpt.is_file()
    return ckpt


def _check_outputs(step_dir: Path, clip: str, gt_hw: tuple[int, int], n_frames: int) -> None:
    data = json.loads((step_dir / "metrics.json").read_text())
    assert data["step"] == 2
    for key in METRICS:
        assert math.isfinite(data[key]), key
    assert data["val/psnr"] > 0 and -1 <= data["val/ssim"] <= 1 and data["val/lpips"] >= 0
    assert data["val/ewarp"] >= 0 and len(data["per_clip"]) == 1
    with av.open(str(step_dir / f"{clip}.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # LQ bicubic | output | GT, each at the GT size: the output came back at scale x the LQ size.
    assert len(frames) == n_frames and frames[0].shape == (gt_hw[0], 3 * gt_hw[1], 3)
    profile = cv2.imread(str(step_dir / f"{clip}_profile.png"))
    # Middle column over time per panel, 2-px separators between the three panels.
    assert profile is not None and profile.shape == (gt_hw[0], 3 * n_frames + 4, 3)


def test_validate_cli_on_video_folders(checkpoint: Path, tmp_path: Path) -> None:
    for sub in ("lq", "gt"):
        (tmp_path / sub).mkdir()
    gt = smooth_frames(3, 64, 48, seed=3)
    lq = [cv2.resize(f, (12, 16), interpolation=cv2.INTER_AREA) for f in gt]
    write_video(tmp_path / "lq" / "walk.mp4", lq, fps=6)
    write_video(tmp_path / "gt" / "walk.mp4", gt, fps=6)
    write_video(tmp_path / "lq" / "unpaired.mp4", lq, fps=6)  # no GT partner: not validated
    out = tmp_path / "val"
    cmd = [str(CLI), "validate", "--config", DEMO_CONFIG, "--checkpoint", str(checkpoint), "--out", str(out),
           f"validation.lq_dir={tmp_path / 'lq'}", f"validation.gt_dir={tmp_path / 'gt'}", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(line.split(": ") for line in proc.stdout.strip().splitlines())
    step_dir = out / "validation" / "step-00000002"
    _check_outputs(step_dir, "walk", (64, 48), 3)
    stored = json.loads((step_dir / "metrics.json").read_text())
    assert float(printed["val/psnr"]) == pytest.approx(stored["val/psnr"], rel=1e-5)


def test_validate_on_demo_shards(checkpoint: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    assert dlightning_main(["shards", "demo", str(shards), "sources.0.demo_kinds=[video]",
                            "sources.0.images=[astronaut]", "hr_size=[48,48]", "num_frames=3", "progress=false"]) == 0
    out = tmp_path / "val"
    # In-process (same code path as the console script) to keep the test fast.
    code = dlightning_main(["validate", "--config", DEMO_CONFIG, "--checkpoint", str(checkpoint), "--out", str(out),
                            f"validation.shards={shards}", *COMMON])
    assert code == 0
    step_dir = out / "validation" / "step-00000002"
    clip = json.loads((step_dir / "metrics.json").read_text())
    assert clip["per_clip"]
    (video,) = step_dir.glob("*.mp4")
    _check_outputs(step_dir, video.stem, (48, 48), 3)


def test_validate_without_data_is_a_config_error(checkpoint: Path, tmp_path: Path) -> None:
    code = dlightning_main(["validate", "--checkpoint", str(checkpoint), "--out", str(tmp_path),
                            "validation.flow_net=farneback"])
    assert code == 2
    assert dlightning_main(["validate", "--checkpoint", str(tmp_path / "none.ckpt")]) == 2

"""Validation callback on a tiny model and a generated folder of LQ/GT videos."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import cv2
import pytest
from helpers.media import randomized_generator, smooth_frames, write_video

from dlightning.inference.config import UpscaleConfig, ValidationConfig
from dlightning.losses.config import LPIPSConfig
from dlightning.training.validation import VideoValidation


@pytest.fixture
def val_dirs(tmp_path):
    for name, seed in (("clipa", 0), ("clipb", 1)):
        gt = smooth_frames(3, 48, 64, seed=seed)
        lq = [cv2.resize(f, (16, 12), interpolation=cv2.INTER_AREA) for f in gt]
        (tmp_path / "lq").mkdir(exist_ok=True)
        (tmp_path / "gt").mkdir(exist_ok=True)
        write_video(tmp_path / "lq" / f"{name}.mp4", lq, fps=6)
        write_video(tmp_path / "gt" / f"{name}.mp4", gt, fps=6)
    return tmp_path


class _Recorder:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, metrics))


def _zero_flow_spynet_file(path):
    """SPyNet weights whose last conv per level is zero (flow 0), in the BasicVSR layout."""
    import torch

    from dlightning.models.spynet import SpyNet

    net = SpyNet()
    with torch.no_grad():
        for level in net.basic_module:
            level.basic_module[-1].conv.weight.zero_()
            level.basic_module[-1].conv.bias.zero_()
    torch.save(net.state_dict(), path)
    return str(path)


def test_callback_writes_videos_profiles_and_finite_metrics(val_dirs):
    cfg = ValidationConfig(every_n_steps=5, lq_dir=str(val_dirs / "lq"), gt_dir=str(val_dirs / "gt"),
                           max_frames=3, flow_path=_zero_flow_spynet_file(val_dirs / "spynet.pth"),
                           lpips=LPIPSConfig(allow_random_backbone=True),
                           upscale=UpscaleConfig(min_short_side=0, color_fix="none"))
    cb = VideoValidation(cfg, val_dirs / "run")
    gen = randomized_generator().train()
    recorder = _Recorder()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[recorder],
                              strategy=SimpleNamespace(barrier=lambda name=None: None))
    module = SimpleNamespace(generator=gen, optimizer_step=4, at_step_boundary=True)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert recorder.calls == []  # step 4 is not a multiple of 5
    module.optimizer_step = 5
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 0)  # same step again: no second run
    assert len(recorder.calls) == 1 and recorder.calls[0][0] == 5
    metrics = recorder.calls[0][1]
    for key in ("val/psnr", "val/ssim", "val/lpips", "val/ewarp", "val/ewarp_gt"):
        assert math.isfinite(metrics[key]), key
    out = val_dirs / "run" / "validation" / "step-00000005"
    for name in ("clipa", "clipb"):
        assert (out / f"{name}.mp4").is_file()
        profile = cv2.imread(str(out / f"{name}_profile.png"))
        assert profile.shape == (48, 3 * 3 + 2 * 2, 3)  # H x (3 panels x T frames + 2 separators)
    assert json.loads((out / "metrics.json").read_text())["step"] == 5
    assert gen.training  # mode restored

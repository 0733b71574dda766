"""Validation on held-out clips: metrics, side-by-side videos and temporal profiles.

:class:`VideoValidation` is a Lightning callback. Every ``every_n_steps`` optimizer steps (read from
``pl_module.optimizer_step``, at a step boundary) **global rank 0 alone** runs the generator (the raw
module, not the DDP wrapper, under ``no_grad``: no collective is involved) on the validation clips,
while the other ranks wait at ``trainer.strategy.barrier()``; rank 0 joins the barrier when done. This
is simple and correct; keep the validation set small enough to finish within the process-group timeout.

Outputs go to ``<run_dir>/validation/step-XXXXXXXX/``: ``<clip>.mp4`` (LQ bicubic | output | GT side by
side, at the clip's frame rate) and ``<clip>_profile.png`` (the middle pixel column of each panel over
time, time along x). Metrics (``val/psnr``, ``val/ssim``, ``val/lpips``, ``val/ewarp``, ``val/ewarp_gt``)
go to every Lightning logger; the media go through :mod:`dlightning.tracking.media` (W&B: videos, profiles
and a per-clip table; TensorBoard: the profiles).

Data: either ``validation.lq_dir`` + ``validation.gt_dir`` (videos or frame folders paired by stem) or
``validation.shards`` (a data_prep shard set; every sample with its stored LQ/HR frames).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch

from dlightning.contracts.run_layout import validation_dir
from dlightning.errors import ConfigError
from dlightning.inference.config import ValidationConfig
from dlightning.inference.pipeline import Upscaler
from dlightning.inference.video_io import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    VideoWriter,
    probe_frames,
    video_source,
)
from dlightning.metrics import VideoMetrics
from dlightning.tracking.media import ClipMedia, log_validation_media
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class ValClip:
    """One validation clip: LQ and GT RGB uint8 frames and a frame rate."""

    name: str
    lq: list[np.ndarray]
    gt: list[np.ndarray]
    fps: Fraction


def _source(path: Path):
    return video_source(path) if path.is_file() else probe_frames(path)


def _entries(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES:
            out[p.stem if p.is_file() else p.name] = p
    return out


def folder_clips(cfg: ValidationConfig) -> list[ValClip]:
    """Pairs of ``lq_dir`` / ``gt_dir`` entries with the same stem (videos or frame folders)."""
    lq_dir, gt_dir = Path(cfg.lq_dir), Path(cfg.gt_dir)
    for key, d in (("validation.lq_dir", lq_dir), ("validation.gt_dir", gt_dir)):
        if not d.is_dir():
            raise ConfigError(f"{key}={str(d)!r} is not a folder")
    lq, gt = _entries(lq_dir), _entries(gt_dir)
    names = sorted(set(lq) & set(gt))[: cfg.max_clips]
    if not names:
        raise ConfigError(f"no clip name is in both {lq_dir} and {gt_dir} (videos {VIDEO_SUFFIXES} or frame "
                          f"folders {IMAGE_SUFFIXES}, paired by name)")
    clips = []
    for name in names:
        s_lq, s_gt = _source(lq[name]), _source(gt[name])
        clips.append(ValClip(name, list(s_lq.frames(cfg.max_frames)), list(s_gt.frames(cfg.max_frames)),
                             s_lq.fps or s_gt.fps or Fraction(cfg.fps).limit_denominator(1000)))
    return clips


def shard_clips(cfg: ValidationConfig) -> list[ValClip]:
    """The first ``max_clips`` complete samples of a shard set (LQ / HR PNG frames)."""
    import webdataset as wds

    from dlightning.contracts.shard_format import HR, LQ, decode_png, frame_field, manifest_shard_files, read_manifest
    from dlightning.data.loader import SkipCounter, validate_samples

    folder = Path(cfg.shards)
    try:
        files = manifest_shard_files(read_manifest(folder))
    except ConfigError as err:
        raise ConfigError(f"validation.shards={cfg.shards!r}: {err}") from err
    urls = [str(folder / f) for f in files]
    counter = SkipCounter()
    samples = validate_samples(wds.tarfile_to_samples(handler=counter.handler)(iter([{"url": u} for u in urls])),
                               counter=counter, min_frames=2)
    clips = []
    for sample in samples:
        n = min(int(sample["__meta__"]["num_frames"]), cfg.max_frames)
        lq = [decode_png(sample[frame_field(LQ, i)]) for i in range(n)]
        gt = [decode_png(sample[frame_field(HR, i)]) for i in range(n)]
        fps = sample["__meta__"].get("fps") or cfg.fps
        clips.append(ValClip(sample["__key__"], lq, gt, Fraction(float(fps)).limit_denominator(1000)))
        if len(clips) >= cfg.max_clips:
            break
    if not clips:
        raise ConfigError(f"validation.shards={cfg.shards!r} yielded no usable sample")
    return clips


def load_clips(cfg: ValidationConfig) -> list[ValClip]:
    """Validation clips of ``cfg`` (folder pairs or shards)."""
    if cfg.lq_dir is not None:
        return folder_clips(cfg)
    if cfg.shards is not None:
        return shard_clips(cfg)
    raise ConfigError("validation needs validation.lq_dir + validation.gt_dir or validation.shards")


def _to01(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def temporal_profile(panels: list[np.ndarray]) -> np.ndarray:
    """Middle pixel column of each panel ``(T, H, W, 3)`` over time, panels side by side: ``(H, sum T, 3)``."""
    cols = [p[:, :, p.shape[2] // 2].transpose(1, 0, 2) for p in panels]  # (H, T, 3)
    sep = np.full((cols[0].shape[0], 2, 3), 255, dtype=np.uint8)
    out = [cols[0]]
    for c in cols[1:]:
        out += [sep, c]
    return np.concatenate(out, axis=1)


def build_flow_net(cfg: ValidationConfig):
    """Frozen flow net for E*warp: SPyNet from ``validation.flow_path`` (None = random, tests only) or
    OpenCV Farneback (``validation.flow_net: farneback``, no weights)."""
    from dlightning.losses.temporal import FarnebackFlow
    from dlightning.models.spynet import load_spynet

    if cfg.flow_net == "farneback":
        return FarnebackFlow()
    return load_spynet(cfg.flow_path, key="validation.flow_path")


def build_lpips_metric(cfg: ValidationConfig):
    """LPIPS for validation, or None when ``compute_lpips`` is off."""
    from dlightning.losses import build_lpips

    return build_lpips(cfg.lpips) if cfg.compute_lpips else None


@torch.no_grad()
def run_validation(generator, clips: list[ValClip], cfg: ValidationConfig, out_dir: Path,
                   metrics: VideoMetrics) -> tuple[dict[str, float], list[tuple[str, Path, Path]]]:
    """Upscale every clip, score it, and write its side-by-side video and profile.

    Returns:
        ``(mean metrics, [(clip name, video path, profile path), ...])``.
    """
    was_training = generator.training
    vae = generator.vae
    tiling = (getattr(vae, "use_tiling", False), getattr(vae, "tile_sample_min_size", None),
              getattr(vae, "tile_latent_min_size", None))
    generator.eval()
    artifacts = []
    try:
        upscaler = Upscaler(generator, cfg.upscale, color_fix_default="none")
        for clip in clips:
            out = list(upscaler.upscale_frames(clip.lq))
            gt = clip.gt[: len(out)]
            h = min(gt[0].shape[0], out[0].shape[0])
            w = min(gt[0].shape[1], out[0].shape[1])
            if (h, w) != gt[0].shape[:2]:
                log.warning("clip %s: GT %s and output %s differ in size; comparing the top-left %dx%d",
                            clip.name, gt[0].shape[:2], out[0].shape[:2], h, w)
            out = [f[:h, :w] for f in out]
            gt = [f[:h, :w] for f in gt]
            m = metrics.add(_to01(out), _to01(gt))
            log.info("validation clip %s: %s", clip.name, {k: round(v, 4) for k, v in m.items()})
            if cfg.write_videos:
                artifacts.append(_write_artifacts(clip, out, gt, out_dir))
    finally:
        generator.train(was_training)
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = tiling
    return metrics.summary(), artifacts


def _write_artifacts(clip: ValClip, out: list[np.ndarray], gt: list[np.ndarray], out_dir: Path,
                     ) -> tuple[str, Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = out[0].shape[:2]
    lq_up = [cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in clip.lq[: len(out)]]
    video = out_dir / f"{clip.name}.mp4"
    writer = VideoWriter(video, clip.fps)
    try:
        for a, b, c in zip(lq_up, out, gt, strict=True):
            writer.write(np.concatenate([a, b, c], axis=1))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    profile = out_dir / f"{clip.name}_profile.png"
    panels = [np.stack(x) for x in (lq_up, out, gt)]
    cv2.imwrite(str(profile), cv2.cvtColor(temporal_profile(panels), cv2.COLOR_RGB2BGR))
    return clip.name, video, profile


class VideoValidation(L.Callback):
    """Periodic validation during training (rank 0 runs, the others wait at a barrier).

    Args:
        cfg: The validation section.
        run_dir: The run folder; outputs go to ``run_dir/validation/step-XXXXXXXX``.
        clips: Already loaded validation clips (default: loaded from ``cfg`` when first needed).
    """

    def __init__(self, cfg: ValidationConfig, run_dir: str | Path, clips: list[ValClip] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._clips: list[ValClip] | None = clips
        self._flow_net = None
        self._lpips = None
        self._last_step: int | None = None
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the validation data exists before training starts (fail early)."""
        if self.cfg.every_n_steps and trainer.is_global_zero:
            self._clips = load_clips(self.cfg)
            if self.cfg.metrics:
                from dlightning.metrics.suite import check_metric_weights

                check_metric_weights(self.cfg.metrics, self.cfg.metric_weights, "validation.metric_weights")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(pl_module.optimizer_step)
        every = self.cfg.every_n_steps
        if not every or not getattr(pl_module, "at_step_boundary", True) or step % every or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero:
            with self._weights(pl_module):
                self.validate(pl_module.generator, step, trainer.loggers)
        trainer.strategy.barrier("dlightning_validation")

    def _weights(self, pl_module: L.LightningModule) -> contextlib.AbstractContextManager:
        """The averaged weights for ``validation.weights=ema``, else the raw ones as they are."""
        if self.cfg.weights == "raw":
            return contextlib.nullcontext()
        ema = getattr(pl_module, "ema", None)
        if ema is None:
            raise ConfigError("validation.weights=ema needs optim.ema.enabled=true")
        return ema.applied()

    def _extra_metrics(self, device: torch.device):
        """``validation.metrics`` as a MetricSuite, built once (None when the list is empty)."""
        if self.cfg.metrics and getattr(self, "_extra", None) is None:
            from dlightning.metrics.suite import MetricSuite

            self._extra = MetricSuite(self.cfg.metrics, self.cfg.metric_weights, device=device,
                                      key_prefix="validation.metric_weights", crop_border=self.cfg.crop_border)
        return getattr(self, "_extra", None)

    def validate(self, generator, step: int, loggers: list | None = None) -> dict[str, float]:
        """Run validation for ``step`` (on the calling process) and log to ``loggers``."""
        if self._clips is None:
            self._clips = load_clips(self.cfg)
        if self._flow_net is None:
            self._flow_net = build_flow_net(self.cfg)
            self._lpips = build_lpips_metric(self.cfg)
        device = next(generator.parameters()).device
        self._flow_net.to(device)
        if self._lpips is not None:
            self._lpips.to(device)
        metrics = VideoMetrics(self._flow_net, self._lpips, self.cfg.crop_border, self.cfg.y_channel,
                               extra=self._extra_metrics(device))
        out_dir = validation_dir(self.run_dir, step)
        summary, artifacts = run_validation(generator, self._clips, self.cfg, out_dir, metrics)
        self.last_metrics = {f"val/{k}": v for k, v in summary.items()}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({"step": step, **self.last_metrics,
                                                          "per_clip": metrics.per_clip}, indent=2))
        per_clip = list(zip((clip.name for clip in self._clips), metrics.per_clip, strict=False))
        _log(loggers or [], self.last_metrics, step)
        log_validation_media(loggers or [], step, [ClipMedia(*a) for a in artifacts], per_clip)
        return self.last_metrics


def _log(loggers: list, metrics: dict[str, float], step: int) -> None:
    undefined = sorted(k for k, v in metrics.items() if math.isnan(v) and k.startswith("val/ewarp"))
    if undefined:
        # E*warp is undefined when the occlusion mask leaves no visible pixel; say so rather than log NaN.
        log.warning("step %d: %s undefined on every clip (see metrics.json); not logged", step, undefined)
    broken = sorted(k for k, v in metrics.items() if math.isnan(v) and k not in undefined)
    if broken:
        log.error("step %d: %s are NaN: the generator's output is not finite (logged as NaN)", step, broken)
    shown = {k: v for k, v in metrics.items() if k not in undefined}
    for logger in loggers:
        logger.log_metrics({**shown, "val/optimizer_step": float(step)}, step=step)

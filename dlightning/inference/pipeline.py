"""Video upscaling with a (merged or training) DLoRAL generator.

Per video: every frame t is produced from the window (t - 1, t), frame 0 from (0, 0), as the generator
does. Windows are batched (``batch_windows`` per UNet call). Per frame (docs/METHOD.md 1.5, 7.4-7.6):

1. RGB uint8 -> [-1, 1]; a frame whose short side is below ``min_short_side`` is first bicubic-enlarged
   so that its short side equals it; then replicate-padded so that ``side * scale`` is a multiple of 8.
2. Generator pieces: bicubic x scale, VAE encode (tiled above ``vae_tile_size`` px: shared GroupNorm
   statistics by default, :mod:`~dlightning.inference.tiled_vae`, or diffusers' tiling), CFR + UNet
   (:meth:`denoise`, latent tiles with Gaussian blending when the latent area exceeds ``tile_size^2``;
   tile starts on the UNet's downsampling grid), x0 rule, VAE decode (tiled as the encode). Latent
   tiling and diffusers' VAE tiling approximate the whole-frame result; the shared-statistics VAE
   tiling matches it up to the receptive field beyond its padding (docs/INFERENCE.md has the numbers).
3. Colour fix against the bicubic-upsampled LQ, crop the padding, and resize to exactly
   ``scale x original size`` when the frame was enlarged.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dlightning.errors import ConfigError
from dlightning.inference.colorfix import color_fix
from dlightning.inference.config import UpscaleConfig
from dlightning.inference.tiled_vae import shared_norm_tiling
from dlightning.inference.tiling import needs_tiling, tiled_denoise, unet_alignment
from dlightning.inference.video_io import (
    FrameFolderWriter,
    InputError,
    VideoSource,
    VideoWriter,
    collect_inputs,
    is_video_path,
)
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU.

    Raises:
        ConfigError: a CUDA device is named but none is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"upscale.device={name!r} but no CUDA GPU is visible; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA (fp16 without bf16 support), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _to_tensor(frames: list[np.ndarray], device: torch.device) -> torch.Tensor:
    arr = torch.from_numpy(np.stack(frames)).to(device)
    return arr.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(images01: torch.Tensor) -> list[np.ndarray]:
    arr = (images01.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


class Upscaler:
    """Runs a generator over frame sequences.

    Args:
        model: A :class:`~dlightning.models.generator.DLoRALGenerator` or an exported one, already on
            its device and dtype.
        cfg: Inference settings.
        color_fix_default: Colour fix when ``cfg.color_fix`` is None.
        prompt_default: Prompt when ``cfg.prompt`` is None.
    """

    def __init__(self, model, cfg: UpscaleConfig, color_fix_default: str = "adain", prompt_default: str = "",
                 ) -> None:
        self.model = model
        self.cfg = cfg
        self.scale = int(model.cfg.scale)
        self.color_fix = cfg.color_fix if cfg.color_fix is not None else color_fix_default
        self.prompt = cfg.prompt if cfg.prompt is not None else prompt_default
        # The frozen VAE carries the compute dtype (a training generator keeps its trainables in fp32).
        param = next(model.vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._pad_multiple = 8 // math.gcd(8, self.scale)
        self._tile_align = unet_alignment(model)
        if cfg.vae_tile_size > 0 and cfg.vae_tiling == "diffusers":
            vae = model.vae
            vae.enable_tiling()
            vae.tile_sample_min_size = cfg.vae_tile_size
            vae.tile_latent_min_size = cfg.vae_tile_size // 8
        if cfg.channels_last:
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        if cfg.compile:
            model.unet = torch.compile(model.unet)

    # ------------------------------------------------------------------ frames
    def _prepare(self, lq: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Enlarge small frames and pad; returns the padded LR batch and its unpadded size."""
        h, w = lq.shape[-2:]
        short = min(h, w)
        if 0 < short < self.cfg.min_short_side:
            f = self.cfg.min_short_side / short
            size = (max(round(h * f), self.cfg.min_short_side), max(round(w * f), self.cfg.min_short_side))
            lq = F.interpolate(lq, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        h2, w2 = lq.shape[-2:]
        m = self._pad_multiple
        pad_h, pad_w = (-h2) % m, (-w2) % m
        if pad_h or pad_w:
            lq = F.pad(lq, (0, pad_w, 0, pad_h), mode="replicate")
        return lq, (h2, w2)

    def _autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _vae_tiling(self):
        """Shared-statistics VAE tiling for frames above ``vae_tile_size`` (diffusers' is set up in __init__)."""
        if self.cfg.vae_tiling != "shared_norm" or self.cfg.vae_tile_size == 0:
            return contextlib.nullcontext()
        return shared_norm_tiling(self.model.vae, self.cfg.vae_tile_size, self.cfg.vae_tile_padding)

    @torch.inference_mode()
    def _run_chunk(self, lq: torch.Tensor, targets: list[int], prevs: list[int], orig: tuple[int, int],
                   ) -> list[np.ndarray]:
        """Frames ``targets`` of the LR chunk ``lq (F, 3, h, w)`` in [-1, 1] -> RGB uint8 HR frames."""
        model, s = self.model, self.scale
        padded, (h2, w2) = self._prepare(lq)
        with self._autocast(), self._vae_tiling():
            up = model.upsample_lq(padded)
            z = model.encode_latents(up.to(self.dtype))
            embeds = model.encode_prompts([self.prompt] * len(targets)).to(self.dtype)
            args = (up[prevs], up[targets], z[prevs], z[targets], embeds)
            lh, lw = z.shape[-2:]
            if needs_tiling(lh, lw, self.cfg.tile_size):
                fused, out = tiled_denoise(model, *args, tile=self.cfg.tile_size, overlap=self.cfg.tile_overlap,
                                           align=self._tile_align)
            else:
                fused, out = model.denoise(*args)
            images = model.decode_latents(model.to_x0(fused.float(), out.float()))
        images = (images.float() + 1) / 2
        images = color_fix(images, (up[targets].float() + 1) / 2, self.color_fix)
        images = images[..., : h2 * s, : w2 * s]
        target = (orig[0] * s, orig[1] * s)
        if images.shape[-2:] != target:
            images = F.interpolate(images, size=target, mode="bicubic", align_corners=False, antialias=True)
        return _to_uint8(images)

    def upscale_frames(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Upscale a frame sequence (RGB uint8 ``(h, w, 3)``), yielding every output frame in order."""
        prev: np.ndarray | None = None
        chunk: list[np.ndarray] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == self.cfg.batch_windows:
                yield from self._flush(prev, chunk)
                prev, chunk = chunk[-1], []
        if chunk:
            yield from self._flush(prev, chunk)

    def _flush(self, prev: np.ndarray | None, chunk: list[np.ndarray]) -> list[np.ndarray]:
        shapes = {f.shape for f in chunk} | ({prev.shape} if prev is not None else set())
        if len(shapes) != 1:
            raise InputError(f"frames of one video must share one size, got {sorted(shapes)}")
        frames = ([prev] if prev is not None else [chunk[0]]) + chunk
        lq = _to_tensor(frames, self.device)
        targets = list(range(1, len(frames)))
        prevs = [t - 1 for t in targets]
        return self._run_chunk(lq, targets, prevs, chunk[0].shape[:2])

    # ------------------------------------------------------------------ files
    def upscale_source(self, source: VideoSource, out: Path) -> Path:
        """Upscale one source into ``out`` (a video when ``out`` has a video suffix, else a frame folder)."""
        if self.cfg.seed is not None:
            torch.manual_seed(self.cfg.seed)
        as_video = is_video_path(out)
        if as_video and source.fps is None:
            raise InputError(f"{source.path} is a frame folder (no frame rate): give an output folder "
                             f"without a video suffix instead of {out}")
        writer = (VideoWriter(out, source.fps, source.path if source.has_audio else None, crf=self.cfg.crf)
                  if as_video else FrameFolderWriter(out))
        total = source.num_frames
        if self.cfg.max_frames:
            total = min(total, self.cfg.max_frames) if total else self.cfg.max_frames
        bar = tqdm(total=total, unit="frame", desc=source.path.name, dynamic_ncols=True)
        start, count = time.perf_counter(), 0
        try:
            for frame in self.upscale_frames(source.frames(self.cfg.max_frames)):
                writer.write(frame)
                count += 1
                bar.update(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        log.info("%s -> %s: %d frames, %.2f frames/s", source.path, out, count,
                 count / max(time.perf_counter() - start, 1e-9))
        return out


def output_paths(sources: list[VideoSource], out: Path) -> list[Path]:
    """Where each source goes: ``out`` itself for one source, ``out/<stem>.mp4`` for a folder of videos."""
    if len(sources) == 1 and not (sources[0].kind == "video" and out.is_dir()):
        return [out]
    if is_video_path(out):
        raise InputError(f"several input videos need an output folder, got the video name {out}")
    return [out / f"{s.path.stem}.mp4" for s in sources]


def upscale_path(model, inp: str | Path, out: str | Path, cfg: UpscaleConfig, *, color_fix_default: str = "adain",
                 prompt_default: str = "") -> list[Path]:
    """Upscale a video, a frame folder or a folder of videos (all inputs are checked first).

    Returns:
        The written outputs.
    """
    sources = collect_inputs(inp)
    targets = output_paths(sources, Path(out))
    upscaler = Upscaler(model, cfg, color_fix_default=color_fix_default, prompt_default=prompt_default)
    return [upscaler.upscale_source(s, t) for s, t in zip(sources, targets, strict=True)]


def upscale_exported(export_dir: str | Path, inp: str | Path, out: str | Path, cfg: UpscaleConfig) -> list[Path]:
    """Load an export folder on the configured device/dtype and upscale ``inp`` into ``out``."""
    from dlightning.contracts.export_format import read_metadata
    from dlightning.inference.exported import load_exported

    sources = collect_inputs(inp)  # fail on bad input before loading the model
    output_paths(sources, Path(out))
    meta = read_metadata(export_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_exported(export_dir, device=device, dtype=dtype)
    return upscale_path(model, inp, out, cfg, color_fix_default=meta.get("color_fix", "adain"),
                        prompt_default=meta.get("prompt", ""))

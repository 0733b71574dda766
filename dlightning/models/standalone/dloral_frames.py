"""Frames in, frames out: the (previous, current) window runner, frame preparation and the colour fix.

docs/METHOD.md 1.5, 7.4-7.6. Every frame t is produced from the window (t - 1, t), frame 0 from (0, 0);
windows are batched (``batch_windows`` per UNet call) and the last frame of a batch is the previous frame
of the next. Per batch:

1. RGB uint8 -> [-1, 1]; a frame whose short side is below ``min_short_side`` is first bicubic-enlarged so
   that its short side equals it; then replicate-padded so that ``side * scale`` is a multiple of 8.
2. The model's one-step pieces: bicubic x scale, VAE encode, CFR + UNet (latent tiles above
   ``tile_size ** 2``), x0 rule, VAE decode, under autocast when the compute dtype is not fp32 and inside
   the caller's VAE context (e.g. a tiled VAE).
3. Colour fix against the bicubic-upsampled LQ, crop the padding, resize to exactly ``scale x`` the
   original size when the frame was enlarged, round to uint8.

Standalone-safe (torch, numpy and diffusers only): ``dlightning export`` copies this file verbatim next to
the export's ``pipeline.py``; ``dlightning upscale`` runs the same :class:`WindowRunner`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dloral_onestep import needs_tiling, tiled_denoise, unet_alignment

COLOR_FIXES = ("adain", "wavelet", "none")
_EPS = 1e-5
_WAVELET_LEVELS = 5


# ---------------------------------------------------------------------------------------------- colour fix
def adain_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and standard deviation of ``output`` to those of ``reference``.

    Both ``(N, 3, H, W)`` in [0, 1]; the result is clamped to [0, 1].
    """
    dims = (-2, -1)
    o_mean, o_std = output.mean(dims, keepdim=True), output.std(dims, keepdim=True)
    r_mean, r_std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
    return ((output - o_mean) / (o_std + _EPS) * r_std + r_mean).clamp(0.0, 1.0)


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with holes (a trous), replicate padding."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4.0
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = _WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` of an a-trous decomposition at dilations 1, 2, 4, ...; ``high + low == x``."""
    low = x
    for i in range(levels):
        low = _blur(low, 2**i)
    return x - low, low


def wavelet_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of ``output`` plus the low frequencies of ``reference``, clamped to [0, 1]."""
    high, _ = wavelet_decompose(output)
    _, low = wavelet_decompose(reference)
    return (high + low).clamp(0.0, 1.0)


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` (adain | wavelet | none) to ``(N, 3, H, W)`` images in [0, 1]."""
    if method == "adain":
        return adain_color_fix(output, reference)
    if method == "wavelet":
        return wavelet_color_fix(output, reference)
    if method == "none":
        return output
    raise ValueError(f"color fix {method!r} is not valid; choose adain, wavelet or none")


# ---------------------------------------------------------------------------------------------- frame sizes
def pad_multiple(scale: int) -> int:
    """LR sides are padded to a multiple of this so that ``side * scale`` is a multiple of 8."""
    return 8 // math.gcd(8, scale)


def enlarged_size(height: int, width: int, min_short_side: int) -> tuple[int, int]:
    """The LR size after the bicubic enlargement of frames whose short side is below ``min_short_side``."""
    short = min(height, width)
    if not 0 < short < min_short_side:
        return height, width
    f = min_short_side / short
    return max(round(height * f), min_short_side), max(round(width * f), min_short_side)


def processed_size(height: int, width: int, scale: int, min_short_side: int) -> tuple[int, int]:
    """The HR size the model works at for an LR frame: enlarged, padded, times ``scale``."""
    h, w = enlarged_size(height, width, min_short_side)
    m = pad_multiple(scale)
    return (h + (-h) % m) * scale, (w + (-w) % m) * scale


def prepare_frames(lq: torch.Tensor, min_short_side: int, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Enlarge small frames and replicate-pad to ``multiple``; returns the padded batch and its unpadded size."""
    h, w = lq.shape[-2:]
    size = enlarged_size(h, w, min_short_side)
    if size != (h, w):
        lq = F.interpolate(lq, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    h2, w2 = lq.shape[-2:]
    pad_h, pad_w = (-h2) % multiple, (-w2) % multiple
    if pad_h or pad_w:
        lq = F.pad(lq, (0, pad_w, 0, pad_h), mode="replicate")
    return lq, (h2, w2)


def frames_to_tensor(frames: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """RGB uint8 frames ``(h, w, 3)`` -> ``(F, 3, h, w)`` in [-1, 1] on ``device``."""
    arr = torch.from_numpy(np.stack(frames)).to(device)
    return arr.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_to_uint8(images01: torch.Tensor) -> list[np.ndarray]:
    """``(F, 3, H, W)`` images in [0, 1] -> RGB uint8 frames ``(H, W, 3)`` (rounded)."""
    arr = (images01.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


@contextlib.contextmanager
def diffusers_vae_tiling(vae, tile_px: int) -> Iterator[None]:
    """Within the block, diffusers' own VAE tiling with ``tile_px`` pixel tiles; the VAE is restored after."""
    saved = (getattr(vae, "use_tiling", False), vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_px, tile_px // 8
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


# ---------------------------------------------------------------------------------------------- runner
class FrameSizeError(ValueError):
    """The frames of one sequence do not share one size."""


@dataclass(frozen=True)
class WindowSettings:
    """How frames are batched, prepared, tiled and colour-fixed (``dlightning upscale``'s defaults)."""

    batch_windows: int = 4
    """(previous, current) windows per UNet call."""
    min_short_side: int = 128
    """LR frames with a shorter short side are bicubic-enlarged to it first (0 = never)."""
    tile_size: int = 96
    """Latent tile side; the latent is tiled when its area exceeds ``tile_size ** 2``."""
    tile_overlap: int = 32
    """Latent overlap of neighbouring tiles."""
    color_fix: str = "adain"
    """adain | wavelet | none."""
    reuse_latents: bool = True
    """Encode each frame once per sequence: a chunk takes the previous chunk's last frame (its HR-size input
    and latent) as is instead of encoding it again. Only with deterministic (``mode``) latents, whose values
    it does not change; sampled latents keep one draw per window, as before."""

    def __post_init__(self) -> None:
        if self.batch_windows < 1 or self.min_short_side < 0:
            raise ValueError("batch_windows must be >= 1 and min_short_side >= 0")
        if self.tile_size < 8 or not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError("tile_size must be >= 8 and 0 <= tile_overlap < tile_size")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={self.color_fix!r}; choose one of {list(COLOR_FIXES)}")


class WindowRunner:
    """Upscales a frame sequence window by window with a one-step model.

    Args:
        model: The training generator, the package's exported generator or a
            :class:`~.dloral_onestep.OneStepModel`: anything with ``upsample_lq``, ``encode_latents``,
            ``encode_prompts``, ``denoise``, ``to_x0``, ``decode_latents``, ``unet`` and ``vae_latent``.
        scale: The model's super-resolution factor.
        settings: Batching, preparation, tiling and colour fix.
        prompt: The prompt of every frame.
        dtype: Compute dtype (autocast when not fp32).
        device: Where the frames go.
        vae_context: Called around each batch's VAE work (e.g. a tiled VAE); default none.
        generator: Random stream of sampled VAE latents (None = torch's global one).
    """

    def __init__(self, model, scale: int, settings: WindowSettings, prompt: str = "", *, dtype: torch.dtype,
                 device: torch.device, vae_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.scale, self.settings, self.prompt = model, int(scale), settings, prompt
        self.dtype, self.device, self.generator = dtype, torch.device(device), generator
        self.vae_context = vae_context or contextlib.nullcontext
        self._pad_multiple = pad_multiple(self.scale)
        self._tile_align = unet_alignment(model)
        self._reuse = settings.reuse_latents and getattr(model, "vae_latent", "mode") == "mode"
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None

    def upscale(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Upscale RGB uint8 frames ``(h, w, 3)`` of one sequence, yielding every output frame in order.

        Raises:
            FrameSizeError: Two frames differ in size.
        """
        prev: np.ndarray | None = None
        chunk: list[np.ndarray] = []
        self._carry = None
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == self.settings.batch_windows:
                yield from self._flush(prev, chunk)
                prev, chunk = chunk[-1], []
        if chunk:
            yield from self._flush(prev, chunk)

    def _flush(self, prev: np.ndarray | None, chunk: list[np.ndarray]) -> list[np.ndarray]:
        shapes = {f.shape for f in chunk} | ({prev.shape} if prev is not None else set())
        if len(shapes) != 1:
            raise FrameSizeError(f"frames of one video must share one size, got {sorted(shapes)}")
        if self._reuse:
            # The previous chunk's last frame is carried over (prev is not None exactly when it was).
            carry = self._carry if prev is not None else None
            first = 1 if carry is not None else 0
            targets = list(range(first, first + len(chunk)))
            prevs = [max(t - 1, 0) for t in targets]
            return self.run_chunk(frames_to_tensor(chunk, self.device), targets, prevs, chunk[0].shape[:2],
                                  carry=carry)
        frames = ([prev] if prev is not None else [chunk[0]]) + chunk
        lq = frames_to_tensor(frames, self.device)
        targets = list(range(1, len(frames)))
        prevs = [t - 1 for t in targets]
        return self.run_chunk(lq, targets, prevs, chunk[0].shape[:2])

    def _autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def one_step(self, up: torch.Tensor, targets: list[int], prevs: list[int], z: torch.Tensor | None = None,
                 ) -> torch.Tensor:
        """The model on HR-size frames ``up (F, 3, H, W)`` in [-1, 1]: encode (unless their latents ``z`` are
        given), CFR + UNet (tiled when the latent is large), decode; returns the target frames' images in
        [-1, 1]. Runs in the caller's autocast and VAE context."""
        model, cfg = self.model, self.settings
        if z is None:
            z = model.encode_latents(up.to(self.dtype), generator=self.generator)
        embeds = model.encode_prompts([self.prompt] * len(targets)).to(self.dtype)
        args = (up[prevs], up[targets], z[prevs], z[targets], embeds)
        if needs_tiling(*z.shape[-2:], cfg.tile_size):
            fused, out = tiled_denoise(model, *args, tile=cfg.tile_size, overlap=cfg.tile_overlap,
                                       align=self._tile_align)
        else:
            fused, out = model.denoise(*args)
        return model.decode_latents(model.to_x0(fused.float(), out.float()))

    @torch.inference_mode()
    def run_chunk(self, lq: torch.Tensor, targets: list[int], prevs: list[int], orig: tuple[int, int],
                  carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[np.ndarray]:
        """Frames ``targets`` of the LR chunk ``lq (F, 3, h, w)`` in [-1, 1] -> RGB uint8 HR frames.

        Args:
            lq: The chunk's LR frames.
            targets: Indices of the frames to produce.
            prevs: The previous frame of each target.
            orig: The LR frame size before enlargement and padding.
            carry: The HR-size input and latent of a frame that precedes ``lq`` (index 0 of the targets'
                numbering), already computed by the previous chunk.
        """
        model, s, cfg = self.model, self.scale, self.settings
        padded, (h2, w2) = prepare_frames(lq, cfg.min_short_side, self._pad_multiple)
        with self._autocast(), self.vae_context():
            up = model.upsample_lq(padded)
            z = model.encode_latents(up.to(self.dtype), generator=self.generator)
            if carry is not None:
                up, z = torch.cat([carry[0], up]), torch.cat([carry[1], z])
            self._carry = (up[-1:].clone(), z[-1:].clone())
            images = self.one_step(up, targets, prevs, z=z)
        images = (images.float() + 1) / 2
        images = color_fix(images, (up[targets].float() + 1) / 2, cfg.color_fix)
        images = images[..., : h2 * s, : w2 * s]
        target = (orig[0] * s, orig[1] * s)
        if images.shape[-2:] != target:
            images = F.interpolate(images, size=target, mode="bicubic", align_corners=False, antialias=True)
        return images_to_uint8(images)

"""The reference pipeline's pre- and post-processing, in PIL and uint8 (``upscale.reference_io=true``).

dlightning's own path works in float: bicubic x scale with torch, replicate padding to a multiple of 8,
an antialiased torch resize of enlarged frames and rounding to uint8. The public reference does each step
in PIL on uint8 images, and the released weights' published outputs come from that path. This module
reproduces it step by step (docs/METHOD.md 1.5, 7.6):

Pre-processing of each LR frame (uint8 RGB):

1. short side below ``min_short_side``: PIL bicubic resize by ``min_short_side / short`` (sizes truncated
   to integers, as the reference's ``int(...)``);
2. PIL ``resize((scale W, scale H))`` with Pillow's default filter for RGB (bicubic);
3. PIL LANCZOS resize down to the nearest multiple of 8 (Pillow returns a copy when the size is
   unchanged, so this is a no-op for even sides).

Post-processing of each decoded frame (in [-1, 1]):

1. ``x * 0.5 + 0.5`` clamped to [0, 1], then torchvision's ``ToPILImage``: ``x * 255`` truncated to uint8;
2. the colour fix on those uint8 images against the pre-processed LQ (both read back as ``/ 255``), the
   reference's AdaIN form (``std = sqrt(var + 1e-5)``, unbiased variance) or its wavelet form, and
   ``ToPILImage`` again (the second truncation);
3. an enlarged frame is PIL-bicubic resized to ``scale x`` its original size.

PIL is used itself, rather than an imitation in torch, so the pixels are Pillow's by construction.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dlightning.models.standalone.dloral_frames import WindowRunner, wavelet_color_fix

_ADAIN_EPS = 1e-5


def reference_preprocess(frame: np.ndarray, scale: int, min_short_side: int) -> np.ndarray:
    """One LR frame ``(h, w, 3)`` uint8 -> the reference's HR-size model input ``(H, W, 3)`` uint8."""
    img = Image.fromarray(frame)
    w, h = img.size
    short = min(w, h)
    if 0 < short < min_short_side:
        f = min_short_side / short
        img = img.resize((int(f * w), int(f * h)), Image.BICUBIC)
    img = img.resize((img.width * scale, img.height * scale), Image.BICUBIC)
    img = img.resize((img.width // 8 * 8, img.height // 8 * 8), Image.LANCZOS)
    return np.asarray(img)


def truncate_uint8(images01: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [0, 1] -> ``(N, H, W, 3)`` uint8 as ``ToPILImage`` does it (``x * 255`` truncated)."""
    return (images01.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def reference_adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The reference's AdaIN colour fix of ``(N, 3, H, W)`` images in [0, 1] (``std = sqrt(var + eps)``)."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + _ADAIN_EPS).sqrt()[..., None, None]

    t_mean, t_std = stats(target)
    s_mean, s_std = stats(source)
    return ((target - t_mean) / t_std * s_std + s_mean).clamp(0, 1)


def reference_postprocess(decoded: torch.Tensor, lq_up: np.ndarray, color_fix: str,
                          final_size: tuple[int, int] | None) -> list[np.ndarray]:
    """Decoded frames ``(N, 3, H, W)`` in [-1, 1] -> uint8 frames, the reference's way.

    Args:
        decoded: The VAE output.
        lq_up: The pre-processed LQ of the same frames, ``(N, H, W, 3)`` uint8 (the colour-fix source).
        color_fix: adain | wavelet | none.
        final_size: ``(height, width)`` to PIL-bicubic resize to (an enlarged frame), or None.
    """
    first = truncate_uint8((decoded.float() * 0.5 + 0.5).clamp(0, 1))
    if color_fix != "none":
        target = torch.from_numpy(first).permute(0, 3, 1, 2).double() / 255
        source = torch.from_numpy(np.ascontiguousarray(lq_up)).permute(0, 3, 1, 2).double() / 255
        fixed = reference_adain(target, source) if color_fix == "adain" else wavelet_color_fix(target, source)
        first = truncate_uint8(fixed)
    frames = list(first)
    if final_size is not None and frames[0].shape[:2] != final_size:
        frames = [np.asarray(Image.fromarray(f).resize((final_size[1], final_size[0]), Image.BICUBIC))
                  for f in frames]
    return frames


class ReferenceWindowRunner(WindowRunner):
    """:class:`WindowRunner` with the reference's PIL / uint8 pre- and post-processing (module docstring).

    The model part (VAE encode, CFR + UNet with latent tiles, x0 rule, VAE decode) is the same as
    WindowRunner's; only how LR frames become the HR-size input and how outputs become uint8 differ.
    """

    def _flush(self, prev: np.ndarray | None, chunk: list[np.ndarray]) -> list[np.ndarray]:
        shapes = {f.shape for f in chunk} | ({prev.shape} if prev is not None else set())
        if len(shapes) != 1:
            from dlightning.models.standalone.dloral_frames import FrameSizeError

            raise FrameSizeError(f"frames of one video must share one size, got {sorted(shapes)}")
        frames = ([prev] if prev is not None else [chunk[0]]) + chunk
        up = np.stack([reference_preprocess(f, self.scale, self.settings.min_short_side) for f in frames])
        h, w = chunk[0].shape[:2]
        enlarged = 0 < min(h, w) < self.settings.min_short_side
        final = (h * self.scale, w * self.scale) if enlarged else None
        return self._run_reference(up, final)

    @torch.inference_mode()
    def _run_reference(self, up_uint8: np.ndarray, final: tuple[int, int] | None) -> list[np.ndarray]:
        up = torch.from_numpy(up_uint8).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        targets = list(range(1, up.shape[0]))
        with self._autocast(), self.vae_context():
            images = self.one_step(up, targets, [t - 1 for t in targets])
        return reference_postprocess(images.clamp(-1, 1), up_uint8[targets], self.settings.color_fix, final)

"""The second-order degradation in torch, on the training device (docs/DATA.md 1.8).

:func:`degrade_batch` applies the parameters that :func:`~dlightning.degradation.sampling.sample_params`
drew for each clip (the same dicts the offline builder stores in ``deg.json``) to a batch of HR clips on
whatever device they are on, in the order of :func:`~dlightning.degradation.operators.degrade_clip`:

stage 1: blur(k1) -> resize by a factor of the HR size -> noise -> clip -> JPEG;
stage 2: blur(k2) -> resize by a factor of the LQ size -> noise -> clip -> [resize + sinc] / JPEG in the
drawn order; round to 8-bit levels; then the video codec where the clip drew one.

The stage-1 blur runs on the whole micro-batch at once (one grouped convolution, each clip with its
own kernel). Every later step runs on the frames of one clip at a time, because each clip draws its
own resize factors and so has its own intermediate sizes. Noise is drawn from a ``torch.Generator``
per clip, seeded by the clip's ``noise_seed``, so the output is a function of the HR clip, the
parameters and the seed (bit-identical on CPU from run to run).

Where the operators differ from the OpenCV path: filtering is a direct convolution with the kernel
(OpenCV's path uses a separable approximation within 1e-4 L1); ``area`` resizing uses OpenCV's
overlap weights as two small matrix products (:func:`area_matrix`); Poisson counts
come from ``torch.poisson`` (OpenCV's path uses a rounded normal above rate 64). JPEG is libjpeg
through ``torchvision.io`` on CPU (bit-identical to OpenCV's encoder for the same input) and nvJPEG on
CUDA. A video codec has no device implementation: ``codec="cpu"`` moves the clip's uint8 frames to
the host, runs the offline PyAV codec (:func:`~dlightning.degradation.codec.compress_clip`) and moves
the result back; ``codec="skip"`` leaves the step out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from dlightning.degradation import kernels

CODEC_MODES: tuple[str, ...] = ("cpu", "skip")
"""How a drawn video-codec step runs online: on the host with PyAV, or not at all."""
GRAY = (0.299, 0.587, 0.114)
"""RGB weights of the gray noise source (OpenCV's ``COLOR_RGB2GRAY``)."""


# ----------------------------------------------------------------------------------------- operators


def _reflect101_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source indices of a reflect-101 padding of ``pad`` on both sides of a length-``n`` axis.

    ``F.pad(mode="reflect")`` needs ``pad < n``; OpenCV's reflect-101 keeps reflecting for any pad
    (small intermediate frames meet 21x21 kernels), so the indices are computed here.
    """
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of ``x`` with its image's kernel, reflect-101 borders (``cv2.filter2D``).

    Args:
        x: ``(N, C, H, W)`` float.
        kernel: ``(N, k, k)`` (one odd-sized kernel per image) or ``(k, k)`` (one for all).

    Returns:
        ``(N, C, H, W)``.
    """
    n, c, h, w = x.shape
    if kernel.dim() == 2:
        kernel = kernel.expand(n, -1, -1)
    k = kernel.shape[-1]
    pad = k // 2
    if pad < h and pad < w:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # torch's reflect is OpenCV's reflect-101
    else:
        padded = x.index_select(2, _reflect101_index(h, pad, x.device))
        padded = padded.index_select(3, _reflect101_index(w, pad, x.device))
    weight = kernel.to(x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k): one per channel
    out = F.conv2d(padded.reshape(1, n * c, h + 2 * pad, w + 2 * pad), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def area_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n_out, n_in)`` weights of OpenCV's ``INTER_AREA`` along one axis: output pixel i averages the
    input over ``[i * s, (i + 1) * s)``, ``s = n_in / n_out``, each input pixel weighted by its overlap.

    Written here because ``F.interpolate(mode="area")`` is adaptive average pooling (whole-pixel bins, and
    pixel repetition when enlarging), which differs from OpenCV by several 8-bit levels on real images;
    the overlap weights are OpenCV's for shrinking and for enlarging alike.
    """
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64).unsqueeze(1) * s
    j = torch.arange(n_in, dtype=torch.float64).unsqueeze(0)
    overlap = (torch.minimum(lo + s, j + 1) - torch.maximum(lo, j)).clamp(min=0.0)
    return (overlap / s).to(device=device, dtype=dtype)


def resize(x: torch.Tensor, size_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``size_hw`` with ``area`` / ``bilinear`` / ``bicubic`` (no antialias)."""
    size = (max(1, int(size_hw[0])), max(1, int(size_hw[1])))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        rows = area_matrix(x.shape[-2], size[0], x.device, x.dtype)
        cols = area_matrix(x.shape[-1], size[1], x.device, x.dtype)
        return rows @ x @ cols.T
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    raise ValueError(f"unknown resize mode {mode!r}; expected area, bilinear or bicubic")


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Float in about [0, 1] -> uint8 levels, rounding half to even and saturating (as the offline path)."""
    return (x * 255.0).round().clamp(0.0, 255.0).to(torch.uint8)


def add_noise(x: torch.Tensor, noise: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Add one fresh noise realisation per frame of ``x`` ``(T, 3, H, W)`` and clip to [0, 1]."""
    t, _, h, w = x.shape
    if noise["type"] == "gaussian":
        shape = (t, 1 if noise["gray"] else 3, h, w)
        n = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype) * (noise["sigma"] / 255.0)
    else:
        src = (x * torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True) \
            if noise["gray"] else x
        n = poisson_noise(src, float(noise["scale"]), generator)
    return (x + n).clamp(0.0, 1.0)


def poisson_noise(x: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Signal-dependent noise per frame, with as many photon levels as the frame has 8-bit values
    (rounded up to a power of two): ``scale * (Poisson(q * photons / 255) / photons - q / 255)``."""
    q = quantise(x)
    frames = q.shape[0]
    offsets = torch.arange(frames, device=x.device).view(-1, *([1] * (q.dim() - 1))) * 256
    present = torch.bincount((q.long() + offsets).flatten(), minlength=256 * frames).view(frames, 256) > 0
    levels = present.sum(1).clamp(min=1).double()
    photons = torch.exp2(torch.ceil(torch.log2(levels))).to(x.dtype).view(-1, *([1] * (q.dim() - 1)))
    mean = q.to(x.dtype) / 255.0
    counts = torch.poisson(mean * photons, generator=generator)
    return (counts / photons - mean) * scale


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress every frame of ``x`` ``(T, 3, H, W)`` at ``quality`` with torchvision (libjpeg on
    CPU, nvJPEG on CUDA) and decode it back to float in [0, 1]."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    frames = list(quantise(x).contiguous().unbind(0))
    # the decoder takes its input bytes on the host whatever the device (a few kB per frame)
    encoded = [e.cpu() for e in encode_jpeg(frames, quality=int(quality))]
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=x.device)
    return torch.stack(decoded).to(x.dtype) / 255.0


def video_codec(x: torch.Tensor, codec: dict[str, Any]) -> torch.Tensor:
    """The offline PyAV codec on the host: ``(T, 3, H, W)`` float -> the decoded clip, on ``x``'s device."""
    from dlightning.degradation.codec import compress_clip

    frames = quantise(x).permute(0, 2, 3, 1).cpu().numpy()
    out = torch.from_numpy(np.ascontiguousarray(compress_clip(frames, codec)))
    return out.permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0


def kernel_tensor(spec: dict[str, Any] | None, device: torch.device, pad_to: int | None = None) -> torch.Tensor:
    """A kernel spec as a float32 tensor on ``device`` (trimmed to its own size unless ``pad_to``)."""
    if spec is None:
        spec = {"type": "identity", "size": 1}
    size = int(spec["size"]) if pad_to is None else pad_to
    return torch.from_numpy(kernels.build_kernel(spec, pad_to=size)).to(device)


# ----------------------------------------------------------------------------------------- pipeline


def _scaled(size_hw: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, int(size_hw[0] * factor)), max(1, int(size_hw[1] * factor))


def _stage_rest(x: torch.Tensor, stage: dict[str, Any], size_hw: tuple[int, int],
                generator: torch.Generator) -> torch.Tensor:
    """Resize -> noise (clipped) of one clip's stage (its blur already applied)."""
    return add_noise(resize(x, size_hw, stage["resize"]["mode"]), stage["noise"], generator)


def _stage1_blur(hr: torch.Tensor, params: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Stage-1 blur of the whole batch ``(B, T, 3, H, W)`` in one grouped convolution."""
    b, t = hr.shape[:2]
    specs = [p["stage1"]["kernel"] if p["stage1"]["blur"] else None for p in params]
    size = max((int(s["size"]) for s in specs if s is not None), default=0)
    if size == 0:
        return hr
    # every clip's kernel zero-padded to the largest one (an unblurred clip gets the unit pulse)
    stack = torch.stack([kernel_tensor(s, hr.device, pad_to=size) for s in specs])
    flat = blur(hr.reshape(b * t, *hr.shape[2:]), stack.repeat_interleave(t, dim=0))
    return flat.reshape(hr.shape)


def degrade_clip_tensor(x: torch.Tensor, params: dict[str, Any], scale: int, generator: torch.Generator, *,
                        codec: str = "cpu", stage1_blurred: bool = False) -> torch.Tensor:
    """Degrade one clip ``(T, 3, H, W)`` in [0, 1] with its parameters; returns ``(T, 3, H/scale, W/scale)``
    on 8-bit levels in [0, 1].

    Args:
        x: HR frames, float, on any device; H and W divisible by ``scale``.
        params: The clip's parameters from ``sample_params``.
        scale: Super-resolution factor.
        generator: The clip's noise generator (on ``x``'s device).
        codec: ``cpu`` or ``skip`` (see the module docstring).
        stage1_blurred: ``x`` has had stage 1's blur already (:func:`degrade_batch` batches it).
    """
    _, _, h, w = x.shape
    lq_hw = (h // scale, w // scale)
    s1, s2, final = params["stage1"], params["stage2"], params["final"]
    drawn_codec = params.get("codec") if codec == "cpu" else None
    if s1["blur"] and not stage1_blurred:
        x = blur(x, kernel_tensor(s1["kernel"], x.device))
    x = _stage_rest(x, s1, _scaled((h, w), s1["resize"]["scale"]), generator)
    x = jpeg(x, s1["jpeg_quality"])
    if drawn_codec is not None and drawn_codec.get("position") == "stage1":
        x = video_codec(x, drawn_codec)
    if s2["blur"]:
        x = blur(x, kernel_tensor(s2["kernel"], x.device))
    x = _stage_rest(x, s2, _scaled(lq_hw, s2["resize"]["scale"]), generator)
    sinc = kernel_tensor(final["sinc"], x.device) if final["sinc"]["type"] != "identity" else None

    def resize_sinc(y: torch.Tensor) -> torch.Tensor:
        y = resize(y, lq_hw, final["resize_mode"])
        return blur(y, sinc) if sinc is not None else y

    if final["order"] == "resize_sinc_then_jpeg":
        x = jpeg(resize_sinc(x), s2["jpeg_quality"])
    else:
        x = resize_sinc(jpeg(x, s2["jpeg_quality"]))
    x = quantise(x).to(x.dtype) / 255.0
    if drawn_codec is not None and drawn_codec.get("position", "final") == "final":
        x = video_codec(x, drawn_codec)
    return x


def degrade_batch(hr: torch.Tensor, items: Sequence[dict[str, Any]], scale: int, *,
                  codec: str = "cpu") -> torch.Tensor:
    """Degrade a micro-batch of HR clips on their device.

    Args:
        hr: ``(B, T, 3, H, W)`` float in [0, 1]; H and W divisible by ``scale``.
        items: One ``{"params": sample_params(...) dict, "noise_seed": int}`` per clip.
        scale: Super-resolution factor.
        codec: ``cpu`` or ``skip``: how a drawn video-codec step runs (module docstring).

    Returns:
        ``(B, T, 3, H/scale, W/scale)`` LQ clips on 8-bit levels in [0, 1], float32, on ``hr``'s device.

    Raises:
        ValueError: Shapes, item count or codec mode do not fit.
    """
    if hr.dim() != 5 or hr.shape[2] != 3:
        raise ValueError(f"degrade_batch expects (B, T, 3, H, W) clips, got {tuple(hr.shape)}")
    if len(items) != hr.shape[0]:
        raise ValueError(f"{len(items)} degradation items for a batch of {hr.shape[0]} clips")
    if codec not in CODEC_MODES:
        raise ValueError(f"codec={codec!r}; choose one of {list(CODEC_MODES)}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by scale {scale}")
    x = _stage1_blur(hr.float(), [item["params"] for item in items])
    out = []
    for clip, item in zip(x.unbind(0), items, strict=True):
        generator = torch.Generator(device=hr.device)
        generator.manual_seed(int(item["noise_seed"]))
        out.append(degrade_clip_tensor(clip, item["params"], scale, generator, codec=codec, stage1_blurred=True))
    return torch.stack(out)


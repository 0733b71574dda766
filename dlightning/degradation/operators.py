"""The OpenCV + NumPy operators of the second-order degradation, and :func:`degrade_clip` (docs/DATA.md 1.1).

:func:`degrade_clip` applies the parameters drawn once per clip by
:func:`~dlightning.degradation.sampling.sample_params` to every frame; only the noise is drawn per
frame. The ``video`` preset adds codec compression of the clip as one sequence.

Pipeline per frame (float32 RGB in [0, 1]):
stage 1: blur(k1) -> resize up/down/keep -> Gaussian/Poisson noise -> clip -> JPEG;
stage 2: blur(k2) with ``blur_prob`` -> resize relative to HR/scale -> noise -> clip, then with
probability 0.5 ``[resize to HR/scale + final sinc] -> JPEG`` else ``JPEG -> [resize + sinc]``;
round to uint8. Codec compression (``video`` preset) runs on the uint8 clip, by default at the end.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cv2
import numpy as np

from dlightning.degradation import kernels
from dlightning.degradation.codec import compress_clip
from dlightning.degradation.presets import RESIZE_MODE_NAMES

_CV2_INTERPOLATION = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
RESIZE_MODES: dict[str, int] = {name: _CV2_INTERPOLATION[name] for name in RESIZE_MODE_NAMES}
"""OpenCV flag of every resize mode the sampler can draw (a mode without a flag fails at import)."""


# ----------------------------------------------------------------------------------------- operators


def separable_rank_limit(size: int) -> int:
    """Most separable terms worth filtering a ``size x size`` kernel with, rather than one filter2D.

    Kernels whose low-rank (SVD) approximation needs at most this many terms are filtered as a sum of
    separable passes. Measured with OpenCV 5 on one core (512^2 and 256^2 float32 RGB): filter2D
    costs about 2-3 separable passes up to 11x11 (direct), and 5-9 from 13x13 (where it uses a DFT).
    """
    if size <= 11:
        return 2
    return 8 if size <= 15 else 5


SEPARABLE_TOL = 1e-4
"""Largest L1 error of the low-rank approximation (bounds the per-pixel error, well below 0.5/255)."""


def prepare_kernel(spec: dict[str, Any]) -> tuple[Any, ...]:
    """Rebuild a kernel for fast filtering: trimmed of its zero padding, split into separable terms.

    Returns ``("identity", None)`` for the identity kernel (filtering is a no-op),
    ``("sep", [(kx, ky), ...])`` with ``K ~ sum outer(ky, kx)`` (L1 error <= SEPARABLE_TOL; exact for
    isotropic Gaussians; at most :func:`separable_rank_limit` terms) or ``("full", K)``. The trimmed
    padding is exactly zero, so filtering with either form matches filtering with the padded kernel.
    """
    if spec["type"] == "identity":
        return ("identity", None)
    k = kernels.build_kernel(spec, pad_to=int(spec["size"])).astype(np.float64)
    u, s, vt = np.linalg.svd(k)
    approx = np.zeros_like(k)
    for r in range(min(separable_rank_limit(k.shape[0]), len(s))):
        approx += s[r] * np.outer(u[:, r], vt[r])
        if np.abs(k - approx).sum() <= SEPARABLE_TOL:
            terms = [
                ((vt[i] * math.sqrt(s[i])).astype(np.float32), (u[:, i] * math.sqrt(s[i])).astype(np.float32))
                for i in range(r + 1)
            ]
            return ("sep", terms)
    return ("full", k.astype(np.float32))


def blur(img: np.ndarray, kernel: np.ndarray | tuple[Any, ...]) -> np.ndarray:
    """Filter with reflect-101 borders (the padding Real-ESRGAN's ``filter2D`` uses).

    ``kernel`` is a 2-D array or the output of :func:`prepare_kernel`.
    """
    if isinstance(kernel, np.ndarray):
        return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    kind, value = kernel
    if kind == "identity":
        return img
    if kind == "full":
        return cv2.filter2D(img, -1, value, borderType=cv2.BORDER_REFLECT_101)
    out = None
    for kx, ky in value:
        term = cv2.sepFilter2D(img, -1, kx, ky, borderType=cv2.BORDER_REFLECT_101)
        out = term if out is None else cv2.add(out, term)
    return out


def resize(img: np.ndarray, size_hw: tuple[int, int], mode: str) -> np.ndarray:
    """Resize to ``(h, w)`` with ``area``/``bilinear``/``bicubic`` interpolation (no antialias)."""
    h, w = max(1, int(size_hw[0])), max(1, int(size_hw[1]))
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=RESIZE_MODES[mode])


def add_noise(img: np.ndarray, noise: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Add one fresh Gaussian or Poisson noise realisation and clip to [0, 1]."""
    h, w, _ = img.shape
    if noise["type"] == "gaussian":
        shape = (h, w, 1) if noise["gray"] else (h, w, 3)
        n = rng.standard_normal(shape, dtype=np.float32)
        n *= np.float32(noise["sigma"] / 255.0)
    else:
        src = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] if noise["gray"] else img
        n = _poisson_noise(src, rng, noise["scale"])
    # In place where the noise already has the image's shape (colour noise): saves two passes.
    out = np.add(n, img, out=n) if n.shape == img.shape else img + n
    return np.clip(out, 0.0, 1.0, out=out)


POISSON_NORMAL_ABOVE = 64.0
"""Rates at or above this are sampled as round(N(lam, lam)) (clipped at 0) instead of exactly: at
lam >= 64 the two distributions differ by less than the 8-bit quantisation (skewness <= 0.125)."""

_GUIDE_BITS = 12
"""Guide-table resolution (2^12 cells) of the inverse-CDF sampler: most uniforms resolve in one gather."""
_TABLE_LEN = 448
"""Counts tabulated per rate: lam <= 256, so the truncated tail lies beyond mean + 12 sd (mass < 1e-30)."""


@functools.lru_cache(maxsize=16)
def _count_tables(photons: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-8-bit-level CDFs of the photon count and their guide table, for rates ``q * photons / 255``.

    Returns ``(cdf, guide)``: ``cdf`` is the flattened ``[256, _TABLE_LEN]`` table of
    ``P(count <= k)`` (Poisson below ``POISSON_NORMAL_ABOVE``, rounded normal above; the last column
    is 2 so every uniform in [0, 1] is covered). ``guide`` is the flattened ``[256, 2^_GUIDE_BITS]``
    int32 view of int16 pairs ``(lo, hi)``: the inverse CDF of any uniform in cell ``j`` lies in
    ``[lo, hi]`` (Chen-Asau indexed search), so one gather serves both bounds.
    """
    from scipy.special import ndtr, pdtr

    lam = np.arange(256, dtype=np.float64)[:, None] * (photons / 255.0)
    k = np.arange(_TABLE_LEN, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        normal = ndtr((k + 0.5 - lam) / np.sqrt(lam))
    cdf = np.where(lam < POISSON_NORMAL_ABOVE, pdtr(k, lam), normal)
    cdf[:, -1] = 2.0
    edges = np.arange((1 << _GUIDE_BITS) + 1, dtype=np.float64) / (1 << _GUIDE_BITS)
    below = np.stack([np.searchsorted(row, edges, side="right") for row in cdf]).astype(np.int16)
    pairs = np.ascontiguousarray(np.stack([below[:, :-1], below[:, 1:]], axis=-1))
    return np.ascontiguousarray(cdf).ravel(), pairs.view(np.int32).ravel()


def sample_counts(levels: np.ndarray, photons: int, rng: np.random.Generator) -> np.ndarray:
    """Photon counts for 8-bit levels at rates ``levels * photons / 255``, by exact inverse CDF.

    Each count is the inverse CDF (Poisson below ``POISSON_NORMAL_ABOVE``, rounded normal above) of
    one uniform: its cell (12 bits) picks a guide-table entry that pins the count (about 98% of
    draws) or brackets it for a short vectorised binary search, so the distribution is the
    tabulated one up to float64 rounding. Much cheaper than ``rng.poisson`` with a rate array.

    Args:
        levels: uint8 array of 8-bit levels (any shape).
        photons: Photon count of level 255 (a power of two <= 256 in :func:`_poisson_noise`).
        rng: Generator; 16 bits of its bit generator per element, plus a float64 per bracketed one.

    Returns:
        int16 counts, same shape as ``levels``.
    """
    if not 0 < photons <= 256:
        raise ValueError(f"photons={photons} is outside (0, 256]; the count tables cover rates up to 256")
    cdf, guide = _count_tables(int(photons))
    flat = levels.ravel()
    # The uniform's cell comes from 16 random bits per element (four per 64-bit word); only the
    # elements whose cell does not pin the count draw the rest of their uniform, a fresh float64
    # position inside the cell (uniform given the cell, so the uniform is still exact).
    words = rng.bit_generator.random_raw(-(-flat.size // 4))
    cells = words.view(np.uint16)[: flat.size] >> np.uint16(16 - _GUIDE_BITS)
    index = flat.astype(np.intp)
    index <<= _GUIDE_BITS
    index |= cells
    bounds = guide[index].view(np.int16).reshape(-1, 2)
    counts, upper = bounds[:, 0].copy(), bounds[:, 1]
    pos = np.flatnonzero(counts != upper)
    if pos.size:
        u = (cells[pos] + rng.random(pos.size)) * (1.0 / (1 << _GUIDE_BITS))
        row = flat[pos].astype(np.intp) * _TABLE_LEN
        lo, hi = counts[pos].astype(np.intp), upper[pos].astype(np.intp)
        for _ in range(int((hi - lo).max()).bit_length()):
            mid = (lo + hi) >> 1
            above = cdf[row + mid] > u
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid + 1)
        counts[pos] = lo
    return counts.reshape(levels.shape)


def _poisson_noise(img: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Signal-dependent noise with as many photon levels as the image has 8-bit values (rounded up to 2^k).

    Returns ``scale * (counts / photons - q / 255)`` as float32, ``q`` the 8-bit levels of ``img``.
    """
    q = _quantise(img)
    levels = int(np.count_nonzero(np.bincount(q.ravel(), minlength=256)))
    photons = 2 ** math.ceil(math.log2(max(levels, 1)))
    noise = sample_counts(q, photons, rng).astype(np.float32)
    noise *= np.float32(scale / photons)
    mean = q.astype(np.float32)
    mean *= np.float32(scale / 255.0)
    noise -= mean
    return noise


def _quantise(img: np.ndarray) -> np.ndarray:
    """Float image in (about) [0, 1] -> uint8, rounding half to even and saturating."""
    t = img * np.float32(255.0)
    np.rint(t, out=t)
    np.clip(t, 0.0, 255.0, out=t)
    return t.astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress an RGB float image with OpenCV (channels swapped to BGR so chroma is right)."""
    u8 = _quantise(img)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for JPEG quality {quality}")
    dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return _to_float01(dec)


def usm_sharpen(
    frames: np.ndarray, *, radius: int = 51, sigma: float = 0.0, weight: float = 0.5, threshold: float = 10.0
) -> np.ndarray:
    """Unsharp-mask sharpening of uint8 frames with a soft threshold mask (separable cv2.GaussianBlur).

    Args:
        frames: ``(T, H, W, 3)`` uint8.
        radius: Gaussian kernel size (odd); sigma 0 lets OpenCV derive it from the size.
        weight: Residual weight.
        threshold: Residual magnitude (8-bit units) above which sharpening applies (soft edges).
    """
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        img = frame.astype(np.float32) / 255.0
        residual = img - cv2.GaussianBlur(img, (radius, radius), sigma)
        mask = (np.abs(residual) * 255.0 > threshold).astype(np.float32)
        soft = cv2.GaussianBlur(mask, (radius, radius), sigma)
        sharp = np.clip(img + weight * residual, 0.0, 1.0)
        res = soft * sharp + (1.0 - soft) * img
        out[i] = np.clip(np.rint(res * 255.0), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------- pipeline


def _apply_stage(
    clip: list[np.ndarray], stage: dict[str, Any], size_hw: tuple[int, int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Blur -> resize to ``size_hw`` -> noise (per frame) -> clip, for every frame."""
    k = prepare_kernel(stage["kernel"]) if stage["blur"] else None
    out = []
    for img in clip:
        if k is not None:
            img = blur(img, k)
        img = resize(img, size_hw, stage["resize"]["mode"])
        out.append(add_noise(img, stage["noise"], rng))
    return out


def _scaled(size_hw: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, int(size_hw[0] * factor)), max(1, int(size_hw[1] * factor))


def _resize_sinc(clip: list[np.ndarray], final: dict[str, Any], lq_hw: tuple[int, int]) -> list[np.ndarray]:
    k = prepare_kernel(final["sinc"])
    return [blur(resize(img, lq_hw, final["resize_mode"]), k) for img in clip]


def _to_uint8(clip: list[np.ndarray]) -> np.ndarray:
    return np.stack([_quantise(img) for img in clip])


def _to_float01(u8: np.ndarray) -> np.ndarray:
    out = u8.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def _to_float(frames: np.ndarray) -> list[np.ndarray]:
    return [_to_float01(f) for f in frames]


def degrade_clip(
    frames: np.ndarray, params: dict[str, Any], scale: int, rng: np.random.Generator
) -> np.ndarray:
    """Degrade a clip with parameters from ``sample_params``; noise is drawn per frame from ``rng``.

    Args:
        frames: ``(T, H, W, 3)`` uint8 RGB HR frames; H and W divisible by ``scale``.
        params: The clip's parameters (shared by all frames).
        scale: Super-resolution factor; the LQ is ``(H / scale, W / scale)``.
        rng: Generator for the per-frame noise.

    Returns:
        ``(T, H / scale, W / scale, 3)`` uint8 LQ frames.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"degrade_clip expects (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by scale {scale}; crop the frames first")
    lq_hw = (h // scale, w // scale)
    s1, s2, final, codec = params["stage1"], params["stage2"], params["final"], params.get("codec")

    clip = _apply_stage(_to_float(frames), s1, _scaled((h, w), s1["resize"]["scale"]), rng)
    clip = [jpeg(img, s1["jpeg_quality"]) for img in clip]
    if codec is not None and codec.get("position") == "stage1":
        clip = _to_float(compress_clip(_to_uint8(clip), codec))
    clip = _apply_stage(clip, s2, _scaled(lq_hw, s2["resize"]["scale"]), rng)
    if final["order"] == "resize_sinc_then_jpeg":
        clip = [jpeg(img, s2["jpeg_quality"]) for img in _resize_sinc(clip, final, lq_hw)]
    else:
        clip = _resize_sinc([jpeg(img, s2["jpeg_quality"]) for img in clip], final, lq_hw)
    out = _to_uint8(clip)
    if codec is not None and codec.get("position", "final") == "final":
        out = compress_clip(out, codec)
    return out

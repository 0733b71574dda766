"""Colour correction of the output against the bicubic-upsampled LQ frame (docs/METHOD.md 7.6).

Both functions take ``(N, 3, H, W)`` images in [0, 1] and return the corrected output clamped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-5
_WAVELET_LEVELS = 5


def adain_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and standard deviation of ``output`` to those of ``reference``."""
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
    """High frequencies of ``output`` plus the low frequencies of ``reference``."""
    high, _ = wavelet_decompose(output)
    _, low = wavelet_decompose(reference)
    return (high + low).clamp(0.0, 1.0)


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` (adain | wavelet | none)."""
    if method == "adain":
        return adain_color_fix(output, reference)
    if method == "wavelet":
        return wavelet_color_fix(output, reference)
    if method == "none":
        return output
    raise ValueError(f"color fix {method!r} is not valid; choose adain, wavelet or none")

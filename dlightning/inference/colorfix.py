"""Colour correction of the output against the bicubic-upsampled LQ frame (docs/METHOD.md 7.6).

The functions live in the standalone-safe :mod:`dlightning.models.standalone.dloral_frames`, which every
export carries; this module keeps their package path. They take ``(N, 3, H, W)`` images in [0, 1] and
return the corrected output clamped to [0, 1].
"""

from __future__ import annotations

from dlightning.models.standalone.dloral_frames import (
    adain_color_fix,
    color_fix,
    wavelet_color_fix,
    wavelet_decompose,
)

__all__ = ["adain_color_fix", "color_fix", "wavelet_color_fix", "wavelet_decompose"]

"""Latent tiling with Gaussian-blended overlaps (docs/METHOD.md 7.4).

The functions live in the standalone-safe :mod:`dlightning.models.standalone.dloral_onestep`, which every
export carries (so ``dlightning upscale`` and an export's diffusers pipeline tile alike); this module keeps
their package path. Each tile runs CFR (flow computed on the tile's LQ pixels) and the UNet; the UNet
output and the fused current latent of all tiles are blended with Gaussian weights, and the x0 rule is
applied to the blended pair afterwards.

Tiling is an approximation by construction: the UNet's self-attention is global over its input and its
GroupNorm statistics are computed over the whole input, so a tile sees a different context than the
whole frame. Two choices keep the error down (measured in docs/INFERENCE.md):

* tile starts are multiples of the UNet's downsampling factor (``align``), so that every tile's
  strided convolutions sample the same grid as on the whole frame (an odd offset on the tiny model
  triples the difference); the last tile is widened to the border instead of being shifted off-grid;
* a frame whose latent fits in one tile is not tiled at all (bitwise the untiled path).
"""

from __future__ import annotations

from dlightning.models.standalone.dloral_onestep import (
    gaussian_window,
    needs_tiling,
    tile_spans,
    tiled_denoise,
    unet_alignment,
)

__all__ = ["gaussian_window", "needs_tiling", "tile_spans", "tiled_denoise", "unet_alignment"]

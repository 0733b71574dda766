"""Latent tiling with Gaussian-blended overlaps (docs/METHOD.md 7.4).

Each tile runs CFR (flow computed on the tile's LQ pixels) and the UNet; the UNet output and the fused
current latent of all tiles are blended with Gaussian weights, and the x0 rule is applied to the blended
pair afterwards.

Tiling is an approximation by construction: the UNet's self-attention is global over its input and its
GroupNorm statistics are computed over the whole input, so a tile sees a different context than the
whole frame. Two choices keep the error down (measured in docs/INFERENCE.md):

* tile starts are multiples of the UNet's downsampling factor (``align``), so that every tile's
  strided convolutions sample the same grid as on the whole frame (an odd offset on the tiny model
  triples the difference); the last tile is widened to the border instead of being shifted off-grid;
* a frame whose latent fits in one tile is not tiled at all (bitwise the untiled path).
"""

from __future__ import annotations

import math

import torch

_GAUSS_VAR = 0.01
"""Variance of the blending window on the tile's [0, 1] coordinate (reference value)."""


def tile_spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` spans covering ``[0, size)`` with tiles of ``tile`` and stride ``tile - overlap``.

    Starts are multiples of ``align``. The last span ends at the border: it starts at the largest aligned
    offset not beyond ``size - tile``, so it may be up to ``align - 1`` longer than ``tile``. ``tile >=
    size`` gives the single span ``(0, size)``.

    Args:
        size: Length of the axis (latents).
        tile: Tile length.
        overlap: Overlap of neighbouring tiles (``0 <= overlap < tile``).
        align: Grid the starts must lie on (the UNet's total downsampling factor).
    """
    if tile < 1 or not 0 <= overlap < tile or align < 1:
        raise ValueError(f"need tile >= 1, 0 <= overlap < tile and align >= 1, got {tile}, {overlap}, {align}")
    if tile >= size:
        return [(0, size)]
    stride = max((tile - overlap) // align * align, align)
    last = (size - tile) // align * align
    starts = list(range(0, last, stride)) + [last]
    return [(s, s + tile) for s in starts[:-1]] + [(last, size)]


def gaussian_window(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(h, w)`` separable Gaussian weights centred on the tile (symmetric in both axes)."""

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=dtype)
        mid = (n - 1) / 2
        return torch.exp(-((pos - mid) / n) ** 2 / (2 * _GAUSS_VAR)) / math.sqrt(2 * math.pi * _GAUSS_VAR)

    return axis(h)[:, None] * axis(w)[None, :]


def needs_tiling(h: int, w: int, tile: int) -> bool:
    """The reference rule: tile when the latent area exceeds ``tile ** 2``."""
    return h * w > tile * tile


def unet_alignment(model) -> int:
    """Total downsampling factor of ``model.unet`` (8 for SD 2.1, 2 for the tiny preset); 1 if unknown."""
    blocks = getattr(getattr(getattr(model, "unet", None), "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 1


def tiled_denoise(model, up_prev: torch.Tensor, up_cur: torch.Tensor, z_prev: torch.Tensor,
                  z_cur: torch.Tensor, embeds: torch.Tensor, tile: int, overlap: int, align: int = 1,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`DLoRALGenerator.denoise` tile by tile, blended.

    Args:
        model: The generator (anything with ``denoise``).
        up_prev, up_cur: HR-size LQ frames ``(N, 3, 8h, 8w)``.
        z_prev, z_cur: Latents ``(N, 4, h, w)``.
        embeds: ``(N, 77, D)`` prompt embeddings.
        tile: Latent tile side.
        overlap: Latent overlap.
        align: Tile starts are multiples of this (see :func:`unet_alignment`).

    Returns:
        Blended ``(fused_cur, unet_out)``, each ``(N, 4, h, w)``.
    """
    h, w = z_cur.shape[-2:]
    fused_acc = torch.zeros_like(z_cur, dtype=torch.float32)
    out_acc = torch.zeros_like(fused_acc)
    weight_acc = torch.zeros((h, w), device=z_cur.device, dtype=torch.float32)
    for y0, y1 in tile_spans(h, tile, overlap, align):
        for x0, x1 in tile_spans(w, tile, overlap, align):
            ys, xs = slice(y0, y1), slice(x0, x1)
            ps, px = slice(8 * y0, 8 * y1), slice(8 * x0, 8 * x1)
            fused, out = model.denoise(up_prev[..., ps, px], up_cur[..., ps, px], z_prev[..., ys, xs],
                                       z_cur[..., ys, xs], embeds)
            window = gaussian_window(y1 - y0, x1 - x0, device=z_cur.device)
            fused_acc[..., ys, xs] += fused.float() * window
            out_acc[..., ys, xs] += out.float() * window
            weight_acc[ys, xs] += window
    return fused_acc / weight_acc, out_acc / weight_acc

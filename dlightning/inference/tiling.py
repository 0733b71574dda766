"""Latent tiling with Gaussian-blended overlaps (METHOD.md 7.4).

Each tile runs CFR (flow computed on the tile's LQ pixels) and the UNet; the UNet output and the fused
current latent of all tiles are blended with Gaussian weights, and the x0 rule is applied to the blended
pair afterwards. CFR's attention is un-normalised and sees only its tile, so tiled and whole-frame
results differ slightly where the frame content outside a tile would have been retrieved.
"""

from __future__ import annotations

import math

import torch

_GAUSS_VAR = 0.01
"""Variance of the blending window on the tile's [0, 1] coordinate (reference value)."""


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, size)`` with tiles of ``tile`` and stride ``tile - overlap``.

    The last tile is snapped to the border; ``tile >= size`` gives one tile at 0.
    """
    if tile >= size:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


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


def tiled_denoise(model, up_prev: torch.Tensor, up_cur: torch.Tensor, z_prev: torch.Tensor,
                  z_cur: torch.Tensor, embeds: torch.Tensor, tile: int, overlap: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`DLoRALGenerator.denoise` tile by tile, blended.

    Args:
        model: The generator (anything with ``denoise``).
        up_prev, up_cur: HR-size LQ frames ``(N, 3, 8h, 8w)``.
        z_prev, z_cur: Latents ``(N, 4, h, w)``.
        embeds: ``(N, 77, D)`` prompt embeddings.
        tile: Latent tile side.
        overlap: Latent overlap.

    Returns:
        Blended ``(fused_cur, unet_out)``, each ``(N, 4, h, w)``.
    """
    h, w = z_cur.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    fused_acc = torch.zeros_like(z_cur, dtype=torch.float32)
    out_acc = torch.zeros_like(fused_acc)
    weight_acc = torch.zeros((h, w), device=z_cur.device, dtype=torch.float32)
    window = gaussian_window(th, tw, device=z_cur.device)
    for y in tile_starts(h, th, overlap):
        for x in tile_starts(w, tw, overlap):
            ys, xs = slice(y, y + th), slice(x, x + tw)
            ps, px = slice(8 * y, 8 * (y + th)), slice(8 * x, 8 * (x + tw))
            fused, out = model.denoise(up_prev[..., ps, px], up_cur[..., ps, px], z_prev[..., ys, xs],
                                       z_cur[..., ys, xs], embeds)
            fused_acc[..., ys, xs] += fused.float() * window
            out_acc[..., ys, xs] += out.float() * window
            weight_acc[ys, xs] += window
    return fused_acc / weight_acc, out_acc / weight_acc

"""Tiled VAE with shared GroupNorm statistics: equals the untiled VAE, unlike diffusers' per-tile tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.media import randomized_generator, smooth_frames

import dlightning.inference.tiled_vae as tiled_vae
from dlightning.inference.config import UpscaleConfig
from dlightning.inference.pipeline import Upscaler
from dlightning.inference.tiled_vae import decode_tiled, encode_tiled, plan_tiles, shared_norm_tiling
from dlightning.models.tiny import build_tiny_modules


@pytest.fixture(scope="module")
def vae():
    return build_tiny_modules(0, parts=("vae",))["vae"].eval()


def _latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _diffusers_tiled_decode(vae, z: torch.Tensor, tile: int) -> torch.Tensor:
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 8 * tile, tile
    try:
        return vae.decode(z).sample
    finally:
        vae.disable_tiling()


def test_plan_tiles_partitions_the_latent_and_pads_within_the_frame():
    tiles = plan_tiles(36, 24, 12, 11)
    assert len(tiles) == 6  # 3 x 2
    cover = torch.zeros(36, 24, dtype=torch.int64)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert (t.py0, t.px0) == (max(0, t.y0 - 11), max(0, t.x0 - 11))
        assert (t.py1, t.px1) == (min(36, t.y1 + 11), min(24, t.x1 + 11))
    assert torch.equal(cover, torch.ones_like(cover))  # cores: an exact partition


# Measured (tiny VAE, fp32 CPU, decoder output in [-1, 1] units, padding 11 latents):
# 24x24 latent, 2x2 tiles of 12: max 3.3e-5, mean 2.0e-6;  36x24, 3x2 tiles of 12: max 3.9e-5, mean 2.0e-6.
# diffusers' tiling (96 px tiles) on the same inputs: max 2.5, mean 0.141 (~72000x ours).
@pytest.mark.parametrize("h,w", [(24, 24), (36, 24)])
def test_tiled_decode_equals_untiled_and_beats_diffusers(vae, h, w):
    z = _latent(h, w)
    with torch.no_grad():
        ref = vae.decode(z).sample
        with shared_norm_tiling(vae, tile_px=96, padding=11):
            ours = vae.decode(z).sample
        theirs = _diffusers_tiled_decode(vae, z, 12)
    ours_diff, theirs_diff = (ours - ref).abs(), (theirs - ref).abs()
    assert ours_diff.max() < 2e-4 and ours_diff.mean() < 2e-5
    assert theirs_diff.mean() > 1000 * ours_diff.mean()


def test_small_padding_only_leaves_a_receptive_field_error(vae):
    z = _latent(24, 24, seed=1)
    with torch.no_grad():
        ref = vae.decoder(z)
        diffs = [(decode_tiled(vae.decoder, z, 12, pad) - ref).abs().mean().item() for pad in (0, 4, 8)]
    assert diffs[0] > diffs[1] > diffs[2]  # the margin covers more and more of the receptive field
    assert diffs[2] < 1e-4


@pytest.mark.parametrize("h,w", [(24, 24), (36, 24)])
def test_tiled_encode_equals_untiled(vae, h, w):
    images = torch.rand(2, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = vae.encoder(images)
        ours = encode_tiled(vae.encoder, images, tile=12, padding=11)
    diff = (ours - ref).abs()  # measured: max 2.1e-6, mean 3.6e-7
    assert diff.max() < 2e-5 and diff.mean() < 2e-6


def test_context_restores_the_vae_and_keeps_small_frames_untiled(vae, monkeypatch):
    calls = []
    real = tiled_vae.decode_tiled
    monkeypatch.setattr(tiled_vae, "decode_tiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    small, big = _latent(12, 12), _latent(24, 12)
    with torch.no_grad():
        ref = vae.decode(small).sample
        with shared_norm_tiling(vae, tile_px=96):
            same = vae.decode(small).sample
            assert not calls
            vae.decode(big)
            assert calls == [1]
    assert torch.equal(same, ref)  # a frame that fits takes the untiled path, bitwise
    assert "forward" not in vae.decoder.__dict__ and "forward" not in vae.encoder.__dict__


def test_upscaler_uses_shared_norm_tiling_above_vae_tile_size(monkeypatch):
    gen = randomized_generator()
    frames = smooth_frames(3, 48, 64)  # HR 192 x 256 px: 3 x 4 VAE tiles of 64 px
    base = {"min_short_side": 0, "batch_windows": 2, "color_fix": "none"}
    calls = []
    real = tiled_vae.decode_tiled
    monkeypatch.setattr(tiled_vae, "decode_tiled", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(**cfg) -> np.ndarray:
        return np.stack(list(Upscaler(gen, UpscaleConfig(**base, **cfg)).upscale_frames(frames))).astype(int)

    whole = run(vae_tile_size=0)
    shared = run(vae_tile_size=64)
    assert calls  # the tiled path actually ran
    assert np.abs(shared - whole).max() <= 1  # uint8 rounding only

"""Upscaling: every frame at scale x size and source fps, audio kept, tiling, colour fix, bad inputs."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
from helpers.media import randomized_generator, smooth_frames, write_video

from dlightning.export import export_generator
from dlightning.inference.colorfix import adain_color_fix, wavelet_decompose
from dlightning.inference.config import UpscaleConfig
from dlightning.inference.pipeline import Upscaler, upscale_exported
from dlightning.inference.video_io import InputError, read_video_info

FAST = {"min_short_side": 0, "batch_windows": 2}


@pytest.fixture(scope="module")
def gen():
    return randomized_generator()


@pytest.fixture(scope="module")
def export_dir(gen, tmp_path_factory):
    return export_generator(copy.deepcopy(gen), tmp_path_factory.mktemp("exp") / "model")


def test_odd_video_every_frame_source_fps_and_audio(export_dir, tmp_path):
    src = write_video(tmp_path / "in.mp4", smooth_frames(5, 27, 35), fps=7, audio=True)
    upscale_exported(export_dir, src, tmp_path / "out.mp4", UpscaleConfig(**FAST))
    n, fps, h, w, has_audio = read_video_info(tmp_path / "out.mp4")
    assert (n, fps, h, w, has_audio) == (5, 7, 108, 140, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no partial file left


def test_same_seed_same_output_with_sampled_latents(tmp_path):
    gen = randomized_generator(vae_latent="sample")
    src = write_video(tmp_path / "in.mp4", smooth_frames(3, 8, 8), fps=5)
    outs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"o{len(outs)}"
        from dlightning.inference.pipeline import upscale_path

        upscale_path(gen, src, out, UpscaleConfig(seed=seed, **FAST))
        outs.append(np.stack([cv2.imread(str(p)) for p in sorted(out.iterdir())]))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def _local_denoise(up_prev, up_cur, z_prev, z_cur, embeds):
    """A per-position stand-in for CFR + UNet: tiling must then be exact (checks tile geometry/blending)."""
    pix = torch.nn.functional.avg_pool2d(up_cur - up_prev, 8)[:, :1]  # HR pixels of the tile -> latent grid
    return z_cur + 0.5 * z_prev + pix, 0.25 * z_cur - pix


def test_tiled_matches_untiled_within_tolerance(gen, monkeypatch):
    # 24x24 LQ -> latent 12x12; tiles of 8 with overlap 6 vs the whole frame.
    frames = smooth_frames(3, 24, 24)
    base = {"min_short_side": 0, "batch_windows": 3, "color_fix": "none", "vae_tile_size": 0}

    def run(**kw):
        return np.stack(list(Upscaler(gen, UpscaleConfig(**base, **kw)).upscale_frames(frames))).astype(np.float32)

    monkeypatch.setattr(gen, "denoise", _local_denoise)
    whole, tiled = run(tile_size=96, tile_overlap=32), run(tile_size=8, tile_overlap=6)
    assert whole.shape == tiled.shape == (3, 96, 96, 3)
    # Exact up to uint8 rounding of float noise: at most one grey level.
    assert np.abs(whole - tiled).max() <= 1.0
    monkeypatch.undo()
    # With the real (random tiny) CFR + UNet, tiles differ from the whole frame: GroupNorm statistics,
    # attention context and CFR's un-normalised tile-local attention all depend on the tile. Measured:
    # mean |diff| ~0.1 of the range for 8-latent tiles (random weights amplify it). Only check it runs.
    real = run(tile_size=8, tile_overlap=6)
    assert real.shape == whole.shape and np.isfinite(real).all()


def test_adain_matches_reference_statistics_and_wavelet_is_exact():
    g = torch.Generator().manual_seed(0)
    out = torch.rand(2, 3, 32, 32, generator=g) * 0.5
    ref = torch.rand(2, 3, 32, 32, generator=g) * 0.3 + 0.4
    fixed = adain_color_fix(out, ref)
    torch.testing.assert_close(fixed.mean((-2, -1)), ref.mean((-2, -1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(fixed.std((-2, -1)), ref.std((-2, -1)), atol=1e-3, rtol=0)
    high, low = wavelet_decompose(out)
    torch.testing.assert_close(high + low, out)
    const = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(wavelet_decompose(const)[1], const)  # a flat image is all low frequency


def test_unreadable_file_and_empty_folder_fail_early_without_output(export_dir, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(InputError, match="broken.mp4"):
        upscale_exported(export_dir, bad, tmp_path / "o.mp4", UpscaleConfig(**FAST))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no video"):
        upscale_exported(export_dir, empty, tmp_path / "o2", UpscaleConfig(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4", "empty"]


def test_grayscale_tiny_frames_folder(export_dir, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(smooth_frames(3, 9, 13)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2GRAY))  # 1-channel PNGs
    cfg = UpscaleConfig(min_short_side=16, batch_windows=4)  # 9 px < 16: enlarged first, then resized back
    upscale_exported(export_dir, folder, tmp_path / "out", cfg)
    outs = sorted((tmp_path / "out").iterdir())
    assert len(outs) == 3
    assert all(cv2.imread(str(p)).shape == (36, 52, 3) for p in outs)
    with pytest.raises(InputError, match="frame folder"):
        upscale_exported(export_dir, folder, tmp_path / "out.mp4", cfg)

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
from dlightning.inference.tiling import gaussian_window, tile_spans, tiled_denoise
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


class _CountingStandIn:
    """Counts ``denoise`` calls and records tile shapes; computes :func:`_local_denoise`."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def denoise(self, up_prev, up_cur, z_prev, z_cur, embeds):
        self.shapes.append(tuple(z_cur.shape[-2:]))
        return _local_denoise(up_prev, up_cur, z_prev, z_cur, embeds)


def _windows(n, lq_h, lq_w, seed=0):
    """Tiny-model inputs of the window (0 -> 1), (1 -> 2) for ``n=3`` smooth LQ frames."""
    frames = torch.from_numpy(np.stack(smooth_frames(n, lq_h, lq_w, seed))).permute(0, 3, 1, 2).float() / 127.5 - 1
    return frames, list(range(n - 1)), list(range(1, n))


def _images(model, lq, prevs, targets, tile=None, overlap=0, align=1):
    """Decoded [0, 1] images of ``model`` on ``lq``, whole-frame or latent-tiled (VAE untiled)."""
    with torch.inference_mode():
        up = model.upsample_lq(lq)
        z = model.encode_latents(up)
        args = (up[prevs], up[targets], z[prevs], z[targets], model.encode_prompts([""] * len(targets)))
        if tile:
            fused, out = tiled_denoise(model, *args, tile=tile, overlap=overlap, align=align)
        else:
            fused, out = model.denoise(*args)
        return (model.decode_latents(model.to_x0(fused, out)) + 1) / 2, (up[targets] + 1) / 2


def test_one_tile_is_exactly_untiled(gen):
    lq, prevs, targets = _windows(3, 32, 36)  # latent 16 x 18
    whole, _ = _images(gen, lq, prevs, targets)
    one, _ = _images(gen, lq, prevs, targets, tile=18, overlap=4)  # tile >= both sides: a single tile
    # The only change is the blend's (x * w) / w: ~1e-7 relative in the latent, ~5e-6 after the decoder.
    torch.testing.assert_close(one, whole, atol=2e-5, rtol=0)


def test_latent_tiling_on_tiny_model_within_measured_tolerance(gen):
    """Tiled CFR + UNet vs the whole frame on the real (random) tiny model, VAE untiled.

    LQ 32x36 -> latent 16x18, tiles of 16 with overlap 14 on the UNet grid (align 2): two tiles that
    each miss two latent columns. Measured (fp32, CPU): mean |diff| 0.026 of the [0, 1] range, p99 0.22,
    max 0.87 (a few pixels the random VAE decoder saturates). The difference is the UNet's global
    self-attention and per-tile GroupNorm statistics: CFR's fused latent is tile-exact (1e-7) here, and
    feeding the whole-frame GroupNorm statistics to the tiles only removes ~1/4 of the UNet-output
    difference. Tolerance: mean <= 0.04 (measurement + 50 %), p99 <= 0.35.

    The tolerance is meaningful: the same frame through a second random model differs by ~0.10 mean,
    and the output differs from its bicubic input by ~0.23 mean; the tiled difference must stay well
    below both. Off the UNet grid (odd tile offset, align 1 on a 16x17 latent) the measured mean is 0.071,
    which this tolerance rejects.
    """
    lq, prevs, targets = _windows(3, 32, 36)
    whole, inp = _images(gen, lq, prevs, targets)
    tiled, _ = _images(gen, lq, prevs, targets, tile=16, overlap=14, align=2)
    other, _ = _images(randomized_generator(seed=8), lq, prevs, targets)
    diff = (tiled - whole).abs()
    assert diff.mean() <= 0.04 and diff.flatten().quantile(0.99) <= 0.35
    assert diff.mean() < 0.4 * (other - whole).abs().mean()
    assert diff.mean() < 0.2 * (whole - inp).abs().mean()
    # Alignment matters: an odd offset (align 1) is outside the tolerance; aligned, the 17-latent side
    # is one widened tile, i.e. the whole frame.
    lq17 = lq[..., :34]
    whole17, _ = _images(gen, lq17, prevs, targets)
    unaligned = (_images(gen, lq17, prevs, targets, tile=16, overlap=14, align=1)[0] - whole17).abs().mean()
    aligned = (_images(gen, lq17, prevs, targets, tile=16, overlap=14, align=2)[0] - whole17).abs().mean()
    assert unaligned > 0.04 and aligned < 1e-6


def test_tiling_geometry_exact_with_per_position_stand_in(gen, monkeypatch):
    # 24x24 LQ -> latent 12x12; tiles of 8 with overlap 6 vs the whole frame, through the Upscaler.
    frames = smooth_frames(3, 24, 24)
    base = {"min_short_side": 0, "batch_windows": 3, "color_fix": "none", "vae_tile_size": 0}

    def run(**kw):
        return np.stack(list(Upscaler(gen, UpscaleConfig(**base, **kw)).upscale_frames(frames))).astype(np.float32)

    monkeypatch.setattr(gen, "denoise", _local_denoise)
    whole, tiled = run(tile_size=96, tile_overlap=32), run(tile_size=8, tile_overlap=6)
    assert whole.shape == tiled.shape == (3, 96, 96, 3)
    assert np.abs(whole - tiled).max() <= 1.0  # exact up to uint8 rounding of float noise


def test_blend_weights_symmetric_and_partition_of_unity():
    win = gaussian_window(7, 10)
    torch.testing.assert_close(win, win.flip(0))
    torch.testing.assert_close(win, win.flip(1))
    assert win.argmax() == 3 * 10 + 4  # peak at the centre (row 3, columns 4/5 tie -> first)
    h, w, tile, overlap, align = 21, 30, 10, 6, 2
    spans_y, spans_x = tile_spans(h, tile, overlap, align), tile_spans(w, tile, overlap, align)
    assert all(s % align == 0 for s, _ in spans_y + spans_x)
    assert spans_y[-1][1] == h and spans_x[-1][1] == w and spans_y[0][0] == spans_x[0][0] == 0
    # Normalised weights, accumulated point by point (independent of tiled_denoise's tensor adds).
    total = np.zeros((h, w))
    norm = np.zeros((h, w))
    for y0, y1 in spans_y:
        for x0, x1 in spans_x:
            norm[y0:y1, x0:x1] += gaussian_window(y1 - y0, x1 - x0).double().numpy()
    for y0, y1 in spans_y:
        for x0, x1 in spans_x:
            wv = gaussian_window(y1 - y0, x1 - x0).double().numpy()
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    total[yy, xx] += wv[yy - y0, xx - x0] / norm[yy, xx]
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    # Blending a linear ramp with the stand-in reproduces it (partition of unity in tiled_denoise).
    z = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w).expand(1, 4, h, w).contiguous()
    up = torch.zeros(1, 3, 8 * h, 8 * w)
    fused, out = tiled_denoise(_CountingStandIn(), up, up, z, z, None, tile=tile, overlap=overlap, align=align)
    torch.testing.assert_close(fused, 1.5 * z, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out, 0.25 * z, rtol=1e-5, atol=1e-3)


def test_1080p_latent_is_processed_in_tiles():
    # 1920x1080 LQ at x4 -> latent 540 x 960; default tiles 96 / overlap 32 on the SD grid (align 8):
    # rows start at 0, 64, ..., 384 and 440 (last, widened to 100); columns 0, 64, ..., 832 and 864.
    h, w = 1080 * 4 // 8, 1920 * 4 // 8
    model = _CountingStandIn()
    up = torch.zeros(1, 3, 1, 1).expand(1, 3, 8 * h, 8 * w)  # the stand-in reads pixels; no memory needed
    z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    fused, out = tiled_denoise(model, up, up, z, z, None, tile=96, overlap=32, align=8)
    assert len(model.shapes) == 8 * 15
    assert set(model.shapes) == {(96, 96), (100, 96)}
    torch.testing.assert_close(fused, 1.5 * z, rtol=1e-5, atol=1e-5)


def test_pipeline_tiles_above_the_latent_limit(gen, monkeypatch):
    calls = []
    real = gen.denoise

    def counting(*args):
        calls.append(tuple(args[3].shape[-2:]))
        return real(*args)

    monkeypatch.setattr(gen, "denoise", counting)
    frames = smooth_frames(2, 16, 24)  # latent 8 x 12
    cfg = UpscaleConfig(min_short_side=0, batch_windows=2, color_fix="none", vae_tile_size=0)
    list(Upscaler(gen, cfg).upscale_frames(frames))
    assert calls == [(8, 12)]  # below the 96^2 limit: one whole-frame call
    calls.clear()
    list(Upscaler(gen, UpscaleConfig(**{**cfg.__dict__, "tile_size": 8, "tile_overlap": 4})).upscale_frames(frames))
    assert calls == [(8, 8), (8, 8)]  # columns 0 and 4 (stride 4 on the tiny UNet's grid of 2)


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


def _write_vfr_video(path, frames, pts_ms):
    """H.264 in mkv with irregular frame timestamps (a variable frame rate), time base 1/1000 s."""
    from fractions import Fraction

    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.time_base = Fraction(1, 1000)
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "0"}
        for f, pts in zip(frames, pts_ms, strict=True):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = pts, Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def test_variable_frame_rate_every_frame_at_the_average_rate(export_dir, tmp_path):
    pts = [0, 40, 60, 140, 160, 260]  # irregular gaps: a variable frame rate
    src = _write_vfr_video(tmp_path / "vfr.mkv", smooth_frames(6, 16, 20), pts)
    upscale_exported(export_dir, src, tmp_path / "out.mp4", UpscaleConfig(**FAST))
    n, fps, h, w, _ = read_video_info(tmp_path / "out.mp4")
    assert (n, h, w) == (6, 64, 80)  # every frame produced, none dropped or duplicated
    assert 10 <= float(fps) <= 60  # written at one constant rate: the stream's average


def test_bf16_upscale_runs_and_stays_close_to_fp32(export_dir, tmp_path):
    src = write_video(tmp_path / "in.mp4", smooth_frames(3, 16, 16), fps=5)
    outs = {}
    for dtype in ("fp32", "bf16"):
        upscale_exported(export_dir, src, tmp_path / dtype, UpscaleConfig(**FAST, dtype=dtype, color_fix="none"))
        files = sorted((tmp_path / dtype).glob("*.png"))
        outs[dtype] = np.stack([cv2.imread(str(f)) for f in files]).astype(np.float32)
    assert outs["bf16"].shape == outs["fp32"].shape == (3, 64, 64, 3)
    # bf16 keeps about 3 significant digits: the frames agree to a few grey levels on average.
    assert np.abs(outs["bf16"] - outs["fp32"]).mean() < 6.0


def test_channels_last_gives_the_same_frames(gen):
    frames = smooth_frames(3, 16, 16)
    outs = [np.stack(list(Upscaler(copy.deepcopy(gen), UpscaleConfig(**FAST, channels_last=cl, color_fix="none"))
                          .upscale_frames(frames))).astype(np.float32) for cl in (False, True)]
    assert np.abs(outs[0] - outs[1]).max() <= 1.0  # memory layout only: at most a rounding step of uint8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_gpu_is_a_clear_error():
    from dlightning.errors import ConfigError
    from dlightning.inference.pipeline import resolve_device

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"

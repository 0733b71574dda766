"""Clip degradation: determinism, per-clip parameters, per-frame noise, codec, odd sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dlightning.degradation import operators as ops
from dlightning.degradation import presets
from dlightning.degradation.codec import compress_clip
from dlightning.degradation.sampling import sample_params
from dlightning.errors import ConfigError

NO_NOISE = {"gaussian_prob": 1.0, "noise_sigma_range": [0.0, 0.0]}


def _clip(t: int = 3, h: int = 64, w: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocky: survives blur and resize
    return np.stack([np.roll(img, i, axis=1) for i in range(t)])


def _run(frames: np.ndarray, preset: presets.DegradationPreset, seed: int, scale: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    params = sample_params(preset, rng)
    return ops.degrade_clip(frames, params, scale, rng)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_same_seed_same_clip_and_shape(name: str) -> None:
    frames = _clip()
    preset = presets.get_preset(name)
    a, b = _run(frames, preset, 7), _run(frames, preset, 7)
    assert a.shape == (3, 16, 12, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_different_seeds_differ() -> None:
    frames = _clip()
    preset = presets.get_preset("realesrgan")
    assert not np.array_equal(_run(frames, preset, 1), _run(frames, preset, 2))


@pytest.mark.parametrize("seed", range(4))
def test_parameters_are_shared_across_frames(seed: int) -> None:
    frames = np.stack([_clip(1)[0]] * 4)  # four identical HR frames
    quiet = presets.get_preset("realesrgan", {"stage1": NO_NOISE, "stage2": NO_NOISE})
    out = _run(frames, quiet, seed)
    for t in range(1, 4):
        np.testing.assert_array_equal(out[t], out[0])
    noisy = presets.get_preset(
        "realesrgan", {"stage1": {"noise_sigma_range": [20.0, 30.0], "gaussian_prob": 1.0}}
    )
    out = _run(frames, noisy, seed)
    assert not np.array_equal(out[1], out[0])


def test_params_are_json_and_rebuild_identically() -> None:
    frames = _clip()
    rng = np.random.default_rng(5)
    params = sample_params(presets.get_preset("video"), rng)
    restored = json.loads(json.dumps(params))
    a = ops.degrade_clip(frames, params, 4, np.random.default_rng(9))
    b = ops.degrade_clip(frames, restored, 4, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    assert params["codec"] is not None and params["codec"]["codec"] in ("libx264", "mpeg4", "libx265")


def test_sampled_values_stay_in_preset_ranges() -> None:
    preset = presets.get_preset("dloral_mild")
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = sample_params(preset, rng)
        s1, s2 = p["stage1"], p["stage2"]
        assert 60 <= s1["jpeg_quality"] <= 95 and 60 <= s2["jpeg_quality"] <= 100
        if s1["noise"]["type"] == "gaussian":
            assert 1 <= s1["noise"]["sigma"] <= 15
        else:
            assert 0.05 <= s1["noise"]["scale"] <= 2
        if s2["resize"]["kind"] == "down":
            assert 0.6 <= s2["resize"]["scale"] <= 1.0
        assert p["codec"] is None


@pytest.mark.parametrize("codec", ["libx264", "mpeg4", "libx265"])
def test_codec_odd_size_returns_every_frame(codec: str) -> None:
    frames = _clip(t=5, h=48, w=72)[:, :45, :67]
    out = compress_clip(
        np.ascontiguousarray(frames), {"codec": codec, "rate_control": "bitrate", "bitrate": 50_000}
    )
    assert out.shape == frames.shape and out.dtype == np.uint8
    # Lossy but recognisably the same content.
    assert np.abs(out.astype(float) - frames.astype(float)).mean() < 40


def test_codec_crf_mode() -> None:
    frames = _clip(t=3)
    out = compress_clip(frames, {"codec": "libx264", "rate_control": "crf", "crf": 30})
    assert out.shape == frames.shape


def test_degrade_odd_size_scale1_with_codec() -> None:
    frames = np.ascontiguousarray(_clip(t=4, h=48, w=72)[:, :45, :67])
    preset = presets.get_preset("video")
    for seed in range(3):
        out = _run(frames, preset, seed, scale=1)
        assert out.shape == (4, 45, 67, 3)


def test_codec_at_stage1_position() -> None:
    preset = presets.get_preset("video", {"codec": {"position": "stage1"}})
    assert _run(_clip(), preset, 0).shape == (3, 16, 12, 3)


def test_hr_size_not_divisible_is_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        _run(np.zeros((3, 66, 48, 3), dtype=np.uint8), presets.get_preset("realesrgan"), 0)


def test_gaussian_noise_statistics() -> None:
    img = np.full((200, 200, 3), 0.5, dtype=np.float32)
    out = ops.add_noise(img, {"type": "gaussian", "sigma": 10.0, "gray": False}, np.random.default_rng(0))
    assert (out - img).std() == pytest.approx(10 / 255, rel=0.03)
    gray = ops.add_noise(img, {"type": "gaussian", "sigma": 10.0, "gray": True}, np.random.default_rng(0))
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_poisson_noise_statistics() -> None:
    # A flat image has one 8-bit level -> 1 photon level: noise = Poisson(0.5) - 0.5, variance 0.5.
    img = np.full((200, 200, 3), 0.5, dtype=np.float32)
    noise = ops._poisson_noise(np.round(img * 255) / 255, np.random.default_rng(0))
    assert noise.mean() == pytest.approx(0.0, abs=0.01)
    assert noise.var() == pytest.approx(128 / 255, rel=0.05)


def test_jpeg_keeps_colour_channels() -> None:
    img = np.zeros((32, 32, 3), dtype=np.float32)
    img[..., 0] = 0.9  # pure red in RGB
    out = ops.jpeg(img, 90)
    assert out[..., 0].mean() > 0.8 and out[..., 2].mean() < 0.1


def test_usm_leaves_flat_image_and_sharpens_edges() -> None:
    flat = np.full((1, 64, 64, 3), 100, dtype=np.uint8)
    np.testing.assert_array_equal(ops.usm_sharpen(flat), flat)
    edge = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    edge[:, :, 32:] = 200
    sharp = ops.usm_sharpen(edge)
    assert sharp[0, 32, 33, 0] > 200  # overshoot on the bright side of the edge
    assert sharp[0, 32, 2, 0] == 0 and sharp[0, 32, 60, 0] == 200  # far from the edge: unchanged


def test_unknown_preset_and_override_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        presets.get_preset("nope")
    with pytest.raises(ConfigError):
        presets.get_preset("realesrgan", {"stage1": {"not_a_field": 1}})


def _reference_cdf(lam: float, n: int = 448) -> np.ndarray:
    """P(count <= k): exact Poisson below the threshold, rounded (clipped) normal above; via math."""
    k = np.arange(n)
    if lam < ops.POISSON_NORMAL_ABOVE:
        if lam == 0:
            return np.ones(n)
        logpmf = [-lam + i * math.log(lam) - math.lgamma(i + 1) for i in k]
        return np.cumsum(np.exp(logpmf))
    return np.array([0.5 * (1 + math.erf((i + 0.5 - lam) / math.sqrt(2 * lam))) for i in k])


@pytest.mark.parametrize("photons", [1, 16, 256])
def test_sample_counts_follow_the_inverse_cdf_of_their_cell(photons: int) -> None:
    # Mixed levels cover lam from 0 up to 256 (both the Poisson and the rounded-normal regimes).
    levels = np.random.default_rng(1).integers(0, 256, (300, 301), dtype=np.uint8)
    counts = ops.sample_counts(levels, photons, np.random.default_rng(5)).ravel()
    words = np.random.default_rng(5).bit_generator.random_raw(-(-levels.size // 4))
    cells = (words.view(np.uint16)[: levels.size] >> 4).astype(np.float64)  # 12-bit cell of each uniform
    flat = levels.ravel()
    for q in np.unique(flat):
        sel = flat == q
        cdf = _reference_cdf(int(q) * photons / 255.0)
        lo = np.searchsorted(cdf, cells[sel] / 4096, side="right")
        hi = np.searchsorted(cdf, (cells[sel] + 1) / 4096, side="right")
        assert np.all((lo <= counts[sel]) & (counts[sel] <= hi)), f"level {q}"


@pytest.mark.parametrize("level,photons", [(1, 256), (100, 16), (150, 64), (200, 256)])
def test_sample_counts_pmf(level: int, photons: int) -> None:
    from scipy import stats

    lam = level * photons / 255.0
    counts = ops.sample_counts(np.full(200_000, level, dtype=np.uint8), photons, np.random.default_rng(2))
    pmf = np.diff(np.concatenate([[0.0], _reference_cdf(lam)]))
    expected = pmf * counts.size
    keep = expected >= 20  # chi-square needs populated bins; lump the rest into one
    observed = np.bincount(counts, minlength=pmf.size)[: pmf.size]
    obs = np.append(observed[keep], counts.size - observed[keep].sum())
    exp = np.append(expected[keep], counts.size - expected[keep].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_sample_counts_moments_and_zero_rate() -> None:
    rng = np.random.default_rng(0)
    for level, photons in [(0, 256), (3, 16), (200, 64), (160, 256)]:
        lam = level * photons / 255.0
        c = ops.sample_counts(np.full(100_000, level, dtype=np.uint8), photons, rng).astype(np.float64)
        assert c.mean() == pytest.approx(lam, abs=0.02 + 0.01 * lam)
        assert c.var() == pytest.approx(lam, abs=0.02 + 0.03 * lam)
    with pytest.raises(ValueError, match="photons"):
        ops.sample_counts(np.zeros(4, dtype=np.uint8), 512, rng)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "sinc", "size": 21, "omega_c": 1.3},
        {"type": "sinc", "size": 13, "omega_c": 2.0},
        {"type": "sinc", "size": 7, "omega_c": 2.5},
        {"type": "iso", "size": 15, "sigma_x": 2.0, "sigma_y": 2.0, "theta": 0.0},
        {"type": "plateau_aniso", "size": 21, "sigma_x": 3.0, "sigma_y": 1.0, "theta": 0.7, "beta": 1.5},
        {"type": "aniso", "size": 9, "sigma_x": 2.5, "sigma_y": 0.6, "theta": 0.4},
        {"type": "aniso", "size": 21, "sigma_x": 1.5, "sigma_y": 1.0, "theta": 0.4},  # 5 separable terms
        {"type": "identity", "size": 21},
    ],
)
def test_prepared_kernel_filters_like_the_padded_kernel(spec: dict) -> None:
    import cv2

    from dlightning.degradation import kernels

    img = np.random.default_rng(0).random((40, 56, 3)).astype(np.float32)
    ref = cv2.filter2D(img, -1, kernels.build_kernel(spec).astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    out = ops.blur(img, ops.prepare_kernel(spec))
    np.testing.assert_allclose(out, ref, atol=2e-4)

"""Metrics: PSNR / SSIM against scikit-image, E*warp zero on a static clip and growing with flicker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dlightning.metrics import psnr, rgb_to_y, ssim, warp_error
from dlightning.models.spynet import SpyNet


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 24, 30, generator=g)
    pred = (gt + 0.1 * torch.randn(2, 3, 24, 30, generator=g)).clamp(0, 1)
    return pred, gt


def _hwc(x):
    return x.permute(1, 2, 0).double().numpy()


def test_psnr_ssim_match_skimage_rgb_and_y(pair):
    pred, gt = pair
    for i in range(2):
        p, g = _hwc(pred[i]), _hwc(gt[i])
        assert psnr(pred, gt)[i].item() == pytest.approx(peak_signal_noise_ratio(g, p, data_range=1.0), abs=1e-4)
        ref = structural_similarity(g, p, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ssim(pred, gt)[i].item() == pytest.approx(ref, abs=1e-5)
        py, gy = rgb_to_y(pred)[i, 0].double().numpy(), rgb_to_y(gt)[i, 0].double().numpy()
        ref_y = structural_similarity(gy, py, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        assert ssim(pred, gt, y_channel=True)[i].item() == pytest.approx(ref_y, abs=1e-5)
        c = _hwc(pred[i, :, 2:-2, 2:-2]), _hwc(gt[i, :, 2:-2, 2:-2])
        assert psnr(pred, gt, crop_border=2)[i].item() == pytest.approx(
            peak_signal_noise_ratio(c[1], c[0], data_range=1.0), abs=1e-4)


def _zero_flow_net() -> SpyNet:
    """A SPyNet whose last conv of every level is zero: flow is exactly 0 (a static scene's true flow)."""
    net = SpyNet().eval()
    with torch.no_grad():
        for level in net.basic_module:
            last = level.basic_module[-1].conv
            last.weight.zero_()
            last.bias.zero_()
    return net


def test_ewarp_zero_for_static_clip_and_grows_with_flicker():
    net = _zero_flow_net()
    frame = 0.8 * torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # no clamping below
    static = frame.repeat(4, 1, 1, 1)
    assert warp_error(static, net) == pytest.approx(0.0, abs=1e-9)
    values = []
    for amp in (0.02, 0.05, 0.1):
        flicker = (static + amp * torch.tensor([0, 1, 0, 1.0]).view(4, 1, 1, 1)).clamp(0, 1)
        values.append(warp_error(flicker, net, flow_frames=static))
    assert values[0] > 0 and values[0] < values[1] < values[2]
    # independent value: every pixel of every pair differs by amp in each of the 3 channels
    for amp, value in zip((0.02, 0.05, 0.1), values, strict=True):
        assert value == pytest.approx(3 * amp**2 * 1000, rel=1e-4)


def test_ewarp_needs_two_frames():
    assert np.isnan(warp_error(torch.rand(1, 3, 16, 16), _zero_flow_net()))


def test_summary_skips_undefined_ewarp_but_shows_broken_outputs():
    from dlightning.metrics import VideoMetrics

    metrics = VideoMetrics()
    metrics.per_clip = [{"psnr": 30.0, "ewarp": float("nan")}, {"psnr": float("nan"), "ewarp": 2.0},
                        {"psnr": 20.0, "ewarp": 4.0}]
    summary = metrics.summary()
    assert summary["ewarp"] == 3.0  # occluded clip left out of E*warp's mean
    assert np.isnan(summary["psnr"])  # a NaN frame is a broken output: it must show, not vanish

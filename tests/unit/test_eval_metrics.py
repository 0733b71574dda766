"""Evaluation metrics: weightless ones against independent computations, learned ones through their real
loading path with random weights, never a download."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from helpers import metric_weights as mw

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.metrics.suite import MetricSuite
from dlightning.metrics.weights import MetricWeights


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _clip(t=3, h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(t, 3, h, w, generator=g)
    return base, (base + 0.05 * torch.randn(t, 3, h, w, generator=g)).clamp(0, 1)


def test_psnr_ssim_rgb_and_y_match_skimage():
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    gt, out = _clip()
    suite = MetricSuite(["psnr", "ssim", "psnr_y", "ssim_y"], MetricWeights(), crop_border=2)
    got = suite.score(out, gt)
    o = out.permute(0, 2, 3, 1).double().numpy()[:, 2:-2, 2:-2]
    g = gt.permute(0, 2, 3, 1).double().numpy()[:, 2:-2, 2:-2]
    kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
    psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(g, o, strict=True)])
    ssim = np.mean([structural_similarity(a, b, channel_axis=-1, **kw) for a, b in zip(g, o, strict=True)])
    # Y as basicsr / pyiqa take it: skimage's BT.601 rgb2ycbcr (16-235) scaled to [0, 1].
    gy = [rgb2ycbcr(a)[..., 0] / 255 for a in g]
    oy = [rgb2ycbcr(a)[..., 0] / 255 for a in o]
    psnr_y = np.mean([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(gy, oy, strict=True)])
    ssim_y = np.mean([structural_similarity(a, b, **kw) for a, b in zip(gy, oy, strict=True)])
    assert got["psnr"] == pytest.approx(psnr, abs=1e-4)
    assert got["ssim"] == pytest.approx(ssim, abs=1e-5)
    assert got["psnr_y"] == pytest.approx(psnr_y, abs=1e-4)
    assert got["ssim_y"] == pytest.approx(ssim_y, abs=1e-5)
    assert got["psnr_y"] != pytest.approx(got["psnr"], abs=1e-3)


class _ConstantFlow(torch.nn.Module):
    """A flow net that answers a fixed translation (forward = +d, backward = -d)."""

    def __init__(self, dx: int, dy: int) -> None:
        super().__init__()
        self.d = (dx, dy)

    def forward(self, ref, supp):
        n, _, h, w = ref.shape
        flow = torch.empty(n, 2, h, w)
        flow[:, 0], flow[:, 1] = self.d[0], self.d[1]
        flow[n // 2:] *= -1  # flows_and_masks asks for [forward pairs, backward pairs]
        return flow


def test_ewarp_equals_a_hand_computed_warp_on_an_integer_translation():
    from dlightning.metrics.video import warp_error

    dx, dy = 2, 1
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(3, 3, 20, 24, generator=g)
    got = warp_error(frames, _ConstantFlow(dx, dy))
    # By hand: W_t(p) = I_{t+1}(p + d). Pixels whose p + d leaves the frame fail the forward-backward
    # check (the backward flow there reads as zero), so the mean runs over the rest.
    f = frames.double().numpy()
    errs = []
    for t in range(2):
        warped = f[t + 1][:, dy:, dx:]
        errs.append(((warped - f[t][:, : 20 - dy, : 24 - dx]) ** 2).sum(0).mean())
    assert got == pytest.approx(1000 * np.mean(errs), rel=1e-5)


def test_ewarp_is_zero_on_a_clip_that_follows_its_flow():
    from dlightning.metrics.video import warp_error

    g = torch.Generator().manual_seed(2)
    big = torch.rand(3, 30, 40, generator=g)
    # I_t(p) = I_{t+1}(p + d) with d = (1, 0): each frame is the next one moved one pixel to the right.
    frames = torch.stack([big[:, 5:25, 10 - t: 34 - t] for t in range(3)])
    inner = warp_error(frames[..., :, :-1], _ConstantFlow(1, 0))
    assert inner == pytest.approx(0.0, abs=1e-9)


def test_farneback_recovers_a_translation():
    from helpers.media import smooth_frames

    from dlightning.metrics.flows import build_flow_net

    frames = smooth_frames(1, 64, 80, seed=3)[0]
    a = torch.from_numpy(frames).permute(2, 0, 1).float()[None] / 255
    b = torch.roll(a, shifts=2, dims=-1)  # supp(x) = ref(x - 2): flow ref -> supp is +2 px in x
    flow = build_flow_net("farneback", None, "k")(a, b)
    inner = flow[0, :, 16:-16, 16:-16]
    assert float(inner[0].median()) == pytest.approx(2.0, abs=0.3)
    assert float(inner[1].median().abs()) < 0.3


def test_raft_loads_local_weights_and_gives_pixel_flow(tmp_path, no_network):
    from dlightning.metrics.flows import build_raft

    path = mw.raft_small_weights(tmp_path)
    raft = build_raft(str(path), "evaluate.weights.raft", size="small", num_flow_updates=2)
    a, b = torch.rand(2, 3, 36, 44), torch.rand(2, 3, 36, 44)
    flow = raft(a, b)
    assert flow.shape == (2, 2, 36, 44) and torch.isfinite(flow).all()
    with pytest.raises(MissingWeightsError, match="raft_large"):
        build_raft(str(path), "evaluate.weights.raft", size="large")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    pytest.importorskip("pyiqa")  # installed with --no-deps (README); DISTS and MUSIQ run its code
    folder = tmp_path_factory.mktemp("metric_weights")
    vgg = mw.vgg16_features(folder)
    return MetricWeights(lpips=str(vgg), dists_vgg=str(vgg), dists=str(mw.dists_weights(folder, vgg)),
                         musiq=str(mw.musiq_weights(folder)), niqe=str(mw.niqe_params(folder)),
                         brisque=str(mw.brisque_params(folder)), spynet=str(mw.spynet_weights(folder)),
                         raft=str(mw.raft_small_weights(folder)))


@pytest.mark.parametrize("name", ["lpips", "dists"])
def test_full_reference_networks_run_and_are_zero_on_identical_frames(name, weights, no_network):
    gt, out = _clip(t=2, h=64, w=64)
    suite = MetricSuite([name], weights)
    assert suite.score(gt, gt)[name] == pytest.approx(0.0, abs=1e-6)
    value = suite.score(out, gt)[name]
    assert math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", ["musiq", "niqe", "brisque"])
def test_no_reference_metrics_run_from_local_files(name, weights, no_network):
    _, out = _clip(t=2, h=96, w=96)
    suite = MetricSuite([name], weights)
    first = suite.score(out)[name]
    assert math.isfinite(first)
    assert suite.score(out)[name] == pytest.approx(first, rel=1e-6)  # deterministic


def test_clipiqa_runs_on_a_local_clip_archive(tmp_path, no_network):
    pytest.importorskip("pyiqa")
    weights = MetricWeights(clipiqa=str(mw.clip_weights(tmp_path)))
    _, out = _clip(t=2, h=64, w=64)
    value = MetricSuite(["clipiqa"], weights).score(out)["clipiqa"]
    assert 0.0 <= value <= 1.0  # a probability of the "good" side of the prompt pairs


def _zeroed(path):
    """The state dict at ``path`` with every weight and bias zero (normalisation buffers kept): the
    network's real code then answers zero flow."""
    state = torch.load(path, weights_only=True)
    torch.save({k: torch.zeros_like(v) if k.endswith(("weight", "bias")) else v for k, v in state.items()}, path)
    return str(path)


@pytest.mark.parametrize("flow", ["raft", "spynet"])
def test_ewarp_with_learned_flow_nets_through_their_real_code(flow, tmp_path, no_network):
    make = mw.raft_small_weights if flow == "raft" else mw.spynet_weights
    weights = MetricWeights(**{flow: _zeroed(make(tmp_path))})
    gt, out = _clip(t=3, h=64, w=64)
    suite = MetricSuite([f"ewarp_{flow}"], weights, raft_size="small")
    # Zero flow: every pixel visible and W_t = I_{t+1}, so E*warp is the mean squared frame difference.
    expected = 1000 * float((out[1:] - out[:-1]).double().pow(2).sum(1).mean())
    assert suite.score(out, gt)[f"ewarp_{flow}"] == pytest.approx(expected, rel=1e-5)


def test_ewarp_farneback_in_the_suite_is_small_on_a_static_clip():
    frame = torch.from_numpy(__import__("helpers.media", fromlist=["x"]).smooth_frames(1, 64, 64)[0])
    clip = (frame.permute(2, 0, 1).float() / 255).expand(3, 3, 64, 64).contiguous()
    value = MetricSuite(["ewarp_farneback"], MetricWeights()).score(clip, clip)["ewarp_farneback"]
    assert 0.0 <= value < 0.1  # Farneback's flow of identical frames is near zero, not exactly zero


@pytest.mark.parametrize(("name", "key", "file"), [
    ("musiq", "evaluate.weights.musiq", "musiq_koniq_ckpt"),
    ("clipiqa", "evaluate.weights.clipiqa", "RN50.pt"),
    ("niqe", "evaluate.weights.niqe", "niqe_modelparameters.mat"),
    ("brisque", "evaluate.weights.brisque", "brisque_svm_weights.pth"),
    ("dists", "evaluate.weights.dists_vgg", "vgg16-397923af.pth"),
    ("ewarp_raft", "evaluate.weights.raft", "raft_large"),
])
def test_missing_weight_names_key_and_file_before_building_anything(name, key, file, monkeypatch):
    import dlightning.metrics.suite as suite_mod

    monkeypatch.setattr(suite_mod.MetricSuite, "_build", lambda *a, **k: pytest.fail("built before checks"))
    with pytest.raises(MissingWeightsError, match=key) as err:
        MetricSuite(["psnr", name], MetricWeights())
    assert file in str(err.value) and "nothing is downloaded" in str(err.value)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        MetricSuite([name], MetricWeights(**{key.rsplit(".", 1)[1]: "/nonexistent/file.pth"}))


def test_unknown_and_unavailable_metrics_are_clear_errors():
    with pytest.raises(ConfigError, match="choose from"):
        MetricSuite(["psnrr"], MetricWeights())
    with pytest.raises(ConfigError, match="DOVER"):
        MetricSuite(["dover"], MetricWeights())
    with pytest.raises(ConfigError, match="need GT"):
        MetricSuite(["psnr"], MetricWeights()).score(torch.rand(2, 3, 16, 16))


def test_validation_metrics_take_any_evaluation_metric():
    from dlightning.metrics.video import VideoMetrics

    gt, out = _clip(t=3, h=32, w=32)
    extra = MetricSuite(["psnr_y", "ewarp_farneback"], MetricWeights(), key_prefix="validation.metric_weights")
    values = VideoMetrics(extra=extra).add(out, gt)
    assert set(values) == {"psnr", "ssim", "psnr_y", "ewarp_farneback"}
    assert values["psnr_y"] == pytest.approx(MetricSuite(["psnr_y"], MetricWeights()).score(out, gt)["psnr_y"])
    with pytest.raises(MissingWeightsError, match="validation.metric_weights.musiq"):
        MetricSuite(["musiq"], MetricWeights(), key_prefix="validation.metric_weights")

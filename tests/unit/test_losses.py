"""Loss modules, each against an independent computation: MSE, LPIPS (offline), CSD, temporal."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.losses import (
    CSDLoss,
    TemporalWarpLoss,
    build_lpips,
    farneback_flow_metric,
    mse_loss,
    occlusion_mask,
    sample_clip_noise,
)
from dlightning.losses.config import CSDConfig, LPIPSConfig
from dlightning.models.spynet import load_spynet

# ----------------------------------------------------------------------------------------- pixel


def test_mse_loss_fp32_and_value() -> None:
    pred = torch.tensor([[0.5, -1.0], [0.25, 1.0]], dtype=torch.bfloat16)
    target = torch.zeros(2, 2, dtype=torch.bfloat16)
    loss = mse_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((0.25 + 1.0 + 0.0625 + 1.0) / 4)


# ----------------------------------------------------------------------------------------- lpips


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """A torchvision-layout VGG-16 state dict (features only, to keep the file small)."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    sd = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
    torch.save(sd, path)
    return str(path), sd


@pytest.fixture(scope="module")
def lpips_loss(vgg_file: tuple[str, dict[str, torch.Tensor]]):
    return build_lpips(LPIPSConfig(net="vgg", backbone_path=vgg_file[0]))


def test_lpips_backbone_tensors_come_from_file(lpips_loss, vgg_file) -> None:
    _, sd = vgg_file
    net_sd = lpips_loss.metric.net.state_dict()
    # VGG-16 features: 13 convs at these torchvision indices, all of which LPIPS uses.
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert len(net_sd) == 2 * len(conv_indices)
    for i in conv_indices:
        (name,) = [k for k in net_sd if k.endswith(f".{i}.weight") and k.startswith("slice")]
        assert torch.equal(net_sd[name], sd[f"features.{i}.weight"])
        assert torch.equal(net_sd[name.replace("weight", "bias")], sd[f"features.{i}.bias"])


def test_lpips_heads_are_the_shipped_ones(lpips_loss) -> None:
    import os

    import lpips

    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    heads = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in heads.items():
        assert torch.equal(lpips_loss.metric.state_dict()[k], v)


def test_lpips_zero_for_identical_and_grows_with_noise(lpips_loss) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=g)
    assert lpips_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    small = lpips_loss(x, (x + 0.05 * noise).clamp(-1, 1)).item()
    large = lpips_loss(x, (x + 0.5 * noise).clamp(-1, 1)).item()
    assert 0.0 < small < large


def test_lpips_frozen_and_stays_eval(lpips_loss) -> None:
    assert not any(p.requires_grad for p in lpips_loss.parameters())
    lpips_loss.train()
    assert not lpips_loss.metric.training
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    lpips_loss(x, torch.ones(1, 3, 16, 16)).backward()
    assert x.grad is not None


def test_lpips_builds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    loss = build_lpips(LPIPSConfig(net="alex", allow_random_backbone=True))
    assert loss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)).item() == pytest.approx(0.0, abs=1e-7)


def test_lpips_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"loss\.lpips\.backbone_path"):
        build_lpips(LPIPSConfig(net="alex"))
    with pytest.raises(MissingWeightsError, match=r"loss\.lpips\.backbone_path"):
        build_lpips(LPIPSConfig(net="alex", backbone_path=str(tmp_path / "nope.pth")))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    with pytest.raises(MissingWeightsError, match=r"loss\.lpips\.backbone_path.*features\.0\.weight"):
        build_lpips(LPIPSConfig(net="alex", backbone_path=str(wrong)))


# ------------------------------------------------------------------------------------------- csd


def _sd21_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class _ToyTeacher:
    """eps = a * z_t + b * t / 1000 + mean(embeds); records its calls."""

    def __init__(self, out_dtype: torch.dtype = torch.float32) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []
        self.out_dtype = out_dtype

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        self.calls.append((z_t.clone(), t.clone(), embeds.clone(), torch.is_grad_enabled()))
        eps = 0.7 * z_t + 0.3 * t.view(-1, 1, 1, 1) / 1000 + embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return eps.to(self.out_dtype)


def _expected_csd(z, noise, t, pos, neg, scale, alphas):
    """The CSD formula of docs/METHOD.md 5.4 per sample, in float64 numpy."""
    z, noise, pos, neg = (np.asarray(v, dtype=np.float64) for v in (z, noise, pos, neg))
    g = np.empty_like(z)
    for i in range(z.shape[0]):
        a = float(alphas[int(t[i])])
        zt = np.sqrt(a) * z[i] + np.sqrt(1 - a) * noise[i]
        eps_neg = 0.7 * zt + 0.3 * t[i] / 1000 + neg[i].mean()
        eps_pos = 0.7 * zt + 0.3 * t[i] / 1000 + pos[i].mean()
        eps_cfg = eps_neg + scale * (eps_pos - eps_neg)
        x0_real = (zt - np.sqrt(1 - a) * eps_cfg) / np.sqrt(a)
        x0_fake = (zt - np.sqrt(1 - a) * eps_neg) / np.sqrt(a)
        w = np.abs(z[i] - x0_real).mean()
        g[i] = (x0_fake - x0_real) / w
    return float((g**2).mean()), 2 * g / g.size


def test_csd_value_and_gradient_match_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    alphas = _sd21_alphas_cumprod()
    z_hat = torch.randn(3, 4, 8, 8, generator=gen, requires_grad=True)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    pos = torch.randn(3, 5, 6, generator=gen)
    neg = torch.randn(1, 5, 6, generator=gen)
    teacher = _ToyTeacher()
    csd = CSDLoss(CSDConfig(), alphas.float())
    loss, stats = csd(z_hat, teacher, pos, neg, noise=noise, generator=gen)
    loss.backward()

    assert len(teacher.calls) == 1
    zt_in, t_in, emb_in, grad_enabled = teacher.calls[0]
    assert not grad_enabled
    assert zt_in.shape[0] == 6 and torch.equal(zt_in[:3], zt_in[3:])
    assert torch.equal(t_in[:3], t_in[3:])
    assert torch.equal(emb_in[:3], neg.expand(3, -1, -1)) and torch.equal(emb_in[3:], pos)
    t = t_in[:3].numpy()
    exp_loss, exp_grad = _expected_csd(z_hat.detach(), noise, t, pos, neg.expand(3, -1, -1), 7.5, alphas)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(exp_loss, rel=1e-4)
    np.testing.assert_allclose(z_hat.grad.numpy(), exp_grad, rtol=1e-3, atol=1e-9)
    assert stats["t_mean"].item() == pytest.approx(float(t.mean()))


def test_csd_t_range_and_fp32_for_bf16_teacher() -> None:
    gen = torch.Generator().manual_seed(0)
    csd = CSDLoss(CSDConfig(t_min=20, t_max=25), _sd21_alphas_cumprod().float())
    teacher = _ToyTeacher(out_dtype=torch.bfloat16)
    z_hat = torch.randn(64, 4, 2, 2, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    loss, stats = csd(z_hat, teacher, torch.randn(64, 2, 3), torch.randn(1, 2, 3), generator=gen)
    t = teacher.calls[0][1]
    assert t.min().item() >= 20 and t.max().item() <= 24
    assert set(t.tolist()) == {20, 21, 22, 23, 24}
    assert loss.dtype == torch.float32 and teacher.calls[0][0].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in stats.values())
    loss.backward()
    assert z_hat.grad is not None and z_hat.grad.dtype == torch.bfloat16


def test_csd_rejects_bad_range() -> None:
    with pytest.raises(ConfigError, match=r"loss\.csd\.t_min"):
        CSDLoss(CSDConfig(t_min=500, t_max=20), _sd21_alphas_cumprod().float())


def test_sample_clip_noise_shared_and_independent() -> None:
    latents = torch.zeros(2, 3, 4, 5, 5)
    shared = sample_clip_noise(latents, shared=True, generator=torch.Generator().manual_seed(0))
    assert shared.shape == latents.shape
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 0], shared[:, 2])
    assert not torch.equal(shared[0, 0], shared[1, 0])
    own = sample_clip_noise(latents, shared=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(own[:, 0], own[:, 1])


# -------------------------------------------------------------------------------------- temporal


def _constant_flow(n: int, h: int, w: int, dx: float, dy: float = 0.0) -> torch.Tensor:
    flow = torch.zeros(n, 2, h, w)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_occlusion_mask_hand_built() -> None:
    h, w = 4, 6
    # Consistent +2 / -2 px motion: valid except the two right columns, whose target leaves the frame.
    expected = torch.ones(1, 1, h, w)
    expected[..., w - 2 :] = 0
    mask = occlusion_mask(_constant_flow(1, h, w, 2.0), _constant_flow(1, h, w, -2.0))
    assert torch.equal(mask, expected)
    # Backward flow in the same direction: inconsistent everywhere.
    assert occlusion_mask(_constant_flow(1, h, w, 2.0), _constant_flow(1, h, w, 2.0)).sum() == 0
    # |1 - 0.5|^2 = 0.25 <= 0.01 * (1 + 0.25) + 0.5: within tolerance (last column leaves the frame).
    small = occlusion_mask(_constant_flow(1, h, w, 1.0), _constant_flow(1, h, w, -0.5))
    assert small[..., : w - 1].eq(1).all() and small[..., w - 1].eq(0).all()


class _ShiftFlowNet(nn.Module):
    """Stub flow net for a batched call [cur; prev] -> [prev]: first half +dx, second half -dx."""

    def __init__(self, dx: float) -> None:
        super().__init__()
        self.dx = dx

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        n, _, h, w = ref.shape
        half = n // 2
        return torch.cat([_constant_flow(half, h, w, self.dx), _constant_flow(n - half, h, w, -self.dx)])


def test_temporal_warp_loss_known_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    h, w = 8, 10
    scene = torch.rand(2, 3, h, w + 1, generator=gen) * 2 - 1
    gt_prev, gt_cur = scene[..., 1:], scene[..., :-1]  # cur(x) = prev(x + 1)
    loss_fn = TemporalWarpLoss(_ShiftFlowNet(1.0))
    assert loss_fn(gt_prev, gt_cur, gt_prev, gt_cur).item() == pytest.approx(0.0, abs=1e-6)

    delta = torch.randn(2, 3, h, w, generator=gen) * 0.1
    loss = loss_fn(gt_prev, gt_cur + delta, gt_prev, gt_cur).item()
    # The last column's target leaves the frame, so it is masked out.
    expected = delta[..., : w - 1].abs().sum().item() / delta.numel()
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def zero_flow_spynet():
    net = load_spynet(None)
    for level in net.basic_module:
        last = level.basic_module[-1].conv
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return net


def test_temporal_warp_loss_has_gradient(zero_flow_spynet) -> None:
    gen = torch.Generator().manual_seed(1)
    gt = torch.rand(1, 2, 3, 16, 16, generator=gen) * 2 - 1
    conv = nn.Conv2d(3, 3, 3, padding=1)
    source = torch.randn(2, 3, 16, 16, generator=gen)
    out = torch.tanh(conv(source))
    loss_fn = TemporalWarpLoss(zero_flow_spynet)
    loss = loss_fn(out[0:1], out[1:2], gt[:, 0], gt[:, 1])
    # Zero flow, nothing occluded: the loss is the L1 of the frame-difference mismatch.
    expected = ((out[1] - out[0]) - (gt[0, 1] - gt[0, 0])).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss_fn.flow_net.parameters())
    assert loss_fn(gt[:, 0], gt[:, 1], gt[:, 0], gt[:, 1]).item() == 0.0


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random texture (in [-1, 1]) that Farneback can track."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
    img = (img - img.min()) / (img.max() - img.min())
    return img * 2 - 1


def test_farneback_metric_zero_for_identical_and_positive_for_shift() -> None:
    big = torch.from_numpy(_texture(72, 80, 0)).permute(2, 0, 1)
    frame_a, frame_b = big[:, :64, :64], big[:, :64, 4:68]
    value = farneback_flow_metric(frame_a, frame_b, frame_a, frame_b)
    assert isinstance(value, float) and value == 0.0
    shifted = farneback_flow_metric(frame_a[None], frame_b[None], frame_a[None], frame_a[None])
    # A 4 px x-shift over a 64 px frame: |dx| = 4 / 64, dy = 0, averaged over both components.
    assert shifted == pytest.approx(4 / 64 / 2, abs=0.01)

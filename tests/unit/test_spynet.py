"""SPyNet and flow_warp: warping semantics, key layout, pyramid arithmetic, weight loading."""

from __future__ import annotations

import logging

import pytest
import torch

from dlightning.errors import MissingWeightsError
from dlightning.models.spynet import SpyNet, flow_warp, load_spynet


def _constant_flow(n: int, h: int, w: int, dx: float, dy: float) -> torch.Tensor:
    flow = torch.empty(n, 2, h, w)
    flow[:, 0] = dx
    flow[:, 1] = dy
    return flow


def test_flow_warp_zero_flow_is_identity() -> None:
    x = torch.randn(2, 3, 7, 9)
    out = flow_warp(x, torch.zeros(2, 2, 7, 9))
    torch.testing.assert_close(out, x)


def test_flow_warp_integer_flow_is_a_shift() -> None:
    x = torch.randn(1, 2, 8, 10)
    dx, dy = 2, 1
    out = flow_warp(x, _constant_flow(1, 8, 10, dx, dy))
    # out[y, x] = x[y + dy, x + dx]; torch.roll by (-dy, -dx) gives the same except at wrapped borders.
    expected = torch.roll(x, shifts=(-dy, -dx), dims=(2, 3))
    torch.testing.assert_close(out[..., : 8 - dy, : 10 - dx], expected[..., : 8 - dy, : 10 - dx])
    # Samples that fall outside the frame read zeros (padding_mode="zeros").
    assert torch.all(out[..., 8 - dy:, :] == 0) and torch.all(out[..., :, 10 - dx:] == 0)


def test_flow_warp_fractional_flow_is_bilinear() -> None:
    x = torch.arange(20.0).view(1, 1, 4, 5)  # value = 5 * y + x, linear in both axes
    out = flow_warp(x, _constant_flow(1, 4, 5, 0.25, 0.5))
    # Bilinear sampling of a linear ramp is exact: value at (y + 0.5, x + 0.25).
    assert out[0, 0, 1, 2].item() == pytest.approx(5 * 1.5 + 2.25)
    assert out[0, 0, 2, 0].item() == pytest.approx(5 * 2.5 + 0.25)


def test_flow_warp_border_padding_clamps() -> None:
    x = torch.randn(1, 1, 4, 4)
    out = flow_warp(x, _constant_flow(1, 4, 4, 10.0, 0.0), padding_mode="border")
    torch.testing.assert_close(out[0, 0], x[0, 0, :, -1:].expand(4, 4))


def test_flow_warp_rejects_channels_last_flow() -> None:
    with pytest.raises(ValueError, match="permute"):
        flow_warp(torch.randn(1, 3, 5, 6), torch.zeros(1, 5, 6, 2))


def test_state_dict_keys_match_basicvsr_layout() -> None:
    expected = {"mean", "std"}
    for level in range(6):
        for i in range(5):
            for p in ("weight", "bias"):
                expected.add(f"basic_module.{level}.basic_module.{i}.conv.{p}")
    sd = SpyNet().state_dict()
    assert set(sd) == expected
    assert sd["basic_module.3.basic_module.1.conv.weight"].shape == (64, 32, 7, 7)
    assert sd["basic_module.0.basic_module.0.conv.weight"].shape == (32, 8, 7, 7)
    assert sd["basic_module.5.basic_module.4.conv.weight"].shape == (2, 16, 7, 7)
    torch.testing.assert_close(sd["mean"].flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(sd["std"].flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert sd["mean"].shape == (1, 3, 1, 1)


def test_parameter_count_matches_method_md() -> None:
    # docs/METHOD.md 2.5: 6 levels x (8*32 + 32*64 + 64*32 + 32*16 + 16*2) * 49 + biases = 1,440,300.
    assert sum(p.numel() for p in SpyNet().parameters()) == 1_440_300


@pytest.mark.parametrize("size", [(40, 56), (64, 64), (33, 31)])
def test_output_shape_any_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = SpyNet()
    ref, supp = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
    with torch.no_grad():
        flow = net(ref, supp)
    assert flow.shape == (2, 2, *size)
    assert torch.isfinite(flow).all()


def _constant_residual_spynet(bx: float, by: float) -> SpyNet:
    """SPyNet whose every level predicts the residual (bx, by) everywhere, whatever the input."""
    net = SpyNet()
    with torch.no_grad():
        for level in net.basic_module:
            last = level.basic_module[4].conv
            last.weight.zero_()
            last.bias.copy_(torch.tensor([bx, by]))
    return net


@pytest.mark.parametrize("size", [(64, 96), (40, 56)])
def test_pyramid_doubles_flow_and_rescales_to_input_size(size: tuple[int, int]) -> None:
    # Residual r at each of the 6 levels, doubled at every upsampling: r * (2^6 - 1) = 63 r at the
    # padded size, then converted to original pixels by W / W_padded and H / H_padded.
    h, w = size
    h_up, w_up = -(-h // 32) * 32, -(-w // 32) * 32
    net = _constant_residual_spynet(0.5, -0.25)
    with torch.no_grad():
        flow = net(torch.rand(1, 3, h, w), torch.rand(1, 3, h, w))
    torch.testing.assert_close(flow[0, 0], torch.full((h, w), 63 * 0.5 * w / w_up))
    torch.testing.assert_close(flow[0, 1], torch.full((h, w), 63 * -0.25 * h / h_up))


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return SpyNet().state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"spynet.{k}": v for k, v in sd.items()}},
        lambda sd: {"params": sd},
        lambda sd: {
            "state_dict": {
                **{f"generator.spynet.{k}": v for k, v in sd.items()},
                "generator.backbone.weight": torch.zeros(3),
            },
            "meta": {"epoch": 1},
        },
    ],
    ids=["raw", "nested_spynet_prefix", "params", "basicvsr_generator"],
)
def test_load_spynet_round_trip(tmp_path, wrap) -> None:
    sd = _random_state_dict(3)
    path = tmp_path / "spynet.pth"
    torch.save(wrap(sd), path)
    net = load_spynet(str(path))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    assert not any(p.requires_grad for p in net.parameters())


def test_load_spynet_without_mean_std_buffers(tmp_path) -> None:
    sd = {k: v for k, v in _random_state_dict(4).items() if k not in ("mean", "std")}
    torch.save(sd, tmp_path / "s.pth")
    net = load_spynet(str(tmp_path / "s.pth"))
    torch.testing.assert_close(net.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_load_spynet_missing_file_names_key(tmp_path) -> None:
    with pytest.raises(MissingWeightsError, match="model.cfr.spynet_path"):
        load_spynet(str(tmp_path / "nope.pth"))
    with pytest.raises(MissingWeightsError, match="my.key"):
        load_spynet(str(tmp_path / "nope.pth"), key="my.key")


def test_load_spynet_rejects_wrong_weights(tmp_path) -> None:
    sd = _random_state_dict(5)
    del sd["basic_module.2.basic_module.3.conv.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(MissingWeightsError, match=r"basic_module\.2\.basic_module\.3\.conv\.bias"):
        load_spynet(str(tmp_path / "bad.pth"))
    sd = _random_state_dict(5)
    sd["basic_module.0.basic_module.0.conv.weight"] = torch.zeros(32, 8, 3, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(MissingWeightsError, match="shape"):
        load_spynet(str(tmp_path / "shape.pth"))


def test_load_spynet_none_warns_and_freezes() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dlightning.models.spynet")
    logger.addHandler(handler)
    try:
        net = load_spynet(None)
    finally:
        logger.removeHandler(handler)
    assert any(r.levelno == logging.WARNING and "random" in r.getMessage() for r in records)
    assert not any(p.requires_grad for p in net.parameters())

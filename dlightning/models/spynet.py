"""SPyNet optical flow (BasicVSR variant) in plain PyTorch, plus pixel-flow warping.

The module reproduces the BasicVSR SPyNet state-dict layout
(``basic_module.{0..5}.basic_module.{0..4}.conv.{weight,bias}`` and the ``mean``/``std``
buffers) so that the public BasicVSR / DLoRAL weights load without mmcv.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dlightning.errors import MissingWeightsError
from dlightning.utils.logging import get_logger

logger = get_logger(__name__)

NUM_LEVELS = 6
"""Pyramid levels of SPyNet (5 average-pool halvings, so sizes are padded to multiples of 32)."""
_CHANNELS = (8, 32, 64, 32, 16, 2)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PREFIXES = ("generator.spynet.", "spynet.")
_NESTING_KEYS = ("state_dict", "params")


def flow_warp(
    x: torch.Tensor,
    flow: torch.Tensor,
    interpolation: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
) -> torch.Tensor:
    """Sample ``x`` at ``p + flow(p)`` for every pixel ``p`` (backward warping).

    Args:
        x: Tensor ``(N, C, H, W)`` to warp.
        flow: Pixel displacement ``(N, 2, H, W)``; channel 0 is x (width), channel 1 is y (height).
        interpolation: ``grid_sample`` mode (``bilinear`` or ``nearest``).
        padding_mode: ``grid_sample`` padding for samples outside the frame (``zeros``, ``border``).
        align_corners: ``grid_sample`` convention; the pixel grid is normalised with ``W - 1`` and
            ``H - 1``, which is exact for ``align_corners=True``.

    Returns:
        The warped tensor, same shape and dtype as ``x``.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        hint = " (it looks channels-last: pass flow.permute(0, 3, 1, 2))" if flow.shape[-1] == 2 else ""
        raise ValueError(f"flow must have shape (N, 2, H, W), got {tuple(flow.shape)}{hint}")
    if x.shape[-2:] != flow.shape[-2:] or x.shape[0] != flow.shape[0]:
        raise ValueError(
            f"x {tuple(x.shape)} and flow {tuple(flow.shape)} must share batch and spatial size"
        )
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)
    pos_x = xs.view(1, 1, w) + flow[:, 0].to(x.dtype)
    pos_y = ys.view(1, h, 1) + flow[:, 1].to(x.dtype)
    grid = torch.stack((2.0 * pos_x / max(w - 1, 1) - 1.0, 2.0 * pos_y / max(h - 1, 1) - 1.0), dim=-1)
    return F.grid_sample(x, grid, mode=interpolation, padding_mode=padding_mode, align_corners=align_corners)


class _ConvUnit(nn.Module):
    """Holds one conv as ``.conv`` so that keys read ``...{i}.conv.weight`` like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=1, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpyNetBasicModule(nn.Module):
    """One pyramid level: five 7x7 convs (8->32->64->32->16->2), ReLU between, none after the last."""

    def __init__(self) -> None:
        super().__init__()
        self.basic_module = nn.Sequential(
            *[_ConvUnit(c_in, c_out) for c_in, c_out in zip(_CHANNELS[:-1], _CHANNELS[1:], strict=True)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict a residual flow ``(N, 2, H, W)`` from ``[ref, warped supp, flow]`` (8 channels)."""
        last = len(self.basic_module) - 1
        for i, unit in enumerate(self.basic_module):
            x = unit(x)
            if i < last:
                x = F.relu(x)
        return x


class SpyNet(nn.Module):
    """Coarse-to-fine flow network of BasicVSR (6 levels), without mmcv.

    ``forward(ref, supp)`` returns the flow from ``ref`` to ``supp`` in pixels, i.e.
    ``flow_warp(supp, flow) ~ ref``. Inputs are RGB in [0, 1]; ImageNet mean/std normalisation is
    applied inside.
    """

    def __init__(self) -> None:
        super().__init__()
        self.basic_module = nn.ModuleList([SpyNetBasicModule() for _ in range(NUM_LEVELS)])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def compute_flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow on frames whose sides are multiples of ``2 ** (NUM_LEVELS - 1)``.

        Args:
            ref: ``(N, 3, H, W)`` reference frames in [0, 1].
            supp: ``(N, 3, H, W)`` support frames in [0, 1].

        Returns:
            Flow ``(N, 2, H, W)`` from ``ref`` to ``supp`` in pixels.
        """
        ref_pyr = [(ref - self.mean) / self.std]
        supp_pyr = [(supp - self.mean) / self.std]
        for _ in range(NUM_LEVELS - 1):
            ref_pyr.append(F.avg_pool2d(ref_pyr[-1], kernel_size=2, stride=2))
            supp_pyr.append(F.avg_pool2d(supp_pyr[-1], kernel_size=2, stride=2))
        ref_pyr.reverse()
        supp_pyr.reverse()

        n, _, h0, w0 = ref_pyr[0].shape
        flow = ref_pyr[0].new_zeros(n, 2, h0, w0)
        for level, module in enumerate(self.basic_module):
            if level == 0:
                flow_up = flow
            else:
                # Pixel units double with resolution, hence the factor 2.
                flow_up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
            warped = flow_warp(supp_pyr[level], flow_up, padding_mode="border")
            flow = flow_up + module(torch.cat([ref_pyr[level], warped, flow_up], dim=1))
        return flow

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow from ``ref`` to ``supp`` for any frame size.

        Frames are bilinearly resized to the next multiples of 32, and the flow is resized back with
        its x and y components rescaled to the original pixel units.

        Args:
            ref: ``(N, 3, H, W)`` reference frames in [0, 1].
            supp: ``(N, 3, H, W)`` support frames in [0, 1].

        Returns:
            Flow ``(N, 2, H, W)`` in pixels, channel 0 = x, channel 1 = y.
        """
        if ref.shape != supp.shape or ref.ndim != 4 or ref.shape[1] != 3:
            raise ValueError(
                f"ref and supp must both be (N, 3, H, W); got {tuple(ref.shape)} and {tuple(supp.shape)}"
            )
        h, w = ref.shape[-2:]
        multiple = 2 ** (NUM_LEVELS - 1)
        h_up = -(-h // multiple) * multiple
        w_up = -(-w // multiple) * multiple
        if (h_up, w_up) != (h, w):
            ref = F.interpolate(ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
            supp = F.interpolate(supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = self.compute_flow(ref, supp)
        if (h_up, w_up) == (h, w):
            return flow
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        scale = flow.new_tensor([w / w_up, h / h_up]).view(1, 2, 1, 1)
        return flow * scale


def _unwrap_state_dict(obj: object, key: str) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint and strip the known SPyNet prefixes."""
    if not isinstance(obj, Mapping):
        raise MissingWeightsError(f"{key}: expected a state dict, got a {type(obj).__name__}")
    for nest in _NESTING_KEYS:
        if nest in obj and isinstance(obj[nest], Mapping):
            obj = obj[nest]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        # A full BasicVSR / DLoRAL checkpoint holds other networks too: keep only the SPyNet part.
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _load_into(model: SpyNet, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of the conv weights; the constant mean/std buffers may be absent."""
    expected = set(model.state_dict())
    optional = {"mean", "std"}
    missing = sorted(expected - set(sd) - optional)
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise MissingWeightsError(
            f"{source} does not hold BasicVSR SPyNet weights: missing keys {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}. Expected keys like "
            "'basic_module.0.basic_module.0.conv.weight' (optionally prefixed by 'spynet.')."
        )
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as err:
        raise MissingWeightsError(f"{source}: SPyNet weights have the wrong shapes: {err}") from err


def load_spynet(path: str | os.PathLike | None, key: str = "model.cfr.spynet_path") -> SpyNet:
    """Build a frozen SPyNet, with weights from a local file when ``path`` is given.

    Args:
        path: Local ``.pth`` file in the BasicVSR layout: a raw state dict or one nested under
            ``state_dict`` / ``params``, keys optionally prefixed by ``spynet.`` or
            ``generator.spynet.``. None gives random weights (tests and demos only).
        key: Config key named in error messages.

    Returns:
        The SPyNet with every parameter frozen (``requires_grad=False``).

    Raises:
        MissingWeightsError: The file does not exist or does not hold SPyNet weights.
    """
    model = SpyNet()
    if path is None:
        logger.warning("%s is not set: SPyNet has random weights, flows are meaningless", key)
    else:
        if not os.path.isfile(path):
            raise MissingWeightsError(
                f"{key}={str(path)!r} does not exist; set it to a local BasicVSR SPyNet checkpoint "
                "(e.g. spynet_20210409-c6c1bd09.pth)"
            )
        obj = torch.load(path, map_location="cpu", weights_only=True)
        _load_into(model, _unwrap_state_dict(obj, key), f"{key}={str(path)!r}")
        logger.info("Loaded SPyNet weights from %s", path)
    model.requires_grad_(False)
    return model.eval()

"""Flow networks for E*warp, each ``forward(ref, supp) -> flow ref -> supp`` on ``(N, 3, H, W)`` in [0, 1].

The flow is a pixel displacement ``(N, 2, H, W)`` (channel 0 = x) such that
``flow_warp(supp, flow)`` approximates ``ref``: the interface of :class:`~dlightning.models.spynet.SpyNet`,
so :func:`~dlightning.metrics.video.warp_error` takes any of them.

- ``raft``: torchvision's RAFT (large or small), the flow of the papers' E*warp tables; weights from a
  local file through ``load_state_dict`` (``weights=None``: no download).
- ``spynet``: the project's SPyNet (BasicVSR weights).
- ``farneback``: OpenCV's Farneback, no weights (values are rougher; useful where no file is at hand).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.metrics.weights import require_weight

FLOW_NETS = ("raft", "spynet", "farneback")
RAFT_SIZES = ("large", "small")
_RAFT_MULTIPLE = 8
"""RAFT works on a 1/8 feature grid: frames are padded to a multiple of 8 and the flow is cropped back."""
_RAFT_MIN_SIDE = 128
"""torchvision's RAFT needs 16 feature cells per side (128 px); smaller frames are replicate-padded to it."""


class RaftFlow(nn.Module):
    """torchvision's RAFT with the SPyNet flow interface.

    Args:
        raft: A ``torchvision.models.optical_flow.RAFT`` (weights already loaded).
        num_flow_updates: Refinement iterations (torchvision's default is 12).
    """

    def __init__(self, raft: nn.Module, num_flow_updates: int = 12) -> None:
        super().__init__()
        self.raft, self.num_flow_updates = raft.eval(), num_flow_updates
        for p in self.raft.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow ``ref -> supp`` of ``(N, 3, H, W)`` frames in [0, 1]."""
        h, w = ref.shape[-2:]
        ph = max(_RAFT_MIN_SIDE, h + (-h) % _RAFT_MULTIPLE) - h
        pw = max(_RAFT_MIN_SIDE, w + (-w) % _RAFT_MULTIPLE) - w
        # RAFT takes [-1, 1] input (torchvision's Raft_*_Weights transforms do the same mapping).
        a = F.pad(ref.float() * 2 - 1, (0, pw, 0, ph), mode="replicate")
        b = F.pad(supp.float() * 2 - 1, (0, pw, 0, ph), mode="replicate")
        flows = self.raft(a, b, num_flow_updates=self.num_flow_updates)
        return flows[-1][..., :h, :w].float()


def build_raft(path: str | None, key: str, size: str = "large", num_flow_updates: int = 12) -> RaftFlow:
    """RAFT from the local file at ``path`` (config key ``key``), never downloaded.

    Raises:
        MissingWeightsError: The file is missing or does not hold RAFT weights of ``size``.
    """
    from torchvision.models.optical_flow import raft_large, raft_small

    if size not in RAFT_SIZES:
        raise ConfigError(f"RAFT size {size!r} is not valid; choose one of {list(RAFT_SIZES)}")
    file = require_weight(path, key, "raft")
    model = (raft_large if size == "large" else raft_small)(weights=None, progress=False)
    state = torch.load(file, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except (RuntimeError, AttributeError, TypeError) as err:
        raise MissingWeightsError(f"{key}={path} does not hold torchvision raft_{size} weights ({err})") from err
    return RaftFlow(model, num_flow_updates)


def build_flow_net(name: str, path: str | None, key: str, raft_size: str = "large") -> nn.Module:
    """The flow network ``name`` (raft | spynet | farneback), weights from ``path`` (config key ``key``).

    SPyNet with ``path`` None is random (tests only), as in validation; RAFT always needs its file.
    """
    if name == "raft":
        return build_raft(path, key, raft_size)
    if name == "spynet":
        from dlightning.models.spynet import load_spynet

        if path is not None:
            require_weight(path, key, "spynet")
        return load_spynet(path, key=key)
    if name == "farneback":
        from dlightning.losses.temporal import FarnebackFlow

        return FarnebackFlow()
    raise ConfigError(f"flow net {name!r} is not valid; choose one of {list(FLOW_NETS)}")

"""LPIPS perceptual loss, built offline (docs/INTEGRATION.md C5).

The ``lpips`` package ships only the linear calibration heads; its backbone would normally be
downloaded by torchvision. Here the backbone is built with random weights (``pnet_rand=True``, no
download) and then filled from a local torchvision ImageNet state dict named by
``loss.lpips.backbone_path``; the v0.1 linear heads come from the files inside the lpips package.
"""

from __future__ import annotations

import os
import re
import warnings

import lpips
import torch
from torch import nn

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.losses.config import LPIPSConfig
from dlightning.utils.logging import get_logger

logger = get_logger(__name__)

_KEY = "loss.lpips.backbone_path"
_SLICE_KEY = re.compile(r"^slice\d+\.(\d+)\.(weight|bias)$")
_TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class LPIPSLoss(nn.Module):
    """Frozen LPIPS distance, averaged over the batch.

    Args:
        metric: an ``lpips.LPIPS`` instance (its backbone already loaded).
    """

    def __init__(self, metric: lpips.LPIPS) -> None:
        super().__init__()
        self.metric = metric.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Keep LPIPS in eval mode (its heads hold dropout) whatever the parent module's mode."""
        super().train(mode)
        self.metric.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS between ``(N, 3, H, W)`` images in [-1, 1]; returns the fp32 mean over the batch."""
        return self.metric(pred.float(), target.float(), normalize=False).mean()


def backbone_state_dict(
    metric: lpips.LPIPS, torchvision_sd: dict[str, torch.Tensor], *, source: str = _KEY
) -> dict[str, torch.Tensor]:
    """Map a torchvision ``features.{i}.*`` state dict onto LPIPS's ``slice{k}.{i}.*`` keys.

    LPIPS keeps torchvision's layer index ``i`` inside each slice, so the mapping is read off the
    LPIPS module itself rather than from a table.

    Args:
        metric: the LPIPS module whose ``net`` is to be filled.
        torchvision_sd: a torchvision VGG-16 / AlexNet state dict (``classifier.*`` keys are ignored).
        source: what to name in error messages.

    Returns:
        A state dict for ``metric.net``.

    Raises:
        MissingWeightsError: a needed ``features.{i}`` tensor is absent or has the wrong shape.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, current in metric.net.state_dict().items():
        match = _SLICE_KEY.match(key)
        if match is None:
            raise ConfigError(f"unexpected LPIPS backbone key {key!r}; only vgg and alex are supported")
        source_key = f"features.{match.group(1)}.{match.group(2)}"
        tensor = torchvision_sd.get(source_key)
        if tensor is None or tensor.shape != current.shape:
            found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise MissingWeightsError(
                f"{source}: {source_key} is {found}, expected {tuple(current.shape)}; the file must be a "
                f"torchvision {metric.pnet_type} ImageNet state dict "
                f"({_TORCHVISION_FILES.get(metric.pnet_type)})"
            )
        mapped[key] = tensor
    return mapped


def _read_backbone(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"{_KEY}={path!r} does not exist; set it to a local torchvision ImageNet state dict "
            f"(vgg: {_TORCHVISION_FILES['vgg']}, alex: {_TORCHVISION_FILES['alex']})"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MissingWeightsError(f"{_KEY}={path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _load_heads(metric: lpips.LPIPS, net: str) -> None:
    """Load the v0.1 linear heads shipped in the lpips package, checking every head is present.

    lpips itself loads them with ``strict=False``, which would silently keep random heads.
    """
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
    if not os.path.isfile(path):
        raise MissingWeightsError(f"the lpips package lacks its linear heads {path}; reinstall lpips==0.1.4")
    heads = torch.load(path, map_location="cpu", weights_only=True)
    expected = {k for k in metric.state_dict() if re.match(r"^lin\d+\.", k)}
    missing = sorted(expected - set(heads))
    if missing:
        raise MissingWeightsError(f"{path} lacks LPIPS head tensors {missing}; reinstall lpips==0.1.4")
    metric.load_state_dict({k: heads[k] for k in expected}, strict=False)


def build_lpips(cfg: LPIPSConfig) -> LPIPSLoss:
    """Build the frozen LPIPS loss without any download.

    Args:
        cfg: the ``loss.lpips`` section.

    Returns:
        The LPIPS loss with the shipped v0.1 linear heads and the backbone from ``cfg.backbone_path``
        (random when the path is None and ``cfg.allow_random_backbone`` is set).

    Raises:
        ConfigError: ``backbone_path`` is None without ``allow_random_backbone``.
        MissingWeightsError: the backbone file is missing or does not match the network.
    """
    if cfg.backbone_path is None and not cfg.allow_random_backbone:
        raise ConfigError(
            f"{_KEY} is not set: give a local torchvision {cfg.net} ImageNet state dict "
            f"({_TORCHVISION_FILES[cfg.net]}), or set loss.lpips.allow_random_backbone=true for tests"
        )
    with warnings.catch_warnings():
        # pnet_rand=True: torchvision builds the backbone with weights=None, so nothing is downloaded
        # (lpips spells it with the deprecated ``pretrained=False``). pretrained=False: the heads are
        # loaded below, strictly, instead of lpips's strict=False load.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        metric = lpips.LPIPS(net=cfg.net, pretrained=False, pnet_rand=True, verbose=False)
    _load_heads(metric, cfg.net)
    if cfg.backbone_path is None:
        logger.warning("%s is not set: LPIPS uses a random backbone (tests / demo only)", _KEY)
    else:
        sd = backbone_state_dict(
            metric, _read_backbone(cfg.backbone_path), source=f"{_KEY}={cfg.backbone_path!r}"
        )
        metric.net.load_state_dict(sd, strict=True)
        logger.info("Loaded LPIPS %s backbone from %s", cfg.net, cfg.backbone_path)
    return LPIPSLoss(metric)

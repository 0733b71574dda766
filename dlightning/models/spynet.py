"""SPyNet optical flow (BasicVSR variant) and pixel-flow warping: loading the frozen weights.

The network and ``flow_warp`` live in the standalone-safe :mod:`dlightning.models.standalone.dloral_cfr`
(every export carries a copy of it); this module adds what only the package needs: reading the public
BasicVSR / DLoRAL weight files (``basic_module.{0..5}.basic_module.{0..4}.conv.{weight,bias}`` and the
``mean``/``std`` buffers, optionally nested or prefixed) without mmcv.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from dlightning.errors import MissingWeightsError
from dlightning.models.standalone.dloral_cfr import NUM_LEVELS, SpyNet, SpyNetBasicModule, flow_warp
from dlightning.utils.logging import get_logger

__all__ = ["NUM_LEVELS", "SpyNet", "SpyNetBasicModule", "flow_warp", "load_spynet"]

logger = get_logger(__name__)

_PREFIXES = ("generator.spynet.", "spynet.")
_NESTING_KEYS = ("state_dict", "params")


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


def load_spynet(path: str | os.PathLike | None, key: str = "model.cfr.spynet_path", *,
                warn_random: bool = True) -> SpyNet:
    """Build a frozen SPyNet, with weights from a local file when ``path`` is given.

    Args:
        path: Local ``.pth`` file in the BasicVSR layout: a raw state dict or one nested under
            ``state_dict`` / ``params``, keys optionally prefixed by ``spynet.`` or
            ``generator.spynet.``. None gives random weights (tests and demos only).
        key: Config key named in error messages.
        warn_random: Warn when ``path`` is None (off where every weight is random by design).

    Returns:
        The SPyNet with every parameter frozen (``requires_grad=False``).

    Raises:
        MissingWeightsError: The file does not exist or does not hold SPyNet weights.
    """
    model = SpyNet()
    if path is None and warn_random:
        logger.warning("%s is not set: SPyNet has random weights, flows are meaningless", key)
    elif path is not None:
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

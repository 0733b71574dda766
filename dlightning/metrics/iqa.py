"""Learned and statistical image-quality metrics: LPIPS, DISTS, MUSIQ, CLIP-IQA, NIQE, BRISQUE.

DISTS and the no-reference metrics run pyiqa's implementations (the ones the papers' tables come from),
built with ``pretrained=False`` and every weight file given as a local path: pyiqa would otherwise
fetch them from the network at construction. LPIPS is the project's own (``lpips`` package, v0.1 heads,
local backbone). Every scorer maps ``(N, 3, H, W)`` RGB in [0, 1] (plus the reference for full-reference
metrics) to per-image scores ``(N,)``.

pyiqa is an optional dependency (``pip install --no-deps pyiqa==0.1.16`` next to the ``eval-light`` extra,
or the ``eval`` extra); the metrics that need it say so when it is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.metrics.weights import require_weight

Scorer = Callable[..., torch.Tensor]


def _pyiqa_arch(module: str):
    """A pyiqa architecture module, or a clear error naming the install command."""
    import importlib

    try:
        return importlib.import_module(f"pyiqa.archs.{module}")
    except ModuleNotFoundError as err:
        raise ConfigError(f"this metric runs pyiqa's implementation, which is not installed ({err.name} is "
                          "missing): pip install --no-deps pyiqa==0.1.16 (or pip install 'dlightning[eval]')"
                          ) from err


class _Scorer(nn.Module):
    """A frozen metric network called as ``scorer(x[, ref]) -> (N,)`` with ``torch.no_grad``."""

    def __init__(self, net: nn.Module, full_reference: bool = False) -> None:
        super().__init__()
        self.net, self.full_reference = net.eval(), full_reference
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float().clamp(0, 1)
        out = self.net(x, ref.float().clamp(0, 1)) if self.full_reference else self.net(x)
        return out.reshape(x.shape[0], -1)[:, 0].float()


def build_musiq(path: str | None, key: str) -> _Scorer:
    """MUSIQ (KonIQ-10k head, pyiqa's ``musiq``) from the local checkpoint at ``path``."""
    arch = _pyiqa_arch("musiq_arch")
    file = require_weight(path, key, "musiq")
    try:
        net = arch.MUSIQ(num_class=1, pretrained=False, pretrained_model_path=str(file))
    except (RuntimeError, KeyError) as err:
        raise MissingWeightsError(f"{key}={path} does not hold MUSIQ KonIQ-10k weights ({err})") from err
    return _Scorer(net)


def build_clipiqa(path: str | None, key: str) -> _Scorer:
    """CLIP-IQA (pyiqa's ``clipiqa``: CLIP RN50, ten antonym prompt pairs) on the CLIP file at ``path``.

    pyiqa's CLIP loader takes a file path in place of a model name, and builds the architecture from the
    file's tensors, so no name is looked up and nothing is fetched.
    """
    arch = _pyiqa_arch("clipiqa_arch")
    file = require_weight(path, key, "clipiqa")
    try:
        net = arch.CLIPIQA(model_type="clipiqa", backbone=str(file), pretrained=False)
    except (RuntimeError, KeyError) as err:
        raise MissingWeightsError(f"{key}={path} does not hold OpenAI CLIP weights ({err})") from err
    # pyiqa keeps the CLIP model outside the module tree (so it is not saved); move it with the scorer.
    return _ClipScorer(net)


class _ClipScorer(_Scorer):
    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        self.net.clip_model[0]._apply(fn)
        return super()._apply(fn, recurse)


def build_niqe(path: str | None, key: str) -> _Scorer:
    """NIQE on Y (pyiqa's ``niqe``) with the pristine-model ``.mat`` file at ``path``."""
    arch = _pyiqa_arch("niqe_arch")
    file = require_weight(path, key, "niqe")
    try:
        net = arch.NIQE(test_y_channel=True, pretrained_model_path=str(file))
    except (KeyError, ValueError, OSError) as err:
        raise MissingWeightsError(f"{key}={path} is not a NIQE parameter file with mu_prisparam and "
                                  f"cov_prisparam ({err})") from err
    return _Scorer(net)


def build_brisque(path: str | None, key: str) -> _Scorer:
    """BRISQUE on Y (pyiqa's ``brisque``) with the SVM file ``(sv_coef, sv)`` at ``path``."""
    arch = _pyiqa_arch("brisque_arch")
    file = require_weight(path, key, "brisque")
    try:
        net = arch.BRISQUE(test_y_channel=True, pretrained_model_path=str(file))
    except (ValueError, TypeError, RuntimeError) as err:
        raise MissingWeightsError(f"{key}={path} is not a BRISQUE (sv_coef, sv) file ({err})") from err
    return _Scorer(net)


@contextlib.contextmanager
def _local_vgg16(path: Path) -> Iterator[None]:
    """While active, ``torchvision.models.vgg16(...)`` returns VGG-16 with the weights of ``path``.

    pyiqa's DISTS asks torchvision for the ImageNet VGG-16 by name, which downloads it; it has no option
    for a local backbone, so the constructor is swapped for one that reads the file.
    """
    import torchvision
    from torchvision.models import vgg16 as torchvision_vgg16

    def local(*_args, **_kwargs) -> nn.Module:
        model = torchvision_vgg16(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        # DISTS uses the convolutional features only; a file with just those (no classifier) is enough.
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        model.features.load_state_dict(features)
        return model

    torchvision.models.vgg16 = local
    try:
        yield
    finally:
        torchvision.models.vgg16 = torchvision_vgg16


def build_dists(vgg_path: str | None, vgg_key: str, path: str | None, key: str) -> _Scorer:
    """DISTS (pyiqa's ``dists``): VGG-16 backbone from ``vgg_path``, alpha/beta from ``path``."""
    arch = _pyiqa_arch("dists_arch")
    vgg = require_weight(vgg_path, vgg_key, "dists_vgg")
    file = require_weight(path, key, "dists")
    try:
        with _local_vgg16(vgg):
            net = arch.DISTS(pretrained=False, pretrained_model_path=str(file))
    except (RuntimeError, KeyError) as err:
        raise MissingWeightsError(f"{vgg_key} / {key}: not VGG-16 and DISTS weights ({err})") from err
    if not {"alpha", "beta"} <= set(torch.load(file, map_location="cpu", weights_only=True)):
        raise MissingWeightsError(f"{key}={path} holds no DISTS alpha/beta tensors")
    return _Scorer(net, full_reference=True)


class LpipsScorer(nn.Module):
    """LPIPS v0.1 (the project's :func:`~dlightning.losses.build_lpips`) as a per-image scorer."""

    def __init__(self, lpips: nn.Module) -> None:
        super().__init__()
        self.lpips = lpips

    @torch.no_grad()
    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.lpips(a[None].float() * 2 - 1, b[None].float() * 2 - 1).reshape(())
                            for a, b in zip(x, ref, strict=True)])


def build_lpips_scorer(path: str | None, key: str, net: str = "vgg") -> LpipsScorer:
    """LPIPS with the ``net`` backbone from the local file ``path``."""
    from dlightning.losses import build_lpips
    from dlightning.losses.config import LPIPSConfig

    file = require_weight(path, key, "lpips")
    return LpipsScorer(build_lpips(LPIPSConfig(net=net, backbone_path=str(file))))

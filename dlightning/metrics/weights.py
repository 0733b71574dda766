"""Local weight files of the metrics: each one comes from a config key and is checked before any work.

Nothing is downloaded: a metric whose file is missing stops with an error naming its config key and the
file to put there (:data:`WEIGHT_FILES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlightning.errors import MissingWeightsError

WEIGHT_FILES: dict[str, str] = {
    "lpips": "torchvision VGG-16 ImageNet weights (vgg16-397923af.pth) or AlexNet (alexnet-owt-7be5be79.pth), "
             "the backbone of LPIPS v0.1",
    "dists_vgg": "torchvision VGG-16 ImageNet weights (vgg16-397923af.pth), the backbone of DISTS",
    "dists": "DISTS alpha/beta weights (pyiqa's DISTS_weights-f5e65c96.pth)",
    "raft": "torchvision RAFT weights (raft_large_C_T_SKHT_V2-ff5fadd5.pth, or raft_small_C_T_V2-01064c6d.pth "
            "with flow.raft_size=small)",
    "spynet": "SPyNet weights in the BasicVSR layout (spynet_20210409-c6c1bd09.pth)",
    "musiq": "MUSIQ KonIQ-10k weights (pyiqa's musiq_koniq_ckpt-e95806b9.pth)",
    "clipiqa": "OpenAI CLIP RN50 weights (RN50.pt, the file the clip package caches), the backbone of CLIP-IQA",
    "niqe": "NIQE pristine-model parameters (pyiqa's niqe_modelparameters.mat)",
    "brisque": "BRISQUE SVM parameters (pyiqa's brisque_svm_weights.pth)",
}
"""What to put at each ``<prefix>.<name>`` weight key."""


def require_weight(path: str | None, key: str, name: str) -> Path:
    """The local file ``path`` of weight ``name``, checked to exist.

    Args:
        path: The configured path (None when unset).
        key: The full config key, named in the error (e.g. ``evaluate.weights.musiq``).
        name: The entry of :data:`WEIGHT_FILES` that says what file belongs there.

    Raises:
        MissingWeightsError: ``path`` is unset or not a file.
    """
    what = WEIGHT_FILES[name]
    if not path:
        raise MissingWeightsError(f"{key} is not set: put {what} on local disk and set {key}=/path/to/file "
                                  "(nothing is downloaded)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingWeightsError(f"{key}={path} does not exist: put {what} there, or point {key} at it")
    return file


@dataclass
class MetricWeights:
    """Local weight files of the metrics (``<section>.weights.<name>``; :data:`WEIGHT_FILES` says which)."""

    lpips: str | None = None
    dists_vgg: str | None = None
    dists: str | None = None
    raft: str | None = None
    spynet: str | None = None
    musiq: str | None = None
    clipiqa: str | None = None
    niqe: str | None = None
    brisque: str | None = None

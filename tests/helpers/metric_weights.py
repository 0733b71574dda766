"""Random-weight stand-ins for every metric's weight file, saved as the real files are laid out.

Each file goes through the metric's real loading path; only the numbers are random (nothing here can be
downloaded). NIQE's and BRISQUE's parameter files are synthesised with the real keys and shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NIQE_FEATURES = 36
"""NIQE's and BRISQUE's feature count (18 per scale, two scales)."""


def vgg16_features(folder: Path) -> Path:
    """A random torchvision VGG-16 state dict (features only: what LPIPS and DISTS read)."""
    import torchvision

    path = folder / "vgg16.pth"
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return path


def dists_weights(folder: Path, vgg: Path) -> Path:
    from pyiqa.archs.dists_arch import DISTS

    from dlightning.metrics.iqa import _local_vgg16

    with _local_vgg16(vgg):
        net = DISTS(pretrained=False)
    path = folder / "dists.pth"
    torch.save({k: v for k, v in net.state_dict().items() if k in ("alpha", "beta")}, path)
    return path


def musiq_weights(folder: Path) -> Path:
    from pyiqa.archs.musiq_arch import MUSIQ

    path = folder / "musiq.pth"
    torch.save(MUSIQ(pretrained=False, num_class=1).state_dict(), path)
    return path


def clip_weights(folder: Path) -> Path:
    """A tiny random ResNet CLIP saved as a TorchScript archive, the format of OpenAI's RN50.pt."""
    import clip as openai_clip
    from pyiqa.archs.clip_model import CLIP

    model = CLIP(embed_dim=32, image_resolution=224, vision_layers=(1, 1, 1, 1), vision_width=32,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=1).eval()
    traced = torch.jit.trace(model, (torch.rand(1, 3, 224, 224), openai_clip.tokenize(["a"])), check_trace=False)
    path = folder / "clip_rn.pt"
    torch.jit.save(traced, str(path))
    return path


def niqe_params(folder: Path, seed: int = 0) -> Path:
    import scipy.io

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(NIQE_FEATURES, NIQE_FEATURES))
    path = folder / "niqe.mat"
    scipy.io.savemat(path, {"mu_prisparam": rng.normal(size=(1, NIQE_FEATURES)),
                            "cov_prisparam": a @ a.T + NIQE_FEATURES * np.eye(NIQE_FEATURES)})
    return path


def brisque_params(folder: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    path = folder / "brisque.pth"
    torch.save((torch.randn(16, 1, generator=g).double(), torch.randn(16, NIQE_FEATURES, generator=g).double()), path)
    return path


def raft_small_weights(folder: Path) -> Path:
    from torchvision.models.optical_flow import raft_small

    path = folder / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    return path


def spynet_weights(folder: Path) -> Path:
    from dlightning.models.spynet import SpyNet

    path = folder / "spynet.pth"
    torch.save(SpyNet().state_dict(), path)
    return path

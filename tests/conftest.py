"""Shared tiny fixtures: toy-size SD 2.1 look-alike models with random weights (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_model_cfg():
    """A ``ModelConfig`` for the tiny preset (x4, parity settings)."""
    from dlightning.models.config import ModelConfig

    return ModelConfig(preset="tiny", scale=4, seed=0)


@pytest.fixture
def make_generator():
    """Factory for tiny generators: ``make_generator(**ModelConfig overrides)``."""
    from dlightning.models.config import ModelConfig
    from dlightning.models.generator import DLoRALGenerator

    def _make(**overrides) -> DLoRALGenerator:
        kwargs = {"preset": "tiny", "scale": 4, "seed": 0}
        kwargs.update(overrides)
        return DLoRALGenerator(ModelConfig(**kwargs))

    return _make


@pytest.fixture
def tiny_generator(make_generator):
    """A fresh tiny generator (seed 0) in eval mode."""
    return make_generator().eval()


@pytest.fixture
def tiny_lq():
    """An LR clip ``(B=2, T=3, 3, 8, 8)`` in [-1, 1] -> HR 32x32, latent 4x4."""
    g = torch.Generator().manual_seed(123)
    return torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1


@pytest.fixture(scope="session")
def tiny_pretrained_dir(tmp_path_factory):
    """A tiny model saved in the diffusers layout of stable-diffusion-2-1-base (seed 0)."""
    from dlightning.models.tiny import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("sd21_tiny"), seed=0)


@pytest.fixture
def randomize_trainables():
    """``randomize(generator, seed)``: add noise to every trainable tensor (LoRA B no longer zero)."""

    def _randomize(generator, seed: int = 7, std: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for params in generator.parameter_groups().values():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)

    return _randomize


@pytest.fixture
def stub_scontrol(tmp_path):
    """A fake ``scontrol``, first on PATH, that appends its arguments to a log file: (bin_dir, log)."""
    from helpers.stubs import make_stub_command

    return make_stub_command(tmp_path, "scontrol")


@pytest.fixture(autouse=True)
def _restore_lightning_rank():
    """Lightning keeps the global rank in a process-wide attribute (``rank_zero_only.rank``); a test that
    builds a Trainer under a simulated multi-rank SLURM job sets it to that rank, which would silence
    every rank-zero logger of later tests in this process."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pl_rank_zero
    from lightning_utilities.core import rank_zero as util_rank_zero

    holders = [m.rank_zero_only for m in (fabric_rank_zero, pl_rank_zero, util_rank_zero)]
    saved = [getattr(h, "rank", 0) for h in holders]
    yield
    for holder, rank in zip(holders, saved, strict=True):
        holder.rank = rank

"""The DLoRAL training objective: pixel MSE, LPIPS, CSD from a frozen teacher and temporal consistency.

:class:`DLoRALLoss` evaluates the unweighted terms of one micro-batch (docs/METHOD.md 5), named as in
:data:`~dlightning.contracts.phases.LOSS_TERMS`; :func:`weighted_total` applies the schedule's
weights. A term whose weight is 0 is not evaluated (it reads as 0), and CSD only where the caller
hands over a teacher. The loss knows nothing of the generator or the trainer: it receives the
generator's outputs, the targets, and for CSD the teacher, the embeddings and a random generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dlightning.losses.config import LossConfig
from dlightning.losses.csd import CSDLoss, Teacher, sample_clip_noise
from dlightning.losses.perceptual import build_lpips
from dlightning.losses.pixel import mse_loss
from dlightning.losses.temporal import build_temporal_loss, farneback_flow_metric


@dataclass
class CSDInputs:
    """What the CSD term needs: the generator's latents and the frozen teacher with its inputs."""

    latents: torch.Tensor
    """Predicted clean latents ``(B, K, 4, h, w)``, with grad."""
    teacher: Teacher
    """Frozen eps-predictor (see :class:`~dlightning.losses.csd.CSDLoss`)."""
    embeds: torch.Tensor
    """``(B, L, D)`` text embeddings of the captions."""
    encode_prompts: Callable[[list[str]], torch.Tensor]
    """Text encoder for the negative prompt of ``loss.csd``."""
    rng: torch.Generator
    """Draws the timesteps and the noise."""


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k weights[k] * terms[k]`` in fp32 (a term without a weight counts 0)."""
    return sum(float(weights.get(k, 0.0)) * v.float() for k, v in terms.items())  # type: ignore[return-value]


class DLoRALLoss(nn.Module):
    """The loss terms of DLoRAL training, built from the ``loss`` config section.

    Args:
        cfg: The ``loss`` section (LPIPS backbone, CSD timesteps and guidance, temporal flow net).
        alphas_cumprod: The teacher's noise schedule (for CSD).
    """

    def __init__(self, cfg: LossConfig, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.lpips = build_lpips(cfg.lpips)
        self.csd = CSDLoss(cfg.csd, alphas_cumprod)
        self.temporal = build_temporal_loss(cfg.temporal)

    def forward(self, pred: torch.Tensor, gt: torch.Tensor, *, weights: Mapping[str, float],
                csd: CSDInputs | None = None) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"l2", "lpips", "csd", "temporal"}`` of one micro-batch.

        Args:
            pred: Generator images ``(B, K, 3, H, W)`` in [-1, 1], with grad.
            gt: Ground truth of the same frames.
            weights: The schedule's weights; a term weighted 0 is not evaluated.
            csd: The latents, the teacher and its inputs; None leaves CSD out.

        Returns:
            One fp32 scalar per term of :data:`~dlightning.contracts.phases.LOSS_TERMS`, in that order.
        """
        frames = range(pred.shape[1])
        zero = pred.new_zeros((), dtype=torch.float32)
        with_csd = csd is not None and weights.get("csd", 0) > 0
        with_temporal = self.temporal is not None and weights.get("temporal", 0) > 0
        return {
            "l2": sum(mse_loss(pred[:, k], gt[:, k]) for k in frames),
            "lpips": sum(self.lpips(pred[:, k].float(), gt[:, k].float()) for k in frames),
            "csd": self._csd(csd) if with_csd else zero,
            "temporal": self._temporal(pred, gt) if with_temporal else zero,
        }

    def flow_metric(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor | None:
        """The reference's Farneback flow difference of the first two frames (a logged metric, CPU).

        None when ``loss.temporal.log_farneback`` is off or the clip has fewer than two frames.
        """
        if not self.cfg.temporal.log_farneback or pred.shape[1] < 2:
            return None
        return torch.tensor(farneback_flow_metric(pred[:, 0].detach(), pred[:, 1].detach(), gt[:, 0], gt[:, 1]))

    def _csd(self, inputs: CSDInputs) -> torch.Tensor:
        """CSD summed over the frames; one noise draw per clip when ``loss.csd.shared_noise``."""
        latents = inputs.latents
        neg = inputs.encode_prompts([self.cfg.csd.negative_prompt])
        noise = sample_clip_noise(latents, shared=self.cfg.csd.shared_noise, generator=inputs.rng)
        total = latents.new_zeros((), dtype=torch.float32)
        for k in range(latents.shape[1]):
            loss, _ = self.csd(latents[:, k], inputs.teacher, inputs.embeds, neg, noise=noise[:, k],
                               generator=inputs.rng)
            total = total + loss
        return total

    def _temporal(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """The warping loss summed over consecutive frame pairs."""
        total = pred.new_zeros((), dtype=torch.float32)
        for k in range(1, pred.shape[1]):
            total = total + self.temporal(pred[:, k - 1], pred[:, k], gt[:, k - 1], gt[:, k])
        return total

"""Training losses: pixel MSE, LPIPS, CSD distillation, temporal consistency (docs/METHOD.md 5).

:class:`DLoRALLoss` composes them into the training objective; the others are its parts.
"""

from dlightning.losses.composite import CSDInputs, DLoRALLoss, weighted_total
from dlightning.losses.csd import CSDLoss, Teacher, sample_clip_noise
from dlightning.losses.perceptual import LPIPSLoss, backbone_state_dict, build_lpips
from dlightning.losses.pixel import mse_loss
from dlightning.losses.temporal import (
    FarnebackFlow,
    TemporalWarpLoss,
    build_temporal_loss,
    farneback_flow_metric,
    occlusion_mask,
)

__all__ = [
    "CSDInputs",
    "CSDLoss",
    "DLoRALLoss",
    "FarnebackFlow",
    "LPIPSLoss",
    "Teacher",
    "TemporalWarpLoss",
    "backbone_state_dict",
    "build_lpips",
    "build_temporal_loss",
    "farneback_flow_metric",
    "mse_loss",
    "occlusion_mask",
    "sample_clip_noise",
    "weighted_total",
]

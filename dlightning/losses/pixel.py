"""Pixel reconstruction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error computed in fp32 (docs/METHOD.md 5.1).

    Args:
        pred: predicted images, any shape, any float dtype.
        target: ground truth of the same shape.

    Returns:
        Scalar fp32 tensor, the mean over every element.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"mse_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    return F.mse_loss(pred.float(), target.float(), reduction="mean")

"""Temporal consistency: a differentiable flow-warping loss and the reference's Farneback metric.

The reference's consistency term (docs/METHOD.md 5.3) has no gradient: it runs OpenCV Farneback on
detached frames. Here the trained loss warps the previous *output* frame with the optical flow of the
*ground-truth* pair (a frozen SPyNet) and penalises how much worse the output's warping residual is
than the ground truth's, on non-occluded pixels. The Farneback L1 flow difference is kept as a logged
metric only, computed on correctly converted uint8 frames.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlightning.losses.config import TemporalConfig
from dlightning.models.spynet import SpyNet, flow_warp, load_spynet

_OCC_RELATIVE = 0.01
_OCC_ABSOLUTE = 0.5
"""Forward-backward consistency thresholds (in pixels^2) of the standard occlusion check."""
_IN_FRAME = 0.999
"""A warped all-ones image below this marks samples that left the frame (zero padding)."""
_FARNEBACK = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}
"""Farneback parameters of the reference (docs/METHOD.md 5.3)."""


def occlusion_mask(flow_fw: torch.Tensor, flow_bw: torch.Tensor) -> torch.Tensor:
    """Valid-pixel mask from a forward-backward flow consistency check.

    ``flow_fw`` maps each pixel p of frame A to p + flow_fw(p) in frame B; ``flow_bw`` maps B to A.
    With b(p) = flow_bw sampled at p + flow_fw(p), p is occluded when
    ``|flow_fw + b|^2 > 0.01 (|flow_fw|^2 + |b|^2) + 0.5``. Pixels whose target falls outside the
    frame read b = 0 and are therefore occluded unless their flow is tiny.

    Args:
        flow_fw: ``(N, 2, H, W)`` flow from frame A to frame B, in pixels.
        flow_bw: ``(N, 2, H, W)`` flow from frame B to frame A.

    Returns:
        ``(N, 1, H, W)`` float mask, 1 = consistent (visible), 0 = occluded.
    """
    bw_at_target = flow_warp(flow_bw, flow_fw, padding_mode="zeros", align_corners=True)
    mismatch = (flow_fw + bw_at_target).pow(2).sum(dim=1, keepdim=True)
    magnitude = flow_fw.pow(2).sum(dim=1, keepdim=True) + bw_at_target.pow(2).sum(dim=1, keepdim=True)
    return (mismatch <= _OCC_RELATIVE * magnitude + _OCC_ABSOLUTE).to(flow_fw.dtype)


class TemporalWarpLoss(nn.Module):
    """Differentiable temporal-consistency loss with ground-truth flow and an occlusion mask.

    For outputs (x_prev, x_cur) and ground truth (y_prev, y_cur), all in [-1, 1]:
    ``F = flow_net(ref=y_cur, supp=y_prev)`` (no grad), ``M`` = forward-backward consistency mask times
    an in-frame mask, and ``loss = L1(M (x_cur - warp(x_prev, F)), M (y_cur - warp(y_prev, F)))``
    (mean over all elements): the output may change between frames only as much as the ground truth
    does along the motion. Gradients reach both output frames.

    Args:
        flow_net: SPyNet (inputs in [0, 1]); it is frozen and kept in eval mode.
    """

    def __init__(self, flow_net: SpyNet | nn.Module) -> None:
        super().__init__()
        self.flow_net = flow_net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TemporalWarpLoss:
        """Keep the frozen flow net in eval mode whatever the parent module's mode."""
        super().train(mode)
        self.flow_net.eval()
        return self

    @torch.no_grad()
    def flow_and_mask(self, gt_prev: torch.Tensor, gt_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow from ``gt_cur`` to ``gt_prev`` and the mask of pixels where warping is trusted.

        Args:
            gt_prev: ``(N, 3, H, W)`` previous ground-truth frames in [-1, 1].
            gt_cur: ``(N, 3, H, W)`` current ground-truth frames in [-1, 1].

        Returns:
            ``(flow (N, 2, H, W) fp32, mask (N, 1, H, W) fp32)``.
        """
        prev01 = ((gt_prev.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        cur01 = ((gt_cur.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        # One batched call for both directions: half the kernel launches of two calls.
        flows = self.flow_net(torch.cat([cur01, prev01]), torch.cat([prev01, cur01])).float()
        flow_fw, flow_bw = flows.chunk(2)
        ones = torch.ones_like(flow_fw[:, :1])
        in_frame = (flow_warp(ones, flow_fw, padding_mode="zeros") > _IN_FRAME).float()
        return flow_fw, occlusion_mask(flow_fw, flow_bw) * in_frame

    def forward(
        self, pred_prev: torch.Tensor, pred_cur: torch.Tensor, gt_prev: torch.Tensor, gt_cur: torch.Tensor
    ) -> torch.Tensor:
        """Loss of one pair of consecutive frames.

        Args:
            pred_prev: ``(N, 3, H, W)`` output for the previous frame, in [-1, 1].
            pred_cur: ``(N, 3, H, W)`` output for the current frame.
            gt_prev: ``(N, 3, H, W)`` ground truth of the previous frame.
            gt_cur: ``(N, 3, H, W)`` ground truth of the current frame.

        Returns:
            Scalar fp32 loss.
        """
        flow, mask = self.flow_and_mask(gt_prev, gt_cur)
        pred_residual = pred_cur.float() - flow_warp(pred_prev.float(), flow)
        with torch.no_grad():
            gt_residual = gt_cur.float() - flow_warp(gt_prev.float(), flow)
        return F.l1_loss(mask * pred_residual, mask * gt_residual, reduction="mean")


class FarnebackFlow(nn.Module):
    """Weight-free flow net with SpyNet's interface: OpenCV Farneback on the CPU, no gradient.

    ``forward(ref, supp)`` returns the ``(N, 2, H, W)`` pixel flow from ``ref`` to ``supp`` (inputs in
    [0, 1]), so that ``flow_warp(supp, flow)`` approximates ``ref``. The loss only needs flow on the
    ground truth, which needs no gradient, so a classical method is a valid choice where no pretrained
    SPyNet file is at hand (the demo) — at the cost of a device-to-host copy per step.
    """

    @torch.no_grad()
    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        flows = []
        for r, s in zip(ref, supp, strict=True):
            f = cv2.calcOpticalFlowFarneback(_to_gray_uint8(r * 2 - 1), _to_gray_uint8(s * 2 - 1), None,
                                             **_FARNEBACK)
            flows.append(torch.from_numpy(f).permute(2, 0, 1))
        return torch.stack(flows).to(ref.device, torch.float32)


def build_temporal_loss(cfg: TemporalConfig) -> TemporalWarpLoss | None:
    """The trained temporal loss of ``loss.temporal`` (None when ``mode`` is none)."""
    if cfg.mode == "none":
        return None
    if cfg.flow_net == "farneback":
        return TemporalWarpLoss(FarnebackFlow())
    return TemporalWarpLoss(load_spynet(cfg.flow_path, key="loss.temporal.flow_path"))


def _to_gray_uint8(frame: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` RGB in [-1, 1] -> ``(H, W)`` uint8 gray, clipped rather than wrapped."""
    rgb = ((frame.detach().float().cpu() + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2GRAY)


def _farneback(prev: torch.Tensor, cur: torch.Tensor) -> np.ndarray:
    """Farneback flow from ``prev`` to ``cur`` normalised by (W, H): ``(H, W, 2)`` float32."""
    flow = cv2.calcOpticalFlowFarneback(_to_gray_uint8(prev), _to_gray_uint8(cur), None, **_FARNEBACK)
    h, w = flow.shape[:2]
    return flow / np.array([w, h], dtype=np.float32)


def farneback_flow_metric(
    pred_prev: torch.Tensor, pred_cur: torch.Tensor, gt_prev: torch.Tensor, gt_cur: torch.Tensor
) -> float:
    """The reference's consistency term as a metric: L1 between output and ground-truth Farneback flows.

    Frames are ``(N, 3, H, W)`` or ``(3, H, W)`` RGB in [-1, 1]; they are mapped to uint8 with
    ``(x + 1) * 127.5`` and clipped (the reference multiplied by 255 and let negatives wrap around).

    Returns:
        Mean absolute flow difference (flow normalised by frame width/height), averaged over the batch.
    """
    frames = [f if f.ndim == 4 else f.unsqueeze(0) for f in (pred_prev, pred_cur, gt_prev, gt_cur)]
    values = [
        float(np.abs(_farneback(pp, pc) - _farneback(gp, gc)).mean())
        for pp, pc, gp, gc in zip(*frames, strict=True)
    ]
    return float(np.mean(values))

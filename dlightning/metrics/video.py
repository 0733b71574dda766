"""Clip metrics of validation: PSNR, SSIM, LPIPS and E*warp (docs/DATA.md 4.1, 4.2).

Conventions (see docs/METRICS.md):

* Frames are RGB float tensors in **[0, 1]**, ``(N, 3, H, W)``; PSNR/SSIM are computed on RGB (or on
  BT.601 luma Y in [0, 1] with ``y_channel=True``: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255),
  after removing ``crop_border`` pixels on each side, per frame, then averaged over frames.
* SSIM: Gaussian window sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03, data range 1, population statistics,
  mean of the SSIM map over valid (un-padded) positions and over channels, i.e. skimage's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
* LPIPS: :func:`dlightning.losses.build_lpips` (v0.1 heads, local backbone), inputs mapped to [-1, 1].
* **E*warp** (Lai et al. 2018): for consecutive frames (I_t, I_t+1) of the evaluated video, the flow
  F_t = flow(t -> t+1) and B_t = flow(t+1 -> t) come from a frozen SPyNet run on the **GT** frames when
  given, else on the evaluated frames. Pixels failing the forward-backward check
  ``|F + B(p + F)|^2 <= 0.01 (|F|^2 + |B(p + F)|^2) + 0.5`` are occluded (M = 0). With
  W_t = warp(I_t+1, F_t) (bilinear backward warping),
  ``E_t = sum_p M(p) * sum_c (W_t - I_t)^2 / sum_p M(p)`` and ``E = mean_t E_t`` on [0, 1] RGB;
  E*warp = 1000 E (the papers' "x 10^-3" tables). A pair with no visible pixel is skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dlightning.losses.temporal import occlusion_mask
from dlightning.models.spynet import SpyNet, flow_warp

_SSIM_SIGMA = 1.5
_SSIM_TAPS = 11
_K1, _K2 = 0.01, 0.03


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [0, 1] of RGB ``(N, 3, H, W)`` in [0, 1], shape ``(N, 1, H, W)``."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (16.0 + (x * w).sum(1, keepdim=True)) / 255.0


def _prepare(pred: torch.Tensor, gt: torch.Tensor, crop_border: int, y_channel: bool,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")
    if pred.ndim == 3:
        pred, gt = pred[None], gt[None]
    pred, gt = pred.double(), gt.double()
    if crop_border:
        c = crop_border
        pred, gt = pred[..., c:-c, c:-c], gt[..., c:-c, c:-c]
    if y_channel:
        pred, gt = rgb_to_y(pred), rgb_to_y(gt)
    return pred, gt


def psnr(pred: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-frame PSNR in dB of ``(N, 3, H, W)`` images in [0, 1] (data range 1); shape ``(N,)``."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    mse = (pred - gt).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse)).float()


def _gauss_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = (_SSIM_TAPS - 1) // 2
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-frame SSIM of ``(N, C, H, W)`` images in [0, 1]; shape ``(N,)`` (see module docstring)."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    n, c, h, w = pred.shape
    if min(h, w) < _SSIM_TAPS:
        raise ValueError(f"SSIM needs frames of at least {_SSIM_TAPS}x{_SSIM_TAPS} px, got {h}x{w}")
    k = _gauss_kernel(pred.dtype, pred.device).expand(c, 1, _SSIM_TAPS, _SSIM_TAPS)

    def filt(x: torch.Tensor) -> torch.Tensor:
        # "valid" convolution = skimage's reflect-padded filtering with its border crop
        return F.conv2d(x, k, groups=c)

    mx, my = filt(pred), filt(gt)
    vx = filt(pred * pred) - mx * mx
    vy = filt(gt * gt) - my * my
    cxy = filt(pred * gt) - mx * my
    c1, c2 = _K1**2, _K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def flows_and_masks(flow_net: SpyNet, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward flows t -> t+1 and their visibility masks for a clip ``(T, 3, H, W)`` in [0, 1].

    Returns:
        ``(flow (T-1, 2, H, W), mask (T-1, 1, H, W))``.
    """
    a, b = frames[:-1].float(), frames[1:].float()
    with torch.no_grad():
        flows = flow_net(torch.cat([a, b]), torch.cat([b, a])).float()
    fw, bw = flows.chunk(2)
    return fw, occlusion_mask(fw, bw)


def warp_error(frames: torch.Tensor, flow_net: SpyNet, flow_frames: torch.Tensor | None = None) -> float:
    """E*warp (x1000) of a clip ``(T, 3, H, W)`` in [0, 1] (definition in the module docstring).

    Args:
        frames: The evaluated clip.
        flow_net: Frozen flow network (``forward(ref, supp)`` = flow ref -> supp, inputs in [0, 1]).
        flow_frames: Frames to compute the flow on (the GT); default ``frames``.

    Returns:
        E*warp, or NaN when the clip has fewer than 2 frames or no visible pixel.
    """
    if frames.shape[0] < 2:
        return math.nan
    src = frames if flow_frames is None else flow_frames
    if src.shape != frames.shape:
        raise ValueError(f"flow_frames {tuple(src.shape)} must match frames {tuple(frames.shape)}")
    flow, mask = flows_and_masks(flow_net, src.to(frames.device))
    warped = flow_warp(frames[1:].float(), flow)
    err = (warped - frames[:-1].float()).pow(2).sum(1, keepdim=True) * mask
    visible = mask.flatten(1).sum(1)
    keep = visible > 0
    if not keep.any():
        return math.nan
    per_pair = err.flatten(1).sum(1)[keep] / visible[keep]
    return float(per_pair.mean()) * 1000.0


class VideoMetrics:
    """PSNR / SSIM / LPIPS / E*warp of output clips against GT clips, averaged per clip then over clips.

    Args:
        flow_net: Frozen SPyNet for E*warp (None skips E*warp).
        lpips: An :class:`~dlightning.losses.LPIPSLoss` (None skips LPIPS).
        crop_border: Border removed before PSNR / SSIM.
        y_channel: PSNR / SSIM on Y instead of RGB.
        extra: More named metrics (a :class:`~dlightning.metrics.suite.MetricSuite`, e.g. DISTS, MUSIQ),
            added to each clip's values under their names.
    """

    def __init__(self, flow_net: SpyNet | None = None, lpips=None, crop_border: int = 0,
                 y_channel: bool = False, extra=None) -> None:
        self.flow_net, self.lpips, self.extra = flow_net, lpips, extra
        self.crop_border, self.y_channel = crop_border, y_channel
        self.per_clip: list[dict[str, float]] = []

    @torch.no_grad()
    def add(self, output: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
        """Score one clip ``(T, 3, H, W)`` in [0, 1]; returns (and stores) its metrics."""
        m = {
            "psnr": float(psnr(output, gt, self.crop_border, self.y_channel).mean()),
            "ssim": float(ssim(output, gt, self.crop_border, self.y_channel).mean()),
        }
        if self.lpips is not None:
            dev = next(self.lpips.parameters()).device
            m["lpips"] = float(self.lpips(output.to(dev) * 2 - 1, gt.to(dev) * 2 - 1))
        if self.flow_net is not None:
            dev = next(self.flow_net.parameters(), torch.empty(0)).device
            m["ewarp"] = warp_error(output.to(dev), self.flow_net, gt.to(dev))
            m["ewarp_gt"] = warp_error(gt.to(dev), self.flow_net)
        if self.extra is not None:
            m.update(self.extra.score(output, gt))
        self.per_clip.append(m)
        return m

    def summary(self) -> dict[str, float]:
        """Mean of every metric over the clips added so far.

        E*warp is undefined (NaN) on a clip whose occlusion mask leaves no visible pixel; such clips
        are left out of its mean. Any other NaN (a broken output) propagates into the mean, so it shows.
        """
        keys = sorted({k for m in self.per_clip for k in m})
        out = {}
        for k in keys:
            vals = [m[k] for m in self.per_clip if k in m and not (k.startswith("ewarp") and math.isnan(m[k]))]
            out[k] = sum(vals) / len(vals) if vals else math.nan
        return out

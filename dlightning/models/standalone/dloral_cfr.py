"""Cross-frame retrieval (CFR): SPyNet flow, latent warping and thresholded cross-frame attention.

docs/METHOD.md 3. Standalone-safe (imports torch and diffusers only): ``dlightning export`` copies this file
verbatim into ``EXPORT/cfr/``, where diffusers loads :class:`CrossFrameRetrievalModel` as a custom
component. The training modules :mod:`dlightning.models.spynet` and :mod:`dlightning.models.cfr` build on
the same classes and functions, so training and every export compute the same flow and fusion.

SPyNet reproduces the BasicVSR state-dict layout (``basic_module.{0..5}.basic_module.{0..4}.conv.*`` and
the ``mean``/``std`` buffers), so the public BasicVSR / DLoRAL weights load without mmcv. The attention is
the reference's un-normalised, per-query thresholded form: ``A = ReLU((Q^T K / sqrt(d) - tau(Q)) /
temperature)``, ``delta = proj_out(A V)``, computed densely or in blocks of query rows (same numbers,
memory linear in the frame area; with per-block activation checkpointing also for backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

NUM_LEVELS = 6
"""Pyramid levels of SPyNet (5 average-pool halvings, so sizes are padded to multiples of 32)."""
_CHANNELS = (8, 32, 64, 32, 16, 2)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
SPYNET_INPUT_RANGES = ("minus_one_one", "zero_one")
"""What SPyNet is fed: [-1, 1] (the released weights' quirk) or [0, 1]."""


# ---------------------------------------------------------------------------------------------- flow
def flow_warp(
    x: torch.Tensor,
    flow: torch.Tensor,
    interpolation: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
) -> torch.Tensor:
    """Sample ``x`` at ``p + flow(p)`` for every pixel ``p`` (backward warping).

    Args:
        x: Tensor ``(N, C, H, W)`` to warp.
        flow: Pixel displacement ``(N, 2, H, W)``; channel 0 is x (width), channel 1 is y (height).
        interpolation: ``grid_sample`` mode (``bilinear`` or ``nearest``).
        padding_mode: ``grid_sample`` padding for samples outside the frame (``zeros``, ``border``).
        align_corners: ``grid_sample`` convention; the pixel grid is normalised with ``W - 1`` and
            ``H - 1``, which is exact for ``align_corners=True``.

    Returns:
        The warped tensor, same shape and dtype as ``x``.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        hint = " (it looks channels-last: pass flow.permute(0, 3, 1, 2))" if flow.shape[-1] == 2 else ""
        raise ValueError(f"flow must have shape (N, 2, H, W), got {tuple(flow.shape)}{hint}")
    if x.shape[-2:] != flow.shape[-2:] or x.shape[0] != flow.shape[0]:
        raise ValueError(
            f"x {tuple(x.shape)} and flow {tuple(flow.shape)} must share batch and spatial size"
        )
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)
    pos_x = xs.view(1, 1, w) + flow[:, 0].to(x.dtype)
    pos_y = ys.view(1, h, 1) + flow[:, 1].to(x.dtype)
    grid = torch.stack((2.0 * pos_x / max(w - 1, 1) - 1.0, 2.0 * pos_y / max(h - 1, 1) - 1.0), dim=-1)
    return F.grid_sample(x, grid, mode=interpolation, padding_mode=padding_mode, align_corners=align_corners)


class _ConvUnit(nn.Module):
    """Holds one conv as ``.conv`` so that keys read ``...{i}.conv.weight`` like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=1, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpyNetBasicModule(nn.Module):
    """One pyramid level: five 7x7 convs (8->32->64->32->16->2), ReLU between, none after the last."""

    def __init__(self) -> None:
        super().__init__()
        self.basic_module = nn.Sequential(
            *[_ConvUnit(c_in, c_out) for c_in, c_out in zip(_CHANNELS[:-1], _CHANNELS[1:], strict=True)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict a residual flow ``(N, 2, H, W)`` from ``[ref, warped supp, flow]`` (8 channels)."""
        last = len(self.basic_module) - 1
        for i, unit in enumerate(self.basic_module):
            x = unit(x)
            if i < last:
                x = F.relu(x)
        return x


class SpyNet(nn.Module):
    """Coarse-to-fine flow network of BasicVSR (6 levels), without mmcv.

    ``forward(ref, supp)`` returns the flow from ``ref`` to ``supp`` in pixels, i.e.
    ``flow_warp(supp, flow) ~ ref``. Inputs are RGB in [0, 1]; ImageNet mean/std normalisation is
    applied inside.
    """

    def __init__(self) -> None:
        super().__init__()
        self.basic_module = nn.ModuleList([SpyNetBasicModule() for _ in range(NUM_LEVELS)])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def compute_flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow on frames whose sides are multiples of ``2 ** (NUM_LEVELS - 1)``.

        Args:
            ref: ``(N, 3, H, W)`` reference frames in [0, 1].
            supp: ``(N, 3, H, W)`` support frames in [0, 1].

        Returns:
            Flow ``(N, 2, H, W)`` from ``ref`` to ``supp`` in pixels.
        """
        ref_pyr = [(ref - self.mean) / self.std]
        supp_pyr = [(supp - self.mean) / self.std]
        for _ in range(NUM_LEVELS - 1):
            ref_pyr.append(F.avg_pool2d(ref_pyr[-1], kernel_size=2, stride=2))
            supp_pyr.append(F.avg_pool2d(supp_pyr[-1], kernel_size=2, stride=2))
        ref_pyr.reverse()
        supp_pyr.reverse()

        n, _, h0, w0 = ref_pyr[0].shape
        flow = ref_pyr[0].new_zeros(n, 2, h0, w0)
        for level, module in enumerate(self.basic_module):
            if level == 0:
                flow_up = flow
            else:
                # Pixel units double with resolution, hence the factor 2.
                flow_up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
            warped = flow_warp(supp_pyr[level], flow_up, padding_mode="border")
            flow = flow_up + module(torch.cat([ref_pyr[level], warped, flow_up], dim=1))
        return flow

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow from ``ref`` to ``supp`` for any frame size.

        Frames are bilinearly resized to the next multiples of 32, and the flow is resized back with
        its x and y components rescaled to the original pixel units.

        Args:
            ref: ``(N, 3, H, W)`` reference frames in [0, 1].
            supp: ``(N, 3, H, W)`` support frames in [0, 1].

        Returns:
            Flow ``(N, 2, H, W)`` in pixels, channel 0 = x, channel 1 = y.
        """
        if ref.shape != supp.shape or ref.ndim != 4 or ref.shape[1] != 3:
            raise ValueError(
                f"ref and supp must both be (N, 3, H, W); got {tuple(ref.shape)} and {tuple(supp.shape)}"
            )
        h, w = ref.shape[-2:]
        multiple = 2 ** (NUM_LEVELS - 1)
        h_up = -(-h // multiple) * multiple
        w_up = -(-w // multiple) * multiple
        if (h_up, w_up) != (h, w):
            ref = F.interpolate(ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
            supp = F.interpolate(supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = self.compute_flow(ref, supp)
        if (h_up, w_up) == (h, w):
            return flow
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        scale = flow.new_tensor([w / w_up, h / h_up]).view(1, 2, 1, 1)
        return flow * scale


# ---------------------------------------------------------------------------------------------- attention
def compute_attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: torch.Tensor,
    temperature: float,
    topk: int = 0,
) -> torch.Tensor:
    """Thresholded attention read-out for a block of query rows.

    Args:
        q: Queries ``(n, heads, B, d)``.
        k: Keys ``(n, heads, d, N)``.
        v: Values ``(n, heads, N, d)``.
        tau: Per-query thresholds ``(n, heads, B)``.
        temperature: Divisor inside the ReLU.
        topk: If > 0, only the ``topk`` largest similarities of each query row can contribute.

    Returns:
        Read-out ``(n, heads, B, d)``.
    """
    sim = torch.matmul(q, k) / math.sqrt(q.shape[-1])
    if 0 < topk < sim.shape[-1]:
        top_sim, idx = sim.topk(topk, dim=-1)
        weights = F.relu((top_sim - tau.unsqueeze(-1)) / temperature)
        attn = torch.zeros_like(sim).scatter(-1, idx, weights)
    else:
        attn = F.relu((sim - tau.unsqueeze(-1)) / temperature)
    return torch.matmul(attn, v)


class CrossFrameAttention(nn.Module):
    """Thresholded, un-normalised cross-attention from the current latent to the warped previous one.

    Parameter keys match the reference ``cross_attn_module``: ``query_conv``, ``key_conv``,
    ``value_conv``, ``proj_out`` (1x1 convs) and ``threshold_fc`` (Linear(embed_dim, 1)).

    Args:
        in_channels: Latent channels (SD VAE: 4).
        heads: Attention heads (parity: 9).
        embed_dim: Channels per head ``d`` (parity: 64).
        temperature: Divisor inside ``ReLU((S - tau) / temperature)`` (parity: 3000). A plain float,
            not saved in the state dict, like the reference.
        block_size: Query rows per block; 0 = dense (one ``(N, N)`` map per head).
        topk: Option, not parity: keep only the k largest similarities per query before the
            threshold ReLU (0 = off, the released weights were trained without it).
        checkpoint_blocks: Recompute each block in backward (activation checkpointing) so that the
            memory kept for backward is also linear in N; only used when ``block_size > 0``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        heads: int = 9,
        embed_dim: int = 64,
        temperature: float = 3000.0,
        block_size: int = 1024,
        topk: int = 0,
        checkpoint_blocks: bool = True,
    ) -> None:
        super().__init__()
        if min(in_channels, heads, embed_dim) < 1:
            raise ValueError("cross-frame attention: in_channels, heads and embed_dim must all be >= 1")
        if temperature <= 0:
            raise ValueError(f"cross-frame attention: temperature={temperature} must be > 0")
        if block_size < 0 or topk < 0:
            raise ValueError("cross-frame attention: block_size and topk must be >= 0")
        inner = heads * embed_dim
        self.heads = heads
        self.embed_dim = embed_dim
        self.temperature = float(temperature)
        self.block_size = block_size
        self.topk = topk
        self.checkpoint_blocks = checkpoint_blocks
        self.query_conv = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)
        self.threshold_fc = nn.Linear(embed_dim, 1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, heads * d, h, w)`` -> ``(n, heads, d, N)``; channel ``c`` belongs to head ``c // d``."""
        n, _, h, w = x.shape
        return x.reshape(n, self.heads, self.embed_dim, h * w)

    def _row_blocks(self, num_rows: int) -> Iterator[slice]:
        step = num_rows if self.block_size == 0 else self.block_size
        for start in range(0, num_rows, step):
            yield slice(start, min(start + step, num_rows))

    def forward(self, cur: torch.Tensor, prev_aligned: torch.Tensor) -> torch.Tensor:
        """Retrieve from ``prev_aligned`` for every position of ``cur``.

        Args:
            cur: Current latent ``(n, C, h, w)`` (queries).
            prev_aligned: Flow-warped previous latent ``(n, C, h, w)`` (keys and values).

        Returns:
            The residual ``delta`` ``(n, C, h, w)``; the caller adds it to ``cur``.
        """
        if cur.shape != prev_aligned.shape:
            raise ValueError(f"cur {tuple(cur.shape)} and prev_aligned {tuple(prev_aligned.shape)} differ")
        n, _, h, w = cur.shape
        q = self._split_heads(self.query_conv(cur)).transpose(-1, -2)  # (n, heads, N, d)
        k = self._split_heads(self.key_conv(prev_aligned))  # (n, heads, d, N)
        v = self._split_heads(self.value_conv(prev_aligned)).transpose(-1, -2)  # (n, heads, N, d)
        tau = self.threshold_fc(q).squeeze(-1)  # (n, heads, N)

        use_ckpt = (
            self.checkpoint_blocks and self.block_size > 0 and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v, tau))
        )
        outs = []
        for rows in self._row_blocks(h * w):
            args = (q[:, :, rows], k, v, tau[:, :, rows], self.temperature, self.topk)
            if use_ckpt:
                outs.append(checkpoint(compute_attention_block, *args, use_reentrant=False))
            else:
                outs.append(compute_attention_block(*args))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (n, heads, N, d)
        out = out.transpose(-1, -2).reshape(n, self.heads * self.embed_dim, h, w)
        return self.proj_out(out)


# ---------------------------------------------------------------------------------------------- CFR
@torch.no_grad()
def flow_on_latent_grid(spynet: nn.Module, lq_prev: torch.Tensor, lq_cur: torch.Tensor,
                        input_range: str = "minus_one_one") -> torch.Tensor:
    """SPyNet flow from the current to the previous frame on the latent grid (no grad).

    Args:
        spynet: The frozen flow network.
        lq_prev: Previous LQ frame at HR size ``(N, 3, H, W)`` in [-1, 1].
        lq_cur: Current LQ frame at HR size ``(N, 3, H, W)`` in [-1, 1].
        input_range: :data:`SPYNET_INPUT_RANGES`.

    Returns:
        Flow ``(N, 2, H/8, W/8)`` in latent pixels, from ``lq_cur`` to ``lq_prev``.
    """
    if lq_prev.shape != lq_cur.shape:
        raise ValueError(f"lq_prev {tuple(lq_prev.shape)} and lq_cur {tuple(lq_cur.shape)} differ")
    frames = torch.cat([lq_prev, lq_cur], dim=0)
    frames = F.interpolate(frames, scale_factor=0.125, mode="bicubic", align_corners=False)
    if input_range == "zero_one":
        frames = (frames + 1.0) / 2.0
    # "minus_one_one" feeds [-1, 1] to a [0, 1] network on purpose: the released CFR was trained so.
    prev_small, cur_small = frames.chunk(2, dim=0)
    return spynet(cur_small, prev_small)


def fuse_previous(attention: nn.Module, z_prev: torch.Tensor, z_cur: torch.Tensor, flow: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp the previous latent to the current frame and add the attention read-out to the current latent.

    Args:
        attention: The :class:`CrossFrameAttention`.
        z_prev: Previous latent ``(N, C, h, w)``.
        z_cur: Current latent ``(N, C, h, w)``.
        flow: Flow ``(N, 2, h, w)`` from current to previous (:func:`flow_on_latent_grid`).

    Returns:
        ``(fused_cur, warped_prev)``: ``z_cur + delta`` and the warped previous latent.
    """
    if flow.shape[-2:] != z_prev.shape[-2:]:
        raise ValueError(
            f"flow {tuple(flow.shape)} does not match the latent grid {tuple(z_prev.shape)}; "
            "compute it with compute_flow on frames 8x the latent size"
        )
    warped_prev = flow_warp(z_prev, flow.to(z_prev.dtype), padding_mode="zeros", align_corners=True)
    fused_cur = z_cur + attention(z_cur, warped_prev)
    return fused_cur, warped_prev


class CrossFrameRetrievalModel(ModelMixin, ConfigMixin):
    """CFR as a diffusers model: ``save_pretrained`` / ``from_pretrained`` of ``EXPORT/cfr/``.

    State-dict keys are the reference layout: ``spynet.*`` and ``cross_attn_module.*`` (the same tensors
    as the training module's ``reference_state_dict()``). Inference only: no activation checkpointing.

    Args:
        in_channels: Latent channels.
        heads: Attention heads.
        embed_dim: Channels per head.
        temperature: Divisor inside the threshold ReLU.
        block_size: Query rows per attention block (0 = dense).
        topk: Top-k similarities per query (0 = off).
        spynet_input_range: :data:`SPYNET_INPUT_RANGES`.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, heads: int = 9, embed_dim: int = 64, temperature: float = 3000.0,
                 block_size: int = 1024, topk: int = 0, spynet_input_range: str = "minus_one_one") -> None:
        super().__init__()
        if spynet_input_range not in SPYNET_INPUT_RANGES:
            raise ValueError(f"spynet_input_range={spynet_input_range!r}; choose one of {list(SPYNET_INPUT_RANGES)}")
        self.spynet = SpyNet().requires_grad_(False)
        self.cross_attn_module = CrossFrameAttention(in_channels, heads, embed_dim, temperature, block_size, topk,
                                                     checkpoint_blocks=False)

    def compute_flow(self, lq_prev: torch.Tensor, lq_cur: torch.Tensor) -> torch.Tensor:
        """Latent-grid flow from the current to the previous frame (:func:`flow_on_latent_grid`)."""
        return flow_on_latent_grid(self.spynet, lq_prev, lq_cur, self.config.spynet_input_range)

    def forward(self, z_prev: torch.Tensor, z_cur: torch.Tensor, flow: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused_cur, warped_prev)`` of one batch of windows (:func:`fuse_previous`)."""
        return fuse_previous(self.cross_attn_module, z_prev, z_cur, flow)

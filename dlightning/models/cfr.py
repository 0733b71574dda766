"""Cross-frame retrieval (CFR): flow-warp the previous latent and read it out with thresholded attention.

The attention is the reference's un-normalised, per-query thresholded form (docs/METHOD.md 3.4):
``A = ReLU((Q^T K / sqrt(d) - tau(Q)) / temperature)``, ``delta = proj_out(A V)``. It can be computed
densely or in blocks of query rows; blocks give the same numbers with memory linear in the frame area
(with per-block activation checkpointing, also for backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.models.config import CFRConfig
from dlightning.models.spynet import flow_warp, load_spynet
from dlightning.utils.logging import get_logger

logger = get_logger(__name__)

_OWN_PREFIXES = ("spynet.", "cross_attn_module.")


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
            raise ConfigError("model.cfr: in_channels, heads and embed_dim must all be >= 1")
        if temperature <= 0:
            raise ConfigError(f"model.cfr.temperature={temperature} must be > 0")
        if block_size < 0 or topk < 0:
            raise ConfigError("model.cfr.block_size and model.cfr.topk must be >= 0")
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


class CrossFrameRetrieval(nn.Module):
    """CFR: frozen SPyNet flow on 1/8-size LQ frames, latent warping, and cross-frame attention.

    Only ``cross_attn_module`` learns; SPyNet is frozen and run under ``no_grad``. The reference's
    unused sub-networks (``feat_extract``, ``weight_predict*``, ...) are not built.

    Args:
        cfg: The ``model.cfr`` config section.
    """

    def __init__(self, cfg: CFRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spynet = load_spynet(cfg.spynet_path)
        self.cross_attn_module = CrossFrameAttention(
            in_channels=cfg.in_channels,
            heads=cfg.heads,
            embed_dim=cfg.embed_dim,
            temperature=cfg.temperature,
            block_size=cfg.block_size,
            topk=cfg.topk,
            checkpoint_blocks=cfg.checkpoint_blocks,
        )

    @torch.no_grad()
    def compute_flow(self, lq_prev: torch.Tensor, lq_cur: torch.Tensor) -> torch.Tensor:
        """Flow from the current to the previous frame on the latent grid.

        Args:
            lq_prev: Previous LQ frame at HR size ``(N, 3, H, W)`` in [-1, 1].
            lq_cur: Current LQ frame at HR size ``(N, 3, H, W)`` in [-1, 1].

        Returns:
            Flow ``(N, 2, H/8, W/8)`` in latent pixels, from ``lq_cur`` to ``lq_prev`` (no grad).
        """
        if lq_prev.shape != lq_cur.shape:
            raise ValueError(f"lq_prev {tuple(lq_prev.shape)} and lq_cur {tuple(lq_cur.shape)} differ")
        frames = torch.cat([lq_prev, lq_cur], dim=0)
        frames = F.interpolate(frames, scale_factor=0.125, mode="bicubic", align_corners=False)
        if self.cfg.spynet_input_range == "zero_one":
            frames = (frames + 1.0) / 2.0
        # "minus_one_one" feeds [-1, 1] to a [0, 1] network on purpose: the released CFR was trained so.
        prev_small, cur_small = frames.chunk(2, dim=0)
        return self.spynet(cur_small, prev_small)

    def forward(
        self, z_prev: torch.Tensor, z_cur: torch.Tensor, flow: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp the previous latent to the current frame and fuse it into the current latent.

        Args:
            z_prev: Previous latent ``(N, C, h, w)``.
            z_cur: Current latent ``(N, C, h, w)``.
            flow: Flow ``(N, 2, h, w)`` from current to previous (from ``compute_flow``).

        Returns:
            ``(fused_cur, warped_prev)``: ``z_cur + delta`` and the warped previous latent.
        """
        if flow.shape[-2:] != z_prev.shape[-2:]:
            raise ValueError(
                f"flow {tuple(flow.shape)} does not match the latent grid {tuple(z_prev.shape)}; "
                "compute it with compute_flow on frames 8x the latent size"
            )
        warped_prev = flow_warp(z_prev, flow.to(z_prev.dtype), padding_mode="zeros", align_corners=True)
        fused_cur = z_cur + self.cross_attn_module(z_cur, warped_prev)
        return fused_cur, warped_prev

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that learn (the cross-attention only; SPyNet stays frozen)."""
        return list(self.cross_attn_module.parameters())

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the reference ``state_dict_bpp`` layout: ``spynet.*`` and ``cross_attn_module.*``."""
        out = {f"spynet.{k}": v for k, v in self.spynet.state_dict().items()}
        out.update({f"cross_attn_module.{k}": v for k, v in self.cross_attn_module.state_dict().items()})
        return out

    def load_reference_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load the reference CFR dict (``state_dict_bpp`` of the official ``model.pkl``).

        Keys of the reference's unused sub-networks are ignored; SPyNet's ``mean``/``std`` buffers may
        be absent (the official loader copies parameters only).

        Args:
            sd: Mapping with ``spynet.*`` and ``cross_attn_module.*`` keys.

        Raises:
            MissingWeightsError: A SPyNet or cross-attention key is missing, unexpected or mis-shaped.
        """
        own = {k: v for k, v in sd.items() if k.startswith(_OWN_PREFIXES)}
        ignored = len(sd) - len(own)
        if ignored:
            logger.debug("CFR: ignoring %d keys of unused reference sub-networks", ignored)
        expected = set(self.reference_state_dict())
        optional = {"spynet.mean", "spynet.std"}
        missing = sorted(expected - set(own) - optional)
        unexpected = sorted(set(own) - expected)
        if missing or unexpected:
            raise MissingWeightsError(
                f"reference CFR state dict does not match: missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}; check model.cfr.heads / embed_dim "
                "(parity: 9 / 64) and that the file is a DLoRAL model.pkl"
            )
        for prefix, module in (("spynet.", self.spynet), ("cross_attn_module.", self.cross_attn_module)):
            part = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(part, strict=False)
            except RuntimeError as err:
                msg = f"reference CFR weights under {prefix!r} mis-shaped: {err}"
                raise MissingWeightsError(msg) from err

"""Cross-frame retrieval (CFR) in training: the config-built module with the reference checkpoint layout.

The computation (SPyNet flow on the latent grid, warping, thresholded attention, docs/METHOD.md 3) lives in
the standalone-safe :mod:`dlightning.models.standalone.dloral_cfr`, which every export carries; this module
adds the config, the frozen-SPyNet weight loading and the reference ``state_dict_bpp`` import/export.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dlightning.errors import MissingWeightsError
from dlightning.models.config import CFRConfig
from dlightning.models.spynet import load_spynet
from dlightning.models.standalone.dloral_cfr import (
    CrossFrameAttention,
    compute_attention_block,
    flow_on_latent_grid,
    fuse_previous,
)
from dlightning.utils.logging import get_logger

__all__ = ["CrossFrameAttention", "CrossFrameRetrieval", "compute_attention_block"]

logger = get_logger(__name__)

_OWN_PREFIXES = ("spynet.", "cross_attn_module.")


class CrossFrameRetrieval(nn.Module):
    """CFR: frozen SPyNet flow on 1/8-size LQ frames, latent warping, and cross-frame attention.

    Only ``cross_attn_module`` learns; SPyNet is frozen and run under ``no_grad``. The reference's
    unused sub-networks (``feat_extract``, ``weight_predict*``, ...) are not built.

    Args:
        cfg: The ``model.cfr`` config section.
        warn_random_spynet: Warn when ``cfg.spynet_path`` is unset (SPyNet keeps random weights).
    """

    def __init__(self, cfg: CFRConfig, *, warn_random_spynet: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.spynet = load_spynet(cfg.spynet_path, warn_random=warn_random_spynet)
        self.cross_attn_module = CrossFrameAttention(
            in_channels=cfg.in_channels,
            heads=cfg.heads,
            embed_dim=cfg.embed_dim,
            temperature=cfg.temperature,
            block_size=cfg.block_size,
            topk=cfg.topk,
            checkpoint_blocks=cfg.checkpoint_blocks,
        )

    def compute_flow(self, lq_prev: torch.Tensor, lq_cur: torch.Tensor) -> torch.Tensor:
        """Flow from the current to the previous frame on the latent grid.

        Args:
            lq_prev: Previous LQ frame at HR size ``(N, 3, H, W)`` in [-1, 1].
            lq_cur: Current LQ frame at HR size ``(N, 3, H, W)`` in [-1, 1].

        Returns:
            Flow ``(N, 2, H/8, W/8)`` in latent pixels, from ``lq_cur`` to ``lq_prev`` (no grad).
        """
        return flow_on_latent_grid(self.spynet, lq_prev, lq_cur, self.cfg.spynet_input_range)

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
        return fuse_previous(self.cross_attn_module, z_prev, z_cur, flow)

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

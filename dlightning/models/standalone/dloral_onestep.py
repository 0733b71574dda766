"""The one-step DLoRAL forward, piece by piece, and its latent tiling (docs/METHOD.md 1.2-1.3, 7.4).

Per window (previous frame p, current frame t): bicubic x scale -> VAE encode -> CFR flow and fusion ->
UNet([warped_p, fused_t], timestep) -> x0 rule -> VAE decode. Standalone-safe (torch and diffusers only):
``dlightning export`` copies this file verbatim next to the export's ``pipeline.py``. The training
generator (:class:`dlightning.models.generator.DLoRALGenerator`) calls the same functions, and
:class:`OneStepModel` assembles them for a loaded export, so training, ``dlightning upscale`` and the
diffusers pipeline run one implementation.

Latent tiling: when the latent area exceeds ``tile ** 2``, CFR and the UNet run per tile and the fused
latent and UNet output are blended with Gaussian weights before the x0 rule. Tiling is an approximation by
construction (the UNet's self-attention and GroupNorm statistics see only the tile; docs/INFERENCE.md has
the numbers); tile starts lie on the UNet's downsampling grid, and a latent that fits in one tile is not
tiled at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

X0_RULES = ("residual", "epsilon")
VAE_LATENTS = ("mode", "sample")
_GAUSS_VAR = 0.01
"""Variance of the blending window on the tile's [0, 1] coordinate (reference value)."""


# ---------------------------------------------------------------------------------------------- pieces
def upsample_lq(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic x ``scale`` of LR frames ``(..., 3, h, w)`` in [-1, 1], clipped to [-1, 1]."""
    lead = lq.shape[:-3]
    up = F.interpolate(lq.flatten(0, -4) if lead else lq[None], scale_factor=scale,
                       mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    return up.reshape(*lead, *up.shape[-3:])


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor, scaling_factor: float, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled VAE latents (fp32) of images ``(N, 3, H, W)`` in [-1, 1], without grad.

    Args:
        vae: The frozen ``AutoencoderKL``.
        images: Input images (cast to the VAE's dtype).
        scaling_factor: The VAE's latent scaling factor.
        sample: Draw ``latent_dist.sample()`` instead of taking its mode.
        generator: Random stream of the sample (None = torch's global one).
    """
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(images.to(dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    return (z * scaling_factor).float()


def decode_latents(vae: nn.Module, z: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [-1, 1] (fp32) from scaled latents; differentiable w.r.t. ``z``."""
    dtype = next(vae.parameters()).dtype
    return vae.decode((z / scaling_factor).to(dtype)).sample.float().clamp(-1.0, 1.0)


def to_x0(fused_cur: torch.Tensor, unet_out: torch.Tensor, rule: str, alphas_cumprod: torch.Tensor,
          timestep: int) -> torch.Tensor:
    """Clean latent from the UNet output: ``residual`` (``fused - out``) or DDPM ``epsilon`` at ``timestep``."""
    if rule == "residual":
        return fused_cur - unet_out
    a = alphas_cumprod[timestep].to(fused_cur.dtype)
    return (fused_cur - (1 - a).sqrt() * unet_out) / a.sqrt()


def latent_flow(cfr: nn.Module, up_prev: torch.Tensor, up_cur: torch.Tensor) -> torch.Tensor:
    """CFR's latent-grid flow (fp32) from HR-size LQ frames, computed in SPyNet's dtype."""
    spy_dtype = next(cfr.spynet.parameters()).dtype
    return cfr.compute_flow(up_prev.to(spy_dtype), up_cur.to(spy_dtype)).float()


def run_unet(unet: nn.Module, warped: torch.Tensor, fused: torch.Tensor, prompt_embeds: torch.Tensor,
             timestep: int) -> torch.Tensor:
    """The 8-channel UNet on ``[warped previous, fused current]`` at ``timestep``, in ``fused``'s dtype."""
    steps = torch.full((fused.shape[0],), timestep, device=fused.device, dtype=torch.long)
    out = unet(torch.cat([warped, fused], dim=1), steps, encoder_hidden_states=prompt_embeds).sample
    return out.to(fused.dtype)


def embed_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> torch.Tensor:
    """``(B, 77, D)`` CLIP ``last_hidden_state`` of ``prompts`` (padded to the encoder's positions)."""
    device = next(text_encoder.parameters()).device
    length = int(text_encoder.config.max_position_embeddings)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def use_sdpa(unet: nn.Module) -> None:
    """PyTorch's scaled-dot-product attention in every attention layer of the UNet (no xformers)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


class OneStepModel:
    """A loaded merged model as the window runner sees it: the forward pieces on its components.

    The same interface as the training generator (``upsample_lq``, ``encode_latents``, ``denoise``,
    ``to_x0``, ``decode_latents``, ``encode_prompts``), built from finished modules: a merged 8-channel
    UNet, the VAE, CFR and the CLIP text encoder.

    Args:
        unet: Merged ``UNet2DConditionModel`` (``in_channels == 8``).
        vae: ``AutoencoderKL``.
        cfr: CFR with ``compute_flow`` and ``forward`` (``CrossFrameRetrievalModel``).
        text_encoder: ``CLIPTextModel``.
        tokenizer: Its tokenizer.
        alphas_cumprod: Noise schedule (used by the ``epsilon`` x0 rule only).
        scale: Super-resolution factor.
        timestep: UNet timestep.
        x0_rule: :data:`X0_RULES`.
        vae_latent: :data:`VAE_LATENTS`.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, cfr: nn.Module, text_encoder: nn.Module, tokenizer,
                 alphas_cumprod: torch.Tensor, *, scale: int, timestep: int = 1, x0_rule: str = "residual",
                 vae_latent: str = "mode") -> None:
        if x0_rule not in X0_RULES or vae_latent not in VAE_LATENTS:
            raise ValueError(f"x0_rule={x0_rule!r} / vae_latent={vae_latent!r}; choose from {X0_RULES} / "
                             f"{VAE_LATENTS}")
        self.unet, self.vae, self.cfr = unet, vae, cfr
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.alphas_cumprod = alphas_cumprod
        self.scale, self.timestep, self.x0_rule, self.vae_latent = int(scale), int(timestep), x0_rule, vae_latent
        self.scaling_factor = float(vae.config.scaling_factor)
        self._prompts: dict[str, torch.Tensor] = {}

    def upsample_lq(self, lq: torch.Tensor) -> torch.Tensor:
        """Bicubic x scale, clipped (:func:`upsample_lq`)."""
        return upsample_lq(lq, self.scale)

    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (:func:`encode_latents`, sampled when the model was trained so)."""
        return encode_latents(self.vae, images, self.scaling_factor, self.vae_latent == "sample", generator)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (:func:`decode_latents`)."""
        return decode_latents(self.vae, z, self.scaling_factor)

    def to_x0(self, fused_cur: torch.Tensor, unet_out: torch.Tensor) -> torch.Tensor:
        """The x0 rule (:func:`to_x0`)."""
        return to_x0(fused_cur, unet_out, self.x0_rule, self.alphas_cumprod, self.timestep)

    def denoise(self, up_prev: torch.Tensor, up_cur: torch.Tensor, z_prev: torch.Tensor, z_cur: torch.Tensor,
                prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CFR and the UNet on prepared windows -> ``(fused_cur, unet_out)``."""
        flow = latent_flow(self.cfr, up_prev, up_cur)
        fused, warped = self.cfr(z_prev, z_cur, flow)
        return fused, run_unet(self.unet, warped, fused, prompt_embeds, self.timestep)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``(B, 77, D)`` embeddings, each distinct prompt encoded once and kept."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._prompts))
        if todo:
            self._prompts.update(zip(todo, embed_prompts(self.tokenizer, self.text_encoder, todo), strict=True))
        return torch.stack([self._prompts[p] for p in prompts])


# ---------------------------------------------------------------------------------------------- tiling
def tile_spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` spans covering ``[0, size)`` with tiles of ``tile`` and stride ``tile - overlap``.

    Starts are multiples of ``align``. The last span ends at the border: it starts at the largest aligned
    offset not beyond ``size - tile``, so it may be up to ``align - 1`` longer than ``tile``. ``tile >=
    size`` gives the single span ``(0, size)``.

    Args:
        size: Length of the axis (latents).
        tile: Tile length.
        overlap: Overlap of neighbouring tiles (``0 <= overlap < tile``).
        align: Grid the starts must lie on (the UNet's total downsampling factor).
    """
    if tile < 1 or not 0 <= overlap < tile or align < 1:
        raise ValueError(f"need tile >= 1, 0 <= overlap < tile and align >= 1, got {tile}, {overlap}, {align}")
    if tile >= size:
        return [(0, size)]
    stride = max((tile - overlap) // align * align, align)
    last = (size - tile) // align * align
    starts = list(range(0, last, stride)) + [last]
    return [(s, s + tile) for s in starts[:-1]] + [(last, size)]


def gaussian_window(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(h, w)`` separable Gaussian weights centred on the tile (symmetric in both axes)."""

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=dtype)
        mid = (n - 1) / 2
        return torch.exp(-((pos - mid) / n) ** 2 / (2 * _GAUSS_VAR)) / math.sqrt(2 * math.pi * _GAUSS_VAR)

    return axis(h)[:, None] * axis(w)[None, :]


def needs_tiling(h: int, w: int, tile: int) -> bool:
    """The reference rule: tile when the latent area exceeds ``tile ** 2``."""
    return h * w > tile * tile


def unet_alignment(model) -> int:
    """Total downsampling factor of ``model.unet`` (8 for SD 2.1, 2 for the tiny preset); 1 if unknown."""
    blocks = getattr(getattr(getattr(model, "unet", None), "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 1


def tiled_denoise(model, up_prev: torch.Tensor, up_cur: torch.Tensor, z_prev: torch.Tensor,
                  z_cur: torch.Tensor, embeds: torch.Tensor, tile: int, overlap: int, align: int = 1,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.denoise`` tile by tile, blended.

    Args:
        model: Anything with ``denoise(up_prev, up_cur, z_prev, z_cur, embeds)``.
        up_prev, up_cur: HR-size LQ frames ``(N, 3, 8h, 8w)``.
        z_prev, z_cur: Latents ``(N, 4, h, w)``.
        embeds: ``(N, 77, D)`` prompt embeddings.
        tile: Latent tile side.
        overlap: Latent overlap.
        align: Tile starts are multiples of this (see :func:`unet_alignment`).

    Returns:
        Blended ``(fused_cur, unet_out)``, each ``(N, 4, h, w)``.
    """
    h, w = z_cur.shape[-2:]
    fused_acc = torch.zeros_like(z_cur, dtype=torch.float32)
    out_acc = torch.zeros_like(fused_acc)
    weight_acc = torch.zeros((h, w), device=z_cur.device, dtype=torch.float32)
    for y0, y1 in tile_spans(h, tile, overlap, align):
        for x0, x1 in tile_spans(w, tile, overlap, align):
            ys, xs = slice(y0, y1), slice(x0, x1)
            ps, px = slice(8 * y0, 8 * y1), slice(8 * x0, 8 * x1)
            fused, out = model.denoise(up_prev[..., ps, px], up_cur[..., ps, px], z_prev[..., ys, xs],
                                       z_cur[..., ys, xs], embeds)
            window = gaussian_window(y1 - y0, x1 - x0, device=z_cur.device)
            fused_acc[..., ys, xs] += fused.float() * window
            out_acc[..., ys, xs] += out.float() * window
            weight_acc[ys, xs] += window
    return fused_acc / weight_acc, out_acc / weight_acc

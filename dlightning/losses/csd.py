"""Classifier score distillation (CSD) from a frozen text-to-image teacher (docs/METHOD.md 5.4).

The teacher is a single frozen diffusion UNet; there is no trainable "fake" score network. For a
predicted clean latent z, with z_t = sqrt(a_t) z + sqrt(1 - a_t) eps at a random t:

    eps_cfg = eps_neg + s (eps_pos - eps_neg)
    x0_real = (z_t - sqrt(1 - a_t) eps_cfg) / sqrt(a_t)
    x0_fake = (z_t - sqrt(1 - a_t) eps_neg) / sqrt(a_t)
    w = mean_{C,H,W} |z - x0_real|              (per sample, DMD-style normaliser, no gradient)
    g = (x0_fake - x0_real) / w
    loss = mse(z, stopgrad(z - g))              (value mean(g^2), gradient 2 g / numel)

Everything after the teacher call is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlightning.errors import ConfigError
from dlightning.losses.config import CSDConfig

Teacher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``teacher(z_t (N, 4, h, w), timesteps (N,), embeds (N, L, D)) -> eps prediction (N, 4, h, w)``."""

_MIN_NORMALISER = 1e-12
"""Floor of w: only reached when z equals the teacher's x0 exactly, where g is 0 anyway."""


def sample_clip_noise(
    latents: torch.Tensor, *, shared: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw the CSD noise for the frames of clips.

    Args:
        latents: ``(B, K, C, h, w)`` predicted latents of K frames per clip.
        shared: one draw per clip, repeated over its K frames (reference behaviour), else one per frame.
        generator: optional random generator (its device is used for the draw).

    Returns:
        fp32 noise of the shape of ``latents`` on their device.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, K, C, h, w), got {tuple(latents.shape)}")
    b, k, c, h, w = latents.shape
    shape = (b, 1, c, h, w) if shared else (b, k, c, h, w)
    noise = _randn(shape, generator, latents.device)
    return noise.expand(b, k, c, h, w).contiguous()


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def _match_batch(embeds: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Broadcast a single (1, L, D) embedding (e.g. the negative prompt) to the batch."""
    if embeds.shape[0] == batch:
        return embeds
    if embeds.shape[0] == 1:
        return embeds.expand(batch, *embeds.shape[1:])
    raise ValueError(f"{name} has batch {embeds.shape[0]}, expected 1 or {batch}")


class CSDLoss(nn.Module):
    """CSD loss on predicted clean latents.

    Args:
        cfg: the ``loss.csd`` section (timestep range and guidance scale).
        alphas_cumprod: ``(num_train_timesteps,)`` cumulative alpha products of the teacher's noise
            schedule (e.g. ``DDPMScheduler.alphas_cumprod`` of SD 2.1).
    """

    def __init__(self, cfg: CSDConfig, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        num_steps = alphas_cumprod.shape[0]
        if not 0 <= cfg.t_min < cfg.t_max <= num_steps:
            raise ConfigError(
                f"loss.csd.t_min={cfg.t_min} / loss.csd.t_max={cfg.t_max} must satisfy "
                f"0 <= t_min < t_max <= {num_steps} (timesteps are drawn in [t_min, t_max))"
            )
        self.cfg = cfg
        # Not persistent: it is a property of the teacher's scheduler, not a trained state.
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float(), persistent=False)

    def forward(
        self,
        z_hat: torch.Tensor,
        teacher: Teacher,
        pos_embeds: torch.Tensor,
        neg_embeds: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CSD loss of a batch of predicted latents.

        Args:
            z_hat: ``(B, 4, h, w)`` predicted clean latents (scaled by the VAE factor), with grad.
            teacher: frozen eps-predictor called once on ``[z_t; z_t]`` with timesteps ``[t; t]`` and
                embeddings ``[neg; pos]`` under ``torch.no_grad``. The training module passes the frozen
                base UNet (adapters disabled, the 4-channel input) wrapped as
                ``lambda z, t, e: unet(z.to(dtype), t, encoder_hidden_states=e).sample``; it may
                return any float dtype (it is cast to fp32).
            pos_embeds: ``(B or 1, L, D)`` text embeddings of the captions.
            neg_embeds: ``(B or 1, L, D)`` embeddings of the negative prompt (the CFG "unconditional").
            noise: ``(B, 4, h, w)`` noise; None draws it. Pass the same noise for the frames of a clip
                for the reference's shared noise (see ``sample_clip_noise``).
            generator: optional random generator for t (and the noise when drawn here).

        Returns:
            ``(loss, stats)``: the fp32 scalar loss and detached per-batch statistics
            (``t_mean``, ``normaliser_mean``, ``grad_rms``).
        """
        batch = z_hat.shape[0]
        z = z_hat.float()
        draw_device = generator.device if generator is not None else z.device
        t = torch.randint(
            self.cfg.t_min, self.cfg.t_max, (batch,), generator=generator, device=draw_device
        ).to(z.device)
        if noise is None:
            noise = _randn(tuple(z.shape), generator, z.device)
        elif noise.shape != z.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match z_hat {tuple(z.shape)}")
        with torch.no_grad():
            g, w = self._score_direction(
                z.detach(),
                t,
                noise.float(),
                teacher,
                _match_batch(pos_embeds, batch, "pos_embeds"),
                _match_batch(neg_embeds, batch, "neg_embeds"),
            )
        loss = F.mse_loss(z, (z - g).detach(), reduction="mean")
        stats = {"t_mean": t.float().mean(), "normaliser_mean": w.mean(), "grad_rms": g.pow(2).mean().sqrt()}
        return loss, stats

    def _score_direction(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        teacher: Teacher,
        pos_embeds: torch.Tensor,
        neg_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return g = (x0_fake - x0_real) / w and the per-sample normaliser w (fp32)."""
        a = self.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
        sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
        z_t = sqrt_a * z + sqrt_1ma * noise
        eps = teacher(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([neg_embeds, pos_embeds]))
        eps_neg, eps_pos = eps.float().chunk(2)
        eps_cfg = eps_neg + self.cfg.guidance_scale * (eps_pos - eps_neg)
        x0_real = (z_t - sqrt_1ma * eps_cfg) / sqrt_a
        x0_fake = (z_t - sqrt_1ma * eps_neg) / sqrt_a
        w = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(_MIN_NORMALISER)
        return (x0_fake - x0_real) / w, w

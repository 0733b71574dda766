"""The one-step DLoRAL generator (docs/METHOD.md 1.2, 1.3, 3.5).

Per target frame t with previous frame p = max(t - 1, 0) (frame 0 uses itself):
LQ --bicubic x scale--> VAE encode (frozen, no grad) --> CFR(z_p, z_t) = (fused_t, warped_p) -->
UNet([warped_p, fused_t], t=timestep, C-LoRA + D-LoRA, 8-ch conv_in) --> x0 rule --> VAE decode.
All target frames of a batch go through CFR, the UNet and the decoder as one batch. Each piece is a
function of :mod:`dlightning.models.standalone.dloral_onestep`, the standalone-safe module every export
carries, so an export runs exactly this forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dlightning.contracts.phases import CONSISTENCY, DETAIL
from dlightning.models.components import Components, load_components
from dlightning.models.config import ModelConfig
from dlightning.models.lora import add_lora_families, family_parameters, teacher_mode
from dlightning.models.prompts import PromptEncoder
from dlightning.models.standalone import dloral_onestep as onestep
from dlightning.models.unet import configure_unet, expand_conv_in
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class GeneratorOutput:
    """What one generator call produces for its K target frames."""

    images: torch.Tensor
    """HR estimates ``(B, K, 3, H, W)`` in [-1, 1]."""
    latents: torch.Tensor
    """Predicted clean latents ``(B, K, 4, H/8, W/8)``, scaled by the VAE scaling factor."""


class DLoRALGenerator(nn.Module):
    """SD 2.1 UNet with an 8-channel conv_in, C-LoRA + D-LoRA families, CFR, frozen VAE and text encoder.

    Frozen: VAE, text encoder, base UNet weights, SPyNet. Trainable (``requires_grad`` from construction
    on, whatever the phase): both LoRA families, ``conv_in`` (weight and bias) and the CFR cross-attention.

    Args:
        cfg: The ``model`` config section.
        components: Pre-built Stable Diffusion components (default: :func:`load_components` of ``cfg``).
    """

    def __init__(self, cfg: ModelConfig, components: Components | None = None) -> None:
        super().__init__()
        from dlightning.models.cfr import CrossFrameRetrieval

        if cfg.preset == "sd21_meta":
            raise ValueError("model.preset=sd21_meta has no weights and cannot build a generator; "
                             "use dlightning.models.inspect for it")
        self.cfg = cfg
        comp = components if components is not None else load_components(cfg)
        self.vae = comp.vae.requires_grad_(False).eval()
        self.prompt_encoder = PromptEncoder(comp.tokenizer, comp.text_encoder, cfg.prompt_cache_size)
        self.unet = comp.unet
        self.unet.requires_grad_(False)
        expand_conv_in(self.unet, bias=cfg.conv_in_bias)
        with torch.random.fork_rng(devices=[]):
            # LoRA and CFR initialisation depend on model.seed only, not on the caller's RNG state.
            torch.manual_seed(cfg.seed)
            self.lora_targets = add_lora_families(self.unet, cfg.lora)
            # The tiny preset is random throughout (tests, demo): a random SPyNet there is no news.
            self.cfr = CrossFrameRetrieval(cfg.cfr, warn_random_spynet=cfg.preset != "tiny")
        configure_unet(self.unet, cfg.gradient_checkpointing)
        self.register_buffer("alphas_cumprod", comp.alphas_cumprod.clone(), persistent=False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self._freeze_all_but_trainable()
        self.parameter_groups()  # checks that the groups cover the trainable set exactly

    # ---------------------------------------------------------------- parameters
    def _freeze_all_but_trainable(self) -> None:
        self.requires_grad_(False)
        for group in self._groups().values():
            for p in group:
                p.requires_grad_(True)
        self.cfr.spynet.eval()

    @property
    def conv_in(self) -> nn.Conv2d:
        """The trainable 8-channel conv (the peft ``base_layer`` when conv_in carries adapters)."""
        conv = self.unet.conv_in
        return getattr(conv, "base_layer", conv)

    def _groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "c_lora": [p for _, p in family_parameters(self.unet, CONSISTENCY)],
            "cfr": list(self.cfr.trainable_parameters()),
            "d_lora": [p for _, p in family_parameters(self.unet, DETAIL)],
            "conv_in": [self.conv_in.weight, self.conv_in.bias],
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer group, keyed (and ordered) as
        :data:`~dlightning.contracts.phases.PARAM_GROUPS`.

        The groups are disjoint and together hold every parameter that requires grad exactly once.

        Raises:
            RuntimeError: The groups overlap or miss a trainable parameter (a wiring bug).
        """
        groups = self._groups()
        seen: dict[int, str] = {}
        for name, params in groups.items():
            for p in params:
                if id(p) in seen:
                    raise RuntimeError(f"parameter in both groups {seen[id(p)]!r} and {name!r}")
                seen[id(p)] = name
        trainable = {id(p): n for n, p in self.named_parameters() if p.requires_grad}
        stray = sorted(n for i, n in trainable.items() if i not in seen)
        frozen = sorted(name for i, name in seen.items() if i not in trainable)
        if stray or frozen:
            raise RuntimeError(f"parameter groups do not match the trainable set: requires grad but in no "
                               f"group: {stray[:5]}; in a group but frozen: {frozen[:5]}")
        return groups

    def train(self, mode: bool = True) -> DLoRALGenerator:
        """Set train/eval mode; the frozen VAE, text encoder and SPyNet always stay in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.prompt_encoder.train(False)
        self.cfr.spynet.eval()
        return self

    def cast_frozen(self, dtype: torch.dtype) -> DLoRALGenerator:
        """Cast frozen weights (VAE, text encoder, SPyNet, base UNet) to ``dtype``; trainables stay fp32.

        Mixed dtypes inside the UNet need an autocast context (Lightning's ``bf16-mixed`` / ``16-mixed``)
        around the forward.
        """
        # Tensor by tensor rather than Module.to(): the UNet mixes frozen and trainable weights.
        for module in (self.vae, self.prompt_encoder.text_encoder, self.cfr.spynet, self.unet):
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
            for buf in module.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(dtype)
        return self

    def teacher(self):
        """Context manager: ``self.unet`` as the pristine 4-channel SD UNet (CSD teacher), see
        :func:`~dlightning.models.lora.teacher_mode`."""
        return teacher_mode(self.unet)

    # ---------------------------------------------------------------- pieces of the forward
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``(B, 77, D)`` text embeddings of ``prompts`` (frozen, cached)."""
        return self.prompt_encoder.encode(prompts)

    def upsample_lq(self, lq: torch.Tensor) -> torch.Tensor:
        """Bicubic x ``cfg.scale`` of LR frames ``(..., 3, h, w)``, clipped to [-1, 1]."""
        return onestep.upsample_lq(lq, self.cfg.scale)

    @property
    def vae_latent(self) -> str:
        """``mode`` or ``sample``: how VAE latents are taken (``model.vae_latent``)."""
        return self.cfg.vae_latent

    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of images ``(N, 3, H, W)`` in [-1, 1] (no grad; mode or sample per config).

        ``generator`` is the random stream of sampled latents (None = torch's global one, as in training).
        """
        return onestep.encode_latents(self.vae, images, self.scaling_factor, self.cfg.vae_latent == "sample",
                                      generator)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [-1, 1] from scaled latents; differentiable w.r.t. ``z``."""
        return onestep.decode_latents(self.vae, z, self.scaling_factor)

    def to_x0(self, fused_cur: torch.Tensor, unet_out: torch.Tensor) -> torch.Tensor:
        """Clean latent from the UNet output: ``residual`` (parity) or DDPM ``epsilon`` at the timestep."""
        return onestep.to_x0(fused_cur, unet_out, self.cfg.x0_rule, self.alphas_cumprod, self.cfg.timestep)

    def denoise(self, up_prev: torch.Tensor, up_cur: torch.Tensor, z_prev: torch.Tensor, z_cur: torch.Tensor,
                prompt_embeds: torch.Tensor, *, cfr_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """CFR and the UNet on prepared windows: the part of the forward between VAE encode and x0 rule.

        Used by :meth:`forward` and by the tiled inference pipeline (one call per latent tile).

        Args:
            up_prev: Previous LQ frames at HR size ``(N, 3, H, W)`` in [-1, 1] (for the flow).
            up_cur: Current LQ frames at HR size ``(N, 3, H, W)``.
            z_prev: Scaled latents of ``up_prev`` ``(N, 4, H/8, W/8)``.
            z_cur: Scaled latents of ``up_cur``.
            prompt_embeds: ``(N, 77, D)`` text embeddings, one per window.
            cfr_grad: False skips the backward of the CFR attention (its gradients come out as zeros);
                the detail phase uses it, as CFR does not train there and nothing upstream of the UNet
                depends on the UNet's parameters, so every other gradient is unchanged.

        Returns:
            ``(fused_cur, unet_out)``, both ``(N, 4, H/8, W/8)`` in the latents' dtype; the clean latent
            is ``to_x0(fused_cur, unet_out)``.
        """
        flow = onestep.latent_flow(self.cfr, up_prev, up_cur)
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and cfr_grad):
            fused, warped = self.cfr(z_prev, z_cur, flow)
        if grad and not cfr_grad:
            # Keep CFR's tensors in the graph with zero gradient: DDP without find_unused_parameters
            # expects a gradient for every trainable tensor in every step.
            fused = fused + 0.0 * sum(p.sum() for p in self.cfr.trainable_parameters())
        return fused, onestep.run_unet(self.unet, warped, fused, prompt_embeds, self.cfg.timestep)

    def _check_inputs(self, lq: torch.Tensor, prompt_embeds: torch.Tensor, targets: list[int]) -> None:
        if lq.ndim != 5 or lq.shape[2] != 3:
            raise ValueError(f"lq must be (B, T, 3, h, w), got {tuple(lq.shape)}")
        b, t, _, h, w = lq.shape
        if (h * self.cfg.scale) % 8 or (w * self.cfg.scale) % 8:
            raise ValueError(f"LQ size {h}x{w} x scale {self.cfg.scale} must be a multiple of 8 "
                             "(VAE latent grid)")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != b:
            raise ValueError(f"prompt_embeds must be (B={b}, 77, D), got {tuple(prompt_embeds.shape)}")
        bad = [i for i in targets if not 0 <= i < t]
        if bad or not targets:
            raise ValueError(f"targets {targets} must be a non-empty list of frame indices in [0, {t})")

    # ---------------------------------------------------------------- forward
    def forward(self, lq: torch.Tensor, prompt_embeds: torch.Tensor,
                targets: Sequence[int] | None = None, *, cfr_grad: bool = True) -> GeneratorOutput:
        """Super-resolve the target frames of LR clips.

        Args:
            lq: LR frames ``(B, T, 3, h, w)`` in [-1, 1].
            prompt_embeds: ``(B, 77, D)`` text embeddings (:meth:`encode_prompts`).
            targets: Frame indices to produce (default every frame); frame t uses frame max(t - 1, 0) as
                its previous frame.
            cfr_grad: see :meth:`denoise` (False in the detail phase of training).

        Returns:
            GeneratorOutput with ``images (B, K, 3, H, W)`` and ``latents (B, K, 4, H/8, W/8)``.
        """
        targets = list(range(lq.shape[1])) if targets is None else [int(i) for i in targets]
        self._check_inputs(lq, prompt_embeds, targets)
        b, k = lq.shape[0], len(targets)
        prevs = [max(i - 1, 0) for i in targets]
        needed = sorted(set(targets) | set(prevs))
        slot = {frame: j for j, frame in enumerate(needed)}
        cur_idx, prev_idx = [slot[i] for i in targets], [slot[i] for i in prevs]

        up = self.upsample_lq(lq[:, needed])                       # (B, F, 3, H, W)
        latents = self.encode_latents(up.flatten(0, 1)).unflatten(0, (b, len(needed)))
        fused, unet_out = self.denoise(up[:, prev_idx].flatten(0, 1), up[:, cur_idx].flatten(0, 1),
                                       latents[:, prev_idx].flatten(0, 1), latents[:, cur_idx].flatten(0, 1),
                                       prompt_embeds.repeat_interleave(k, dim=0), cfr_grad=cfr_grad)
        z = self.to_x0(fused, unet_out)
        images = self.decode_latents(z)
        return GeneratorOutput(images=images.unflatten(0, (b, k)), latents=z.unflatten(0, (b, k)))


def build_generator(cfg: ModelConfig) -> DLoRALGenerator:
    """Build the generator of ``cfg`` (loads or builds its components; nothing is downloaded)."""
    gen = DLoRALGenerator(cfg)
    counts = {k: sum(p.numel() for p in v) for k, v in gen.parameter_groups().items()}
    log.info("generator built (preset %s); trainable parameters per group: %s", cfg.preset, counts)
    return gen

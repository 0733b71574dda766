"""The REFERENCE training step (yjsunnn/DLoRAL ``train_DLoRAL.py``), re-implemented for timing only.

It reuses dlightning's modules with the reference's settings and reproduces what makes that step slow
(docs/METHOD.md 1.1, 1.2, 3.4, 4.2, 4.5, 4.6, 9 items 2 and 19):

* the VAE requires grad and its encoder runs with autograd on (activations kept, VAE gradients
  computed every step and never cleared: the VAE is in no optimizer);
* SPyNet requires grad in the consistency phase (all CFR parameters are unfrozen) and its flow is
  computed with autograd on;
* dense CFR attention (``block_size=0``: one ``(N, N)`` map per head kept for backward);
* the two windows ``(0, 1)`` and ``(1, 2)`` are two separate generator calls (frame 1 encoded twice);
* each generator call re-encodes the positive, negative and null prompts (6 text-encoder passes);
* the CSD teacher is a SECOND UNet copy, stored in fp16 (bf16/fp32 on CPU, where fp16 is slow);
* the phase's groups are toggled with ``requires_grad`` every step; one AdamW over 4 groups,
  clipping of group 0 only, ``zero_grad(set_to_none=True)``;
* fp16 runs use autocast + GradScaler; the latent is ``latent_dist.sample()``;
* the consistency term is OpenCV Farneback flow on detached frames (a constant, no gradient);
* ``gc.collect()`` and ``torch.cuda.empty_cache()`` after every step.

Left out (so the measured reference is faster than the real one): the RAM Swin-L tagger run on the
GT frame every step, DDP ``find_unused_parameters=True``, the PNG dumps.
"""

from __future__ import annotations

import copy
import gc
from typing import Any

import torch
import torch.nn.functional as F
from common import autocast

from dlightning.losses import CSDLoss, farneback_flow_metric, mse_loss, sample_clip_noise
from dlightning.losses.config import CSDConfig
from dlightning.models.config import ModelConfig
from dlightning.models.generator import DLoRALGenerator

REFERENCE_LR = 5e-5


def reference_model_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the reference's settings: dense CFR, sampled latents, random conv_in bias."""
    ref = copy.deepcopy(cfg)
    ref.cfr.block_size = 0
    ref.cfr.checkpoint_blocks = False
    ref.vae_latent = "sample"
    ref.conv_in_bias = "random"
    ref.prompt_cache_size = 0
    return ref


class ReferenceStep:
    """Runs one reference optimizer step (one micro-batch) on a batch of 3-frame clips.

    Args:
        generator: A generator built from :func:`reference_model_config` (fp32 everywhere).
        teacher_unet: A separate pristine 4-channel UNet (the reference's ``CSDLoss.unet_fix``).
        lpips: The LPIPS loss module (frozen).
        csd_cfg: CSD settings (timesteps, guidance, negative prompt).
        precision: ``fp32``, ``bf16`` or ``fp16`` (fp16: GradScaler as Accelerate does).
        device: Where everything runs.
        empty_cache: ``gc.collect()`` + ``torch.cuda.empty_cache()`` after every step (reference).
    """

    def __init__(self, generator: DLoRALGenerator, teacher_unet: torch.nn.Module, lpips: torch.nn.Module,
                 csd_cfg: CSDConfig, *, precision: str, device: torch.device,
                 empty_cache: bool = True) -> None:
        self.gen, self.lpips, self.csd_cfg = generator, lpips, csd_cfg
        self.precision, self.device, self.empty_cache = precision, device, empty_cache
        groups = generator.parameter_groups()  # before the reference's requires_grad changes
        self.groups = {"quality": groups["d_lora"], "consistency": groups["c_lora"], "cfr": groups["cfr"],
                       "base": groups["conv_in"]}
        generator.vae.requires_grad_(True)  # docs/METHOD.md 1.1 [BUG]: never frozen in training
        teacher_dtype = torch.float16 if device.type == "cuda" else (
            torch.bfloat16 if precision == "bf16" else torch.float32)
        self.teacher = teacher_unet.to(device=device, dtype=teacher_dtype).requires_grad_(False).eval()
        self.csd = CSDLoss(csd_cfg, generator.alphas_cumprod).to(device)
        self.optimizer = torch.optim.AdamW(
            [{"params": p, "name": n} for n, p in self.groups.items()],
            lr=REFERENCE_LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    # ------------------------------------------------------------------------------ pieces
    def _set_phase(self, phase: str) -> None:
        train_c = phase == "consistency"
        for p in self.groups["quality"]:
            p.requires_grad_(not train_c)
        for p in self.groups["consistency"] + self.groups["cfr"]:
            p.requires_grad_(train_c)
        self.gen.cfr.spynet.requires_grad_(train_c)  # all CFR params, SPyNet included
        for p in self.groups["base"]:
            p.requires_grad_(True)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        enc = self.gen.prompt_encoder
        ids = enc.tokenizer(prompts, padding="max_length", max_length=enc.max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
        return enc.text_encoder(ids).last_hidden_state

    def _generator_call(self, lq_up: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, ...]:
        """One reference ``Generator.forward`` on a 2-frame window ``(B, 2, 3, H, W)`` at HR size."""
        gen, b = self.gen, lq_up.shape[0]
        pos = self._encode_text(captions)
        neg = self._encode_text([self.csd_cfg.negative_prompt] * b)
        self._encode_text([""] * b)  # null prompt: encoded every call, never used
        frames = lq_up.flatten(0, 1)
        z = gen.vae.encode(frames).latent_dist.sample() * gen.scaling_factor  # with autograd
        z = z.unflatten(0, (b, 2))
        small = F.interpolate(frames, scale_factor=0.125, mode="bicubic", align_corners=False)
        small = small.unflatten(0, (b, 2))
        flow = gen.cfr.spynet(small[:, 1], small[:, 0])  # with autograd when SPyNet requires grad
        fused, warped = gen.cfr(z[:, 0], z[:, 1], flow.float())
        t = torch.ones(b, dtype=torch.long, device=self.device)
        out = gen.unet(torch.cat([warped, fused], dim=1), t, encoder_hidden_states=pos.float()).sample
        z_hat = fused - out
        img = gen.vae.decode(z_hat / gen.scaling_factor).sample.clamp(-1, 1)
        return img, z_hat, pos, neg

    def _teacher(self, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = next(self.teacher.parameters()).dtype
        return self.teacher(z_t.to(dtype), t, encoder_hidden_states=text.to(dtype)).sample

    def compute_loss(self, batch: dict[str, Any], phase: str, weights: dict[str, float]) -> torch.Tensor:
        """Forward of both windows and the weighted loss (under the caller's autocast)."""
        lq_up = self.gen.upsample_lq(batch["lq"])
        hr, captions = batch["hr"], list(batch["caption"])
        outs = [self._generator_call(lq_up[:, i:i + 2], captions) for i in (0, 1)]
        noise = sample_clip_noise(outs[0][1].unsqueeze(1).float(), shared=True)[:, 0]
        total = hr.new_zeros((), dtype=torch.float32)
        for k, (img, z_hat, pos, neg) in enumerate(outs, start=1):
            total = total + weights.get("l2", 0.0) * mse_loss(img.float(), hr[:, k].float())
            total = total + weights.get("lpips", 0.0) * self.lpips(img.float(), hr[:, k].float())
            if phase == "detail" and weights.get("csd", 0.0) > 0:
                csd, _ = self.csd(z_hat.float(), self._teacher, pos, neg, noise=noise)
                total = total + weights["csd"] * csd
        cons = farneback_flow_metric(outs[0][0].detach(), outs[1][0].detach(), hr[:, 1], hr[:, 2])
        return total + weights.get("temporal", 0.0) * torch.tensor(cons, device=self.device)

    # ------------------------------------------------------------------------------ step
    def step(self, batch: dict[str, Any], phase: str, weights: dict[str, float]) -> float:
        """One full reference step (forward, backward, clip group 0, AdamW, zero_grad); returns the loss."""
        self._set_phase(phase)
        with autocast(self.device, self.precision):
            loss = self.compute_loss(batch, phase, weights)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grads = [p for p in self.groups["quality"] if p.grad is not None]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, 1.0)  # param group 0 (D-LoRA) only
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.empty_cache:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return float(loss.detach())


def build_reference_step(model_cfg: ModelConfig, *, components, teacher_unet: torch.nn.Module,
                         lpips: torch.nn.Module, csd_cfg: CSDConfig, precision: str, device: torch.device,
                         empty_cache: bool = True) -> ReferenceStep:
    """Build the reference generator (fp32 master weights) on ``device`` and its step."""
    gen = DLoRALGenerator(reference_model_config(model_cfg), components=components).to(device)
    gen.train()
    return ReferenceStep(gen, teacher_unet, lpips, csd_cfg, precision=precision, device=device,
                         empty_cache=empty_cache)

"""The diffusers pipeline of a dlightning export: one-step DLoRAL video super-resolution.

``dlightning export`` copies this file verbatim into the export, next to ``model_index.json``, so that
diffusers loads the export without dlightning installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(EXPORT, custom_pipeline=EXPORT, trust_remote_code=True)
    frames = pipe(list_of_frames).frames      # PIL images, 4x the input size

The call runs :class:`~.dloral_frames.WindowRunner` on :class:`~.dloral_onestep.OneStepModel`, the code
``dlightning upscale`` runs, so both give the same frames. Difference: ``dlightning upscale`` can also tile
the VAE with whole-frame GroupNorm statistics (its default for frames above 1536 px); this pipeline runs
the VAE on whole frames, or with diffusers' own VAE tiling when ``vae_tile_size > 0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel

from .dloral_frames import COLOR_FIXES, WindowRunner, WindowSettings, diffusers_vae_tiling
from .dloral_onestep import OneStepModel, use_sdpa

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DLoRALVSROutput(BaseOutput):
    """The upscaled frames: PIL images, uint8 arrays ``(H, W, 3)``, or a float tensor ``(T, 3, H, W)`` in [0, 1]."""

    frames: list[PIL.Image.Image] | list[np.ndarray] | torch.Tensor


def _frame_to_uint8(frame) -> np.ndarray:
    """One input frame (PIL image, uint8 array ``(h, w, 3)``) as a contiguous RGB uint8 array."""
    if isinstance(frame, PIL.Image.Image):
        return np.asarray(frame.convert("RGB"))
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"a frame must be a PIL image or a uint8 array (h, w, 3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def frames_as_uint8(frames) -> list[np.ndarray]:
    """The pipeline's inputs as RGB uint8 frames.

    Accepted: a list of PIL images or of uint8 arrays ``(h, w, 3)``; a uint8 array or tensor ``(T, h, w, 3)``;
    a float tensor ``(T, 3, h, w)`` in [0, 1] (rounded to uint8 first, as a decoded video would be).
    """
    if isinstance(frames, torch.Tensor):
        if frames.is_floating_point():
            if frames.ndim != 4 or frames.shape[1] != 3:
                raise ValueError(f"a float frame tensor must be (T, 3, h, w) in [0, 1], got {tuple(frames.shape)}")
            frames = (frames.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
        frames = frames.detach().cpu().numpy()
    return [_frame_to_uint8(f) for f in frames]


class DLoRALVSRPipeline(DiffusionPipeline):
    """One-step DLoRAL video super-resolution: a merged 8-channel UNet, CFR, the SD VAE and text encoder.

    Every output frame t comes from the window (t - 1, t) of LQ frames (frame 0 from (0, 0)).

    Args:
        unet: The merged UNet (``in_channels == 8``).
        vae: The SD VAE.
        text_encoder: The CLIP text encoder (dlightning keeps it in fp32: load with
            ``torch_dtype={"default": torch.bfloat16, "text_encoder": torch.float32}`` to do the same).
        tokenizer: Its tokenizer.
        scheduler: The SD noise schedule (only the ``epsilon`` x0 rule reads it).
        cfr: The cross-frame retrieval module (``cfr/dloral_cfr.py``).
        scale: Super-resolution factor.
        timestep: UNet timestep of the one-step forward.
        x0_rule: residual | epsilon.
        vae_latent: mode | sample.
        color_fix: Default colour fix (adain | wavelet | none).
        prompt: Default prompt.
    """

    model_cpu_offload_seq = "text_encoder->cfr->unet->vae"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 scheduler: DDPMScheduler, cfr: ModelMixin, scale: int = 4, timestep: int = 1,
                 x0_rule: str = "residual", vae_latent: str = "mode", color_fix: str = "adain",
                 prompt: str = "") -> None:
        super().__init__()
        if unet.config.in_channels != 8:
            raise ValueError(f"the UNet has {unet.config.in_channels} input channels; a merged DLoRAL UNet has 8")
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, cfr=cfr)
        self.register_to_config(scale=scale, timestep=timestep, x0_rule=x0_rule, vae_latent=vae_latent,
                                color_fix=color_fix, prompt=prompt)
        use_sdpa(unet)

    def one_step_model(self) -> OneStepModel:
        """The forward pieces on this pipeline's components (the object the window runner drives)."""
        alphas = self.scheduler.alphas_cumprod.float().to(self.unet.device)
        return OneStepModel(self.unet, self.vae, self.cfr, self.text_encoder, self.tokenizer, alphas,
                            scale=self.config.scale, timestep=self.config.timestep, x0_rule=self.config.x0_rule,
                            vae_latent=self.config.vae_latent)

    @torch.no_grad()
    def __call__(self, frames: Sequence | np.ndarray | torch.Tensor, prompt: str | None = None,
                 color_fix: str | None = None, batch_windows: int = 4, min_short_side: int = 128,
                 tile_size: int = 96, tile_overlap: int = 32, vae_tile_size: int = 0, seed: int | None = 42,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 ) -> DLoRALVSROutput | tuple:
        """Upscale one frame sequence (a video's frames, in order).

        Args:
            frames: PIL images, uint8 arrays ``(h, w, 3)`` or a tensor (see :func:`frames_as_uint8`); one size.
            prompt: Prompt of every frame (default: the export's).
            color_fix: adain | wavelet | none (default: the export's).
            batch_windows: (previous, current) windows per UNet call.
            min_short_side: Frames with a shorter short side are bicubic-enlarged to it first; the output
                is resized back to exactly ``scale x`` the input.
            tile_size: Latent tile side; latents larger than ``tile_size ** 2`` are tiled.
            tile_overlap: Latent tile overlap.
            vae_tile_size: > 0: diffusers' VAE tiling with tiles of this many pixels; 0: whole frames.
            seed: Seeds the latent sampling of a ``vae_latent=sample`` model when no ``generator`` is given.
            generator: Random stream of sampled latents.
            output_type: pil (PIL images), np (uint8 arrays ``(H, W, 3)``) or pt (float ``(T, 3, H, W)`` in [0, 1]).
            return_dict: Return a :class:`DLoRALVSROutput` (else a one-element tuple).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {list(OUTPUT_TYPES)}")
        fix = self.config.color_fix if color_fix is None else color_fix
        if fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={fix!r}; choose one of {list(COLOR_FIXES)}")
        settings = WindowSettings(batch_windows=batch_windows, min_short_side=min_short_side, tile_size=tile_size,
                                  tile_overlap=tile_overlap, color_fix=fix)
        device = self.unet.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        runner = WindowRunner(self.one_step_model(), self.config.scale, settings,
                              self.config.prompt if prompt is None else prompt, dtype=self.unet.dtype,
                              device=device, vae_context=self._vae_context(vae_tile_size), generator=generator)
        out = list(runner.upscale(frames_as_uint8(frames)))
        result = self._as_output_type(out, output_type)
        return DLoRALVSROutput(frames=result) if return_dict else (result,)

    def _vae_context(self, vae_tile_size: int):
        if vae_tile_size <= 0:
            return contextlib.nullcontext
        return lambda: diffusers_vae_tiling(self.vae, vae_tile_size)

    @staticmethod
    def _as_output_type(frames: list[np.ndarray], output_type: str):
        if output_type == "np":
            return frames
        if output_type == "pil":
            return [PIL.Image.fromarray(f) for f in frames]
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0

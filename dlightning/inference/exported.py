"""Load a merged export folder (format: :mod:`dlightning.contracts.export_format`) as a runnable generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlightning.contracts import export_format
from dlightning.contracts.config_io import from_container
from dlightning.errors import MissingWeightsError
from dlightning.models.config import ModelConfig
from dlightning.models.generator import DLoRALGenerator
from dlightning.models.prompts import PromptEncoder
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


class ExportedGenerator(DLoRALGenerator):
    """The merged single-step model: plain 8-channel UNet (LoRA fused), CFR, VAE, text encoder.

    It reuses every forward piece of :class:`DLoRALGenerator` (``upsample_lq``, ``encode_latents``,
    ``denoise``, ``to_x0``, ``decode_latents``, ``forward``) but is assembled from finished modules:
    no conv_in surgery, no adapters, nothing trainable.

    Args:
        cfg: Model settings read from the export (scale, timestep, x0 rule, VAE latent mode, CFR).
        unet: The merged ``UNet2DConditionModel`` (``in_channels == 8``).
        vae: ``AutoencoderKL``.
        text_encoder: ``CLIPTextModel``.
        tokenizer: CLIP tokenizer.
        cfr: ``CrossFrameRetrieval`` with loaded weights.
        alphas_cumprod: The noise schedule (only used by ``x0_rule=epsilon``).
        meta: The export metadata.
    """

    def __init__(self, cfg: ModelConfig, *, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, cfr: nn.Module, alphas_cumprod: torch.Tensor, meta: dict[str, Any]) -> None:
        # DLoRALGenerator.__init__ builds and adapts a fresh UNet; here every part is already final.
        nn.Module.__init__(self)
        self.cfg = cfg
        self.meta = meta
        self.vae = vae.requires_grad_(False).eval()
        self.prompt_encoder = PromptEncoder(tokenizer, text_encoder, cfg.prompt_cache_size)
        self.unet = unet.requires_grad_(False).eval()
        self.cfr = cfr.requires_grad_(False).eval()
        self.lora_targets: dict[str, list[str]] = {}
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def _groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def train(self, mode: bool = True) -> ExportedGenerator:
        """An exported model is inference-only; it always stays in eval mode."""
        return super().train(False)


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> ExportedGenerator:
    """Load an export folder onto ``device`` in ``dtype`` (CFR's SPyNet buffers stay as saved).

    Args:
        path: The export folder.
        device: Target device.
        dtype: Compute dtype of UNet, VAE and CFR (the text encoder stays fp32, docs/METHOD.md 1.6).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from dlightning.models.cfr import CrossFrameRetrieval

    root = Path(path)
    meta = export_format.read_metadata(root)
    model_dict = dict(meta["model_config"])
    model_dict["cfr"] = {**model_dict["cfr"], "spynet_path": None}  # weights come from the CFR file
    cfg = from_container(model_dict, ModelConfig)
    folders = export_format.component_folders(root, meta)
    unet = UNet2DConditionModel.from_pretrained(folders["unet"], local_files_only=True, torch_dtype=dtype)
    if unet.config.in_channels != 8 or unet.conv_in.in_channels != 8:
        raise MissingWeightsError(f"{folders['unet']} is not a merged DLoRAL UNet (in_channels != 8)")
    vae = AutoencoderKL.from_pretrained(folders["vae"], local_files_only=True, torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(folders["text_encoder"], local_files_only=True,
                                                 torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(folders["tokenizer"], local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(folders["scheduler"], local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        cfr = CrossFrameRetrieval(cfg.cfr)
    cfr.load_reference_state_dict(load_file(str(root / export_format.CFR_FILE)))
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    gen = ExportedGenerator(cfg, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, cfr=cfr,
                            alphas_cumprod=scheduler.alphas_cumprod.float(), meta=meta)
    gen.to(device)
    gen.cfr.to(dtype)
    log.info("loaded export %s (scale x%d, fused %s)", root, cfg.scale, meta.get("fused_families"))
    return gen

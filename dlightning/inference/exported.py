"""Load a merged export folder (format: :mod:`dlightning.contracts.export_format`) as a runnable generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlightning.contracts import export_format
from dlightning.contracts.config_io import from_container
from dlightning.errors import MissingWeightsError
from dlightning.inference.quiet import cast, quiet_model_io
from dlightning.models.config import CFRConfig, ModelConfig
from dlightning.models.generator import DLoRALGenerator
from dlightning.models.prompts import PromptEncoder
from dlightning.models.standalone.dloral_cfr import CrossFrameRetrievalModel
from dlightning.models.standalone.dloral_onestep import use_sdpa
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
    """Load a merged export folder onto ``device`` in ``dtype``.

    The components are read as the export's diffusers pipeline reads them (same classes, same files), so
    both run the same weights.

    Args:
        path: The export folder.
        device: Target device.
        dtype: Compute dtype of UNet, VAE and CFR (the text encoder stays fp32, docs/METHOD.md 1.6).

    Raises:
        MissingWeightsError: Not a complete merged export, or its UNet is not a merged 8-channel one.
    """
    root = Path(path)
    meta = export_format.read_metadata(root)
    model_dict = dict(meta["model_config"])
    model_dict["cfr"] = {**model_dict["cfr"], "spynet_path": None}  # weights come from the export
    cfg = from_container(model_dict, ModelConfig)
    folders = export_format.component_folders(root, meta)
    with quiet_model_io():
        return _load_components(root, folders, cfg, meta, device, dtype)


def _load_components(root: Path, folders: dict[str, Path], cfg: ModelConfig, meta: dict[str, Any],
                     device: str | torch.device, dtype: torch.dtype) -> ExportedGenerator:
    """Every component of a merged export (the folders of :func:`export_format.component_folders`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folders["unet"], local_files_only=True, torch_dtype=dtype)
    if unet.config.in_channels != 8 or unet.conv_in.in_channels != 8:
        raise MissingWeightsError(f"{folders['unet']} is not a merged DLoRAL UNet (in_channels != 8)")
    vae = AutoencoderKL.from_pretrained(folders["vae"], local_files_only=True, torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(folders["text_encoder"], local_files_only=True,
                                                 torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(folders["tokenizer"], local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(folders["scheduler"], local_files_only=True)
    cfr = _load_cfr(folders[export_format.CFR_DIR], cfg, dtype)
    use_sdpa(unet)
    gen = ExportedGenerator(cfg, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, cfr=cfr,
                            alphas_cumprod=scheduler.alphas_cumprod.float(), meta=meta)
    gen.to(device)
    log.info("loaded export %s (scale x%d, fused %s)", root, cfg.scale, meta.get("fused_families"))
    return gen


def cfr_settings(cfg: CFRConfig) -> dict[str, Any]:
    """The constructor arguments of :class:`CrossFrameRetrievalModel` for a ``model.cfr`` section."""
    return {"in_channels": cfg.in_channels, "heads": cfg.heads, "embed_dim": cfg.embed_dim,
            "temperature": cfg.temperature, "block_size": cfg.block_size, "topk": cfg.topk,
            "spynet_input_range": cfg.spynet_input_range}


def _load_cfr(where: Path, cfg: ModelConfig, dtype: torch.dtype) -> CrossFrameRetrievalModel:
    """CFR in ``dtype`` from the export's ``cfr/`` component folder, or from a format 1 ``cfr.safetensors``."""
    from safetensors.torch import load_file

    if where.is_dir():
        return CrossFrameRetrievalModel.from_pretrained(where, local_files_only=True, torch_dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        cfr = CrossFrameRetrievalModel(**cfr_settings(cfg.cfr))
    state = load_file(str(where))
    missing = sorted(set(cfr.state_dict()) - set(state) - {"spynet.mean", "spynet.std"})
    if missing:
        raise MissingWeightsError(f"{where} lacks CFR tensors {missing[:5]}; re-run `dlightning export`")
    cfr.load_state_dict(state, strict=False)
    return cast(cfr, dtype).eval()

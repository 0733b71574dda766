"""The pretrained Stable Diffusion 2.1 base components, read from a local folder (never downloaded).

Presets (``ModelConfig.preset``):

* ``sd21``: read ``model.pretrained_path`` in the diffusers layout (unet/, vae/, text_encoder/,
  tokenizer/, scheduler/). The folder is checked before anything is loaded.
* ``tiny``: the same architectures at toy size with random weights (:mod:`dlightning.models.tiny`).
* ``sd21_meta``: the full SD 2.1 base architecture on the meta device (no weights, no memory), for
  inspection only; it cannot run a forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlightning.errors import MissingWeightsError
from dlightning.models.config import ModelConfig
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

# Architecture of stabilityai/stable-diffusion-2-1-base (diffusers configs, values that matter).
SD21_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "dual_cross_attention": False,
    "use_linear_projection": True,
}

SD21_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD21_TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

ALL_PARTS = ("unet", "vae", "text_encoder", "tokenizer")

_CONFIG_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json"),
}


@dataclass
class Components:
    """The Stable Diffusion pieces the generator is built from.

    ``tokenizer`` is None for the ``sd21_meta`` preset; parts not requested from
    :func:`load_components` are None.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    alphas_cumprod: torch.Tensor
    """Cumulative product of (1 - beta_t) of the training noise schedule, float32, shape (1000,)."""


def _missing_parts(root: Path, parts: tuple[str, ...]) -> list[str]:
    """Every missing subfolder / config / weight file of a diffusers SD folder (all, not the first)."""
    missing: list[str] = []
    for sub in (*parts, "scheduler"):
        folder = root / sub
        if not folder.is_dir():
            missing.append(f"{sub}/ (folder)")
            continue
        if sub == "tokenizer":
            has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            if not has_bpe and not (folder / "tokenizer.json").is_file():
                missing.append("tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
            continue
        missing += [f"{sub}/{f}" for f in _CONFIG_FILES[sub] if not (folder / f).is_file()]
        names = _WEIGHT_FILES.get(sub, ())
        if names and not any((folder / f).is_file() for f in names):
            missing.append(f"{sub}/{names[0]} (weights; or {', '.join(names[1:])})")
    return missing


def validate_pretrained_path(path: str | None, parts: tuple[str, ...] = ALL_PARTS) -> Path:
    """Check a local SD 2.1 base folder before loading anything.

    Args:
        path: Value of ``model.pretrained_path``.
        parts: Components that will be loaded (the scheduler is always needed).

    Returns:
        The folder as a Path.

    Raises:
        MissingWeightsError: The path is unset, absent, or lacks subfolders, configs or weights; the
            message lists every missing part and what to put there.
    """
    hint = ("Put a local copy of stabilityai/stable-diffusion-2-1-base in the diffusers layout there "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/, e.g. from `huggingface-cli download` "
            "on a machine with internet), or use model.preset=tiny for a random toy model.")
    if path is None:
        raise MissingWeightsError(f"model.pretrained_path is not set (preset sd21 needs it). {hint}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingWeightsError(f"model.pretrained_path={str(path)!r} is not a folder. {hint}")
    missing = _missing_parts(root, parts)
    if missing:
        raise MissingWeightsError(
            f"model.pretrained_path={str(path)!r} is incomplete; missing: {'; '.join(missing)}. {hint}")
    return root


def _scheduler_from(config: dict | None = None, root: Path | None = None):
    from diffusers import DDPMScheduler

    from dlightning.models.tiny import SD21_SCHEDULER_CONFIG

    if root is not None:
        return DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return DDPMScheduler(**(config or SD21_SCHEDULER_CONFIG))


def _load_sd21(cfg: ModelConfig, parts: tuple[str, ...]) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = validate_pretrained_path(cfg.pretrained_path, parts)
    log.info("loading Stable Diffusion components %s from %s", list(parts), root)
    out: dict = {}
    if "unet" in parts:
        out["unet"] = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
    if "vae" in parts:
        out["vae"] = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    if "text_encoder" in parts:
        out["text_encoder"] = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    if "tokenizer" in parts:
        out["tokenizer"] = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    out["scheduler"] = _scheduler_from(root=root)
    return out


def _build_sd21_meta(parts: tuple[str, ...]) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out: dict = {}
    # Every tensor created in this context lives on the meta device: shapes only, no memory, no init.
    with torch.device("meta"):
        if "unet" in parts:
            out["unet"] = UNet2DConditionModel(**SD21_UNET_CONFIG)
        if "vae" in parts:
            out["vae"] = AutoencoderKL(**SD21_VAE_CONFIG)
        if "text_encoder" in parts:
            out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG))
    out["scheduler"] = _scheduler_from()
    return out


def _build_tiny(cfg: ModelConfig, parts: tuple[str, ...]) -> dict:
    from dlightning.models.tiny import build_tiny_modules

    return build_tiny_modules(cfg.seed, parts)


def load_components(cfg: ModelConfig, parts: tuple[str, ...] = ALL_PARTS) -> Components:
    """Load (sd21), build (tiny) or lay out on meta (sd21_meta) the Stable Diffusion components.

    Args:
        cfg: The model section of the config.
        parts: Subset of ``("unet", "vae", "text_encoder", "tokenizer")`` to provide; the others are None.

    Returns:
        Components in fp32 (meta tensors for sd21_meta), every module in eval mode.

    Raises:
        MissingWeightsError: preset sd21 and ``model.pretrained_path`` is unset or incomplete.
    """
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {list(ALL_PARTS)}")
    if cfg.preset == "sd21":
        mods = _load_sd21(cfg, parts)
    elif cfg.preset == "tiny":
        mods = _build_tiny(cfg, parts)
    else:
        mods = _build_sd21_meta(parts)
    for name in ("unet", "vae", "text_encoder"):
        if mods.get(name) is not None:
            mods[name].eval()
    scheduler = mods["scheduler"]
    return Components(
        unet=mods.get("unet"),
        vae=mods.get("vae"),
        text_encoder=mods.get("text_encoder"),
        tokenizer=mods.get("tokenizer"),
        noise_scheduler=scheduler,
        alphas_cumprod=scheduler.alphas_cumprod.detach().to(torch.float32).clone(),
    )

"""Toy-size Stable Diffusion 2.1 look-alike: same architectures, random weights, no download.

The tiny preset keeps the structural features that matter to dlightning (SD 2.1-style cross-attention
blocks with linear projections, an x8 VAE with 4 latent channels and scaling factor 0.18215, a CLIP
text tower with 77 positions, SD 2.1's noise schedule) so the LoRA target rule, the CFR latent grid and
the generator forward behave as with the real model, at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CROSS_ATTENTION_DIM = 32
"""Hidden size of the tiny text encoder = cross-attention width of the tiny UNet."""

TINY_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}

TINY_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    # four levels -> three downsamplers -> latent = image / 8, as in SD
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
    "act_fn": "silu",
}

TINY_TEXT_CONFIG: dict = {
    "hidden_size": TINY_CROSS_ATTENTION_DIM,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": TINY_CROSS_ATTENTION_DIM,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

SD21_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
"""Noise schedule of stable-diffusion-2-1-base (shared by the tiny preset)."""

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte-level symbols (no merges), padding to 77 tokens.

    Every string tokenizes (character by character), so any caption works offline.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {_BOS: 0, _EOS: 1}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    # SD 2.1's tokenizer pads with "!"; any in-vocab token works for the tiny one.
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)


def tiny_vocab_size() -> int:
    """Vocabulary size of :func:`tiny_tokenizer` (2 specials + 256 symbols + 256 end-of-word symbols)."""
    return 2 + 2 * 256


def build_tiny_modules(seed: int, parts: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer"),
                       ) -> dict:
    """Build the tiny unet, vae, text_encoder, tokenizer and scheduler with weights seeded by ``seed``.

    Each module is seeded on its own, so building a subset gives the same weights as building all.

    Args:
        seed: Seed of the random initialisation; the same seed gives bit-identical weights.
        parts: Modules to build besides the scheduler.

    Returns:
        Dict with the requested keys plus ``scheduler``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def seeded(offset: int, build):
        # fork_rng keeps the caller's global RNG stream untouched by the tiny model's initialisation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 10 + offset)
            return build()

    out: dict = {"scheduler": DDPMScheduler(**SD21_SCHEDULER_CONFIG)}
    if "unet" in parts:
        out["unet"] = seeded(0, lambda: UNet2DConditionModel(**TINY_UNET_CONFIG))
    if "vae" in parts:
        out["vae"] = seeded(1, lambda: AutoencoderKL(**TINY_VAE_CONFIG))
    if "tokenizer" in parts or "text_encoder" in parts:
        tokenizer = tiny_tokenizer()
        if "tokenizer" in parts:
            out["tokenizer"] = tokenizer
        if "text_encoder" in parts:
            text_cfg = CLIPTextConfig(vocab_size=tiny_vocab_size(), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **TINY_TEXT_CONFIG)
            out["text_encoder"] = seeded(2, lambda: CLIPTextModel(text_cfg))
    return out


def save_tiny_pretrained(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny model in the diffusers folder layout of stable-diffusion-2-1-base.

    The folder is loadable by the ``sd21`` preset (``model.pretrained_path``), so tests exercise the real
    loading path.

    Args:
        directory: Target folder (created if needed).
        seed: Seed of the random weights (same seed as ``ModelConfig(preset="tiny", seed=...)``).

    Returns:
        The folder path.
    """
    import json

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    modules = build_tiny_modules(seed)
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        modules[name].save_pretrained(root / name)
    write_tokenizer_files(modules["tokenizer"], root / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def write_tokenizer_files(tokenizer, folder: Path) -> None:
    """Write the tokenizer as SD 2.1's folder holds it: vocab.json + merges.txt (no tokenizer.json)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: character-level BPE
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": tokenizer.pad_token,
              "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              "unk_token": tokenizer.unk_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

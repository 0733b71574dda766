"""Write a random-weight model folder in the diffusers layout, for benchmarks at a chosen size.

    python benchmarks/model_folder.py --unet small --out /tmp/small320   # 2-level UNet (320, 320)
    python benchmarks/model_folder.py --unet sd21 --out /tmp/sd21random  # full SD 2.1 architecture

The folder is what ``model.pretrained_path`` reads (unet/, vae/, text_encoder/, tokenizer/,
scheduler/), so the benchmarks exercise the real loading path. The VAE is SD 2.1's at full size in
both cases (its encode and decode at 512x512 are a large share of a step); ``small`` keeps SD 2.1's
first UNet level twice (320, 320 channels, cross-attention width 1024) and a 2-layer text encoder of
SD 2.1's width. The tokenizer is the tiny byte-level one: its ids are valid in CLIP's vocabulary and
text content does not change the timings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SMALL_UNET_OVERRIDES: dict = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 320),
    "attention_head_dim": (5, 5),
}
"""The ``small`` UNet: SD 2.1's config with two levels of 320 channels."""


def write_model_folder(out: str | Path, *, unet: str = "small", seed: int = 0) -> Path:
    """Write the random-weight folder ``out`` with a ``small`` or ``sd21`` UNet; returns its path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dlightning.models.components import SD21_TEXT_CONFIG, SD21_UNET_CONFIG, SD21_VAE_CONFIG
    from dlightning.models.tiny import SD21_SCHEDULER_CONFIG, tiny_tokenizer, write_tokenizer_files

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--out {root} is not empty; give a new folder")
    unet_cfg = {**SD21_UNET_CONFIG, **(SMALL_UNET_OVERRIDES if unet == "small" else {})}
    text_cfg = {**SD21_TEXT_CONFIG, **({"num_hidden_layers": 2} if unet == "small" else {})}
    torch.manual_seed(seed)
    modules = {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**SD21_VAE_CONFIG),
               "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg)),
               "scheduler": DDPMScheduler(**SD21_SCHEDULER_CONFIG)}
    for name, module in modules.items():
        module.save_pretrained(root / name)
    write_tokenizer_files(tiny_tokenizer(), root / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write the folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=["small", "sd21"], default="small")
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_model_folder(args.out, unet=args.unet, seed=args.seed))


if __name__ == "__main__":
    main()

"""The DLoRAL generator and its parts (components, 8-channel UNet, LoRA families, CFR, prompts).

Names are imported lazily so that ``import dlightning.models.config`` stays free of diffusers/peft.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Components": "components",
    "load_components": "components",
    "save_tiny_pretrained": "tiny",
    "DLoRALGenerator": "generator",
    "GeneratorOutput": "generator",
    "build_generator": "generator",
    "PromptEncoder": "prompts",
    "add_lora_families": "lora",
    "family_parameters": "lora",
    "select_lora_targets": "lora",
    "set_family_scales": "lora",
    "teacher_mode": "lora",
    "expand_conv_in": "unet",
    "load_reference_checkpoint": "reference_ckpt",
    "write_reference_checkpoint": "reference_ckpt",
    "inspect_model": "inspect",
    "format_inspection": "inspect",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

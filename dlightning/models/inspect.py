"""Count what the generator trains, without weights: the UNet and both LoRA families on the meta device.

For SD 2.1 base at r = 4 this reports 94 / 148 / 16 target modules (encoder / decoder / mid),
4,055,856 LoRA parameters per family, 23,360 for conv_in (docs/METHOD.md 2.1, 2.5). The adapters are really
injected by peft (on meta tensors), so the counts are those of the model that trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dlightning.contracts.phases import LORA_FAMILIES
from dlightning.errors import MissingWeightsError
from dlightning.models.config import ModelConfig
from dlightning.models.lora import GROUPS, adapter_name, add_lora_families
from dlightning.models.unet import expand_conv_in


def _unet_config(cfg: ModelConfig) -> dict:
    from dlightning.models.components import SD21_UNET_CONFIG
    from dlightning.models.tiny import TINY_UNET_CONFIG

    if cfg.preset == "tiny":
        return dict(TINY_UNET_CONFIG)
    if cfg.preset == "sd21_meta":
        return dict(SD21_UNET_CONFIG)
    path = Path(cfg.pretrained_path or "") / "unet" / "config.json"
    if cfg.pretrained_path is None or not path.is_file():
        raise MissingWeightsError(f"model.pretrained_path={cfg.pretrained_path!r}: {path} not found; point "
                                  "it at a local stable-diffusion-2-1-base folder or use preset sd21_meta")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _build_meta_unet(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_unet_config(cfg))
        expand_conv_in(unet, bias=cfg.conv_in_bias)
        targets = add_lora_families(unet, cfg.lora)
    return unet, targets


def _cfr_trainable(cfg: ModelConfig) -> int:
    from dlightning.models.cfr import CrossFrameAttention

    # Only the attention trains; building it alone reads no SPyNet weights.
    with torch.device("meta"):
        attn = CrossFrameAttention(cfg.cfr.in_channels, heads=cfg.cfr.heads, embed_dim=cfg.cfr.embed_dim)
    return sum(p.numel() for p in attn.parameters())


def inspect_model(cfg: ModelConfig) -> dict:
    """Target modules and trainable parameter counts of the generator of ``cfg`` (no weights loaded).

    Args:
        cfg: The model section (preset tiny, sd21_meta, or sd21 with ``pretrained_path``; only
            ``unet/config.json`` is read).

    Returns:
        Dict with ``groups`` (per group: ``modules`` = #target modules, and LoRA params per family, 0 for
        groups not adapted), ``families`` (LoRA params per family), ``lora_total``, ``conv_in``,
        ``cfr_cross_attention``, ``trainable_total``, ``unet_frozen`` and the ranks.
    """
    unet, targets = _build_meta_unet(cfg)
    groups: dict[str, dict[str, int]] = {}
    for group in GROUPS:
        row = {"modules": len(targets[group])}
        for family in LORA_FAMILIES:
            marker = f".{adapter_name(family, group)}."
            row[family] = sum(p.numel() for n, p in unet.named_parameters() if marker in n)
        groups[group] = row
    families = {f: sum(groups[g][f] for g in GROUPS) for f in LORA_FAMILIES}
    conv = getattr(unet.conv_in, "base_layer", unet.conv_in)
    conv_in = sum(p.numel() for p in conv.parameters())
    cfr = _cfr_trainable(cfg)
    lora_total = sum(families.values())
    lora_ids = {id(p) for n, p in unet.named_parameters() if ".lora_" in n}
    frozen = sum(p.numel() for p in unet.parameters() if id(p) not in lora_ids) - conv_in
    return {
        "preset": cfg.preset,
        "rank": {"consistency": cfg.lora.rank_consistency, "detail": cfg.lora.rank_detail},
        "alpha": cfg.lora.alpha,
        "groups": groups,
        "families": families,
        "lora_total": lora_total,
        "conv_in": conv_in,
        "cfr_cross_attention": cfr,
        "trainable_total": lora_total + conv_in + cfr,
        "unet_frozen": frozen,
    }


def format_inspection(report: dict) -> str:
    """Plain-text table of :func:`inspect_model`'s report."""
    rank = report["rank"]
    lines = [f"preset {report['preset']}, rank C={rank['consistency']} D={rank['detail']}, "
             f"alpha {report['alpha']}",
             f"{'group':<10}{'modules':>9}{'C-LoRA':>14}{'D-LoRA':>14}"]
    for group, row in report["groups"].items():
        lines.append(f"{group:<10}{row['modules']:>9,}{row['consistency']:>14,}{row['detail']:>14,}")
    fam = report["families"]
    lines.append(f"{'family':<10}{'':>9}{fam['consistency']:>14,}{fam['detail']:>14,}")
    for label, key in (("both LoRA families", "lora_total"), ("conv_in (8-ch)", "conv_in"),
                       ("CFR cross-attention", "cfr_cross_attention"), ("trainable total", "trainable_total"),
                       ("frozen UNet", "unet_frozen")):
        lines.append(f"{label:<24}{report[key]:>23,}")
    return "\n".join(lines)

"""The two LoRA families of DLoRAL on the generator UNet (docs/METHOD.md section 2).

Six peft adapters, one per (family, group): the detail family D ("quality" in the reference's names) and
the consistency family C, each split into encoder / decoder / mid groups. Both families are always active
in the forward and their weights always require grad (docs/DESIGN.md decision 2); a training phase chooses
which optimizer steps, never which tensors require grad.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dlightning.contracts.phases import CONSISTENCY, DETAIL, LORA_FAMILIES
from dlightning.models.config import LoraConfig
from dlightning.models.unet import TEACHER_CONV_IN_BIAS, TEACHER_CONV_IN_WEIGHT

GROUPS = ("encoder", "decoder", "mid")
FAMILY_SUFFIX = {CONSISTENCY: "consistency", DETAIL: "quality"}
"""Suffix of the reference's adapter names per family (the D family is called "quality" there)."""
GROUP_PREFIX = {"encoder": "encoder", "decoder": "decoder", "mid": "others"}
"""Group word of the reference's adapter names (the mid group is called "others" there)."""

TARGET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                   "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
"""Substrings that make a weight a LoRA target (docs/METHOD.md 2.1); "conv" alone already matches every conv."""


def adapter_name(family: str, group: str) -> str:
    """Reference adapter name, e.g. ``adapter_name("detail", "mid") == "default_others_quality"``."""
    return f"default_{GROUP_PREFIX[group]}_{FAMILY_SUFFIX[family]}"


def select_lora_targets(parameter_names: Iterable[str]) -> dict[str, list[str]]:
    """Apply the reference target rule to UNet parameter names (after the conv_in swap).

    Names containing "bias" or "norm" are skipped; a remaining name that contains one of
    :data:`TARGET_PATTERNS` contributes its module (the name without ``.weight``) to the encoder group
    (name has ``down_blocks`` or ``conv_in``), the decoder group (``up_blocks`` or ``conv_out``) or the mid
    group (everything else, i.e. ``mid_block``).

    Args:
        parameter_names: ``[n for n, _ in unet.named_parameters()]`` of the un-adapted UNet.

    Returns:
        ``{"encoder": [...], "decoder": [...], "mid": [...]}`` module names in parameter order.
    """
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in parameter_names:
        if "bias" in name or "norm" in name:
            continue
        if not any(p in name for p in TARGET_PATTERNS):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        if "down_blocks" in name or "conv_in" in name:
            group = "encoder"
        elif "up_blocks" in name or "conv_out" in name:
            group = "decoder"
        else:
            group = "mid"
        if module not in groups[group]:
            groups[group].append(module)
    return groups


def add_lora_families(unet: nn.Module, cfg: LoraConfig) -> dict[str, list[str]]:
    """Inject the C and D LoRA families into ``unet``, activate all of them and make them trainable.

    Must run after :func:`dlightning.models.unet.expand_conv_in` (the new conv_in is a target).

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        cfg: Ranks, alpha, init and the groups to adapt.

    Returns:
        The target module names per group (all three groups, whether adapted or not).
    """
    from peft import LoraConfig as PeftLoraConfig

    targets = select_lora_targets(n for n, _ in unet.named_parameters())
    names = []
    for family, rank in ((DETAIL, cfg.rank_detail), (CONSISTENCY, cfg.rank_consistency)):
        for group in GROUPS:
            if group not in cfg.groups or not targets[group]:
                continue
            peft_cfg = PeftLoraConfig(r=rank, lora_alpha=cfg.alpha, init_lora_weights=_peft_init(cfg.init),
                                      target_modules=list(targets[group]), lora_dropout=0.0, bias="none")
            name = adapter_name(family, group)
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(peft_cfg, adapter_name=name)
            names.append(name)
    if not names:
        return targets
    # add_adapter activates only the newest adapter; both families run in every forward.
    unet.set_adapter(names)
    for _, p in family_parameters(unet, CONSISTENCY) + family_parameters(unet, DETAIL):
        p.requires_grad_(True)
    return targets


def _peft_init(init: str) -> bool | str:
    return "gaussian" if init == "gaussian" else True


def _family_of(param_name: str) -> str | None:
    if ".lora_" not in param_name:
        return None
    for family, suffix in FAMILY_SUFFIX.items():
        if f"_{suffix}." in param_name:
            return family
    return None


def family_parameters(unet: nn.Module, family: str) -> list[tuple[str, nn.Parameter]]:
    """All LoRA parameters (lora_A and lora_B of every group) of one family, in module order.

    Args:
        unet: The adapted UNet.
        family: ``consistency`` (C-LoRA) or ``detail`` (D-LoRA).
    """
    if family not in LORA_FAMILIES:
        raise ValueError(f"family={family!r} is not valid; choose one of {list(LORA_FAMILIES)}")
    return [(n, p) for n, p in unet.named_parameters() if _family_of(n) == family]


def _lora_layers(unet: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return (m for m in unet.modules() if isinstance(m, LoraLayer))


def set_family_scales(unet: nn.Module, consistency: float = 1.0, detail: float = 1.0) -> None:
    """Scale each family's update: output = base + consistency * dC + detail * dD.

    ``dC``/``dD`` are the unit-scale updates (alpha / r included). Adapters stay active and trainable; a
    scale of 0 removes the family from the output (e.g. the consistency-only model).
    """
    scales = {FAMILY_SUFFIX[CONSISTENCY]: consistency, FAMILY_SUFFIX[DETAIL]: detail}
    for layer in _lora_layers(unet):
        for name in list(layer.scaling):
            suffix = name.rsplit("_", 1)[-1]
            if suffix in scales:
                layer.set_scale(name, scales[suffix])


class _StaticConv(nn.Module):
    """A conv with fixed (non-parameter) tensors: the pristine 4-channel conv_in of the teacher."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, like: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.stride, self.padding = like.stride, like.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.to(self.weight.dtype), self.weight, self.bias, self.stride, self.padding)


@contextlib.contextmanager
def teacher_mode(unet: nn.Module) -> Iterator[nn.Module]:
    """Temporarily turn the adapted generator UNet back into the pristine SD UNet (the CSD teacher).

    Inside the context every LoRA adapter is disabled and ``unet.conv_in`` is the original 4-channel
    pretrained conv kept by :func:`~dlightning.models.unet.expand_conv_in`; the UNet takes 4-channel
    latents. peft's disable/enable also toggles ``requires_grad`` of adapter weights; the flags are
    restored on exit, so the trainable set seen by DDP never changes. Not re-entrant. With gradient
    checkpointing on, the teacher must run under ``torch.no_grad()`` (recomputation would happen after
    the context has exited).
    """
    weight = getattr(unet, TEACHER_CONV_IN_WEIGHT, None)
    if weight is None:
        raise RuntimeError("teacher_mode needs a UNet prepared by expand_conv_in (no pristine conv_in kept)")
    if torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False):
        # Checkpointed blocks recompute in backward, after this context has restored the adapters.
        raise RuntimeError("run the teacher under torch.no_grad() when gradient checkpointing is on")
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    adapted_conv_in = unet.conv_in
    base = getattr(adapted_conv_in, "base_layer", adapted_conv_in)
    has_adapters = bool(getattr(unet, "_hf_peft_config_loaded", False))
    if has_adapters:
        unet.disable_adapters()
    unet.conv_in = _StaticConv(weight, getattr(unet, TEACHER_CONV_IN_BIAS), base)
    try:
        yield unet
    finally:
        unet.conv_in = adapted_conv_in
        if has_adapters:
            unet.enable_adapters()
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])

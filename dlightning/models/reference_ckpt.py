"""Read (and, for tests, write) the authors' ``model.pkl`` layout (docs/METHOD.md section 8).

The file is a plain dict of tensors, lists and ints, so it loads with ``torch.load(weights_only=True)``:

* ``unet_lora_{encoder,decoder,others}_modules_{quality,consistency}``: target module names per adapter;
* ``lora_rank_unet_quality``, ``lora_rank_unet_consistency``: ranks;
* ``state_dict_unet``: the whole peft-wrapped UNet state dict (``<m>.base_layer.weight``,
  ``<m>.lora_A.<adapter>.weight``, 8-channel ``conv_in.base_layer.*``);
* ``state_dict_bpp``: the CFR state dict (``spynet.*``, ``cross_attn_module.*``, unused sub-networks).

The reference used diffusers 0.25 + peft 0.9; module names and peft's key naming are unchanged in the
versions dlightning uses, so keys map one to one (no renaming needed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlightning.errors import MissingWeightsError
from dlightning.models.lora import FAMILY_SUFFIX, GROUP_PREFIX, GROUPS
from dlightning.models.state import copy_tensors
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def _modules_key(family: str, group: str) -> str:
    return f"unet_lora_{GROUP_PREFIX[group]}_modules_{FAMILY_SUFFIX[family]}"


def _rank_key(family: str) -> str:
    return f"lora_rank_unet_{FAMILY_SUFFIX[family]}"


def write_reference_checkpoint(generator, path: str | Path) -> Path:
    """Write ``generator`` in the reference ``model.pkl`` layout (tests and interoperability).

    Args:
        generator: A :class:`~dlightning.models.generator.DLoRALGenerator` with all three groups adapted.
        path: Output file.
    """
    lora = generator.cfg.lora
    ckpt: dict = {}
    for family in ("detail", "consistency"):
        for group in GROUPS:
            ckpt[_modules_key(family, group)] = list(generator.lora_targets[group])
    ckpt[_rank_key("detail")] = int(lora.rank_detail)
    ckpt[_rank_key("consistency")] = int(lora.rank_consistency)
    ckpt["state_dict_unet"] = {k: v.detach().cpu().clone() for k, v in generator.unet.state_dict().items()}
    cfr_sd = generator.cfr.reference_state_dict()
    ckpt["state_dict_bpp"] = {k: v.detach().cpu().clone() for k, v in cfr_sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def _check_layout(generator, ckpt: dict, path: Path) -> None:
    lora = generator.cfg.lora
    required = [_modules_key(f, g) for f in FAMILY_SUFFIX for g in GROUPS]
    required += [_rank_key(f) for f in FAMILY_SUFFIX] + ["state_dict_unet", "state_dict_bpp"]
    absent = [k for k in required if k not in ckpt]
    if absent:
        raise MissingWeightsError(f"{path} is not a DLoRAL reference checkpoint: missing keys {absent}")
    problems = []
    for family, rank in (("detail", lora.rank_detail), ("consistency", lora.rank_consistency)):
        if int(ckpt[_rank_key(family)]) != rank:
            problems.append(f"{_rank_key(family)}={ckpt[_rank_key(family)]} but "
                            f"model.lora.rank_{family}={rank}")
        for group in GROUPS:
            theirs = list(ckpt[_modules_key(family, group)])
            ours = list(generator.lora_targets[group]) if group in lora.groups else []
            if set(theirs) != set(ours):
                only_t, only_o = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
                problems.append(f"{_modules_key(family, group)}: {len(theirs)} modules in the file vs "
                                f"{len(ours)} in the model (only in file: {only_t[:3]}, "
                                f"only in model: {only_o[:3]})")
    if problems:
        raise MissingWeightsError(
            f"{path} does not match the generator: " + "; ".join(problems)
            + ". The official model.pkl needs SD 2.1 base, model.lora.rank_*=4 and all groups "
              "(model.lora.groups=[encoder, decoder, mid]).")


def load_reference_checkpoint(generator, path: str | Path, load_base_weights: bool = False) -> None:
    """Load an official DLoRAL ``model.pkl`` into ``generator`` (in place).

    Loads both LoRA families, the 8-channel conv_in and the CFR (SPyNet + cross-attention). The file's
    other UNet weights equal SD 2.1 base and are skipped unless ``load_base_weights``.

    Args:
        generator: A :class:`~dlightning.models.generator.DLoRALGenerator` built with matching ranks/groups.
        path: The checkpoint file (read with ``weights_only=True``; no code is executed).
        load_base_weights: Also copy every other UNet weight of the file.

    Raises:
        MissingWeightsError: The file is absent, not in the reference layout, or does not match the model.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"reference checkpoint {str(path)!r} not found (the authors' model.pkl)")
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(ckpt, dict):
        raise MissingWeightsError(f"{path} holds a {type(ckpt).__name__}, not the reference dict")
    _check_layout(generator, ckpt, path)
    sd = ckpt["state_dict_unet"]
    own = generator.unet.state_dict()
    wanted = list(own) if load_base_weights else [
        k for k in own if ".lora_" in k or k.startswith("conv_in.")]
    copy_tensors(own, sd, wanted, source=f"{path} (state_dict_unet)")
    generator.cfr.load_reference_state_dict(ckpt["state_dict_bpp"])
    log.info("loaded reference checkpoint %s (%d UNet tensors%s)", path, len(wanted),
             ", base weights included" if load_base_weights else "")

"""Export: fuse C-LoRA and D-LoRA into the UNet and write one merged single-step model folder.

Recipe (docs/INTEGRATION.md C2), all in fp32: set each family's scale on its peft layers
(:func:`dlightning.models.lora.set_family_scales`), ``unet.fuse_lora(adapter_names=all six,
lora_scale=1.0)`` (peft's merge uses each adapter's current scaling, so the per-family scales are what
is fused), ``unet.unload_lora()``, check that ``conv_in`` is a plain 8-channel Conv2d and
``unet.config.in_channels == 8``, cast, ``save_pretrained(safe_serialization=True)``. The folder
format is the contract in :mod:`dlightning.contracts.export_format`.

The target is checked before any model is built (:func:`check_export_target`): a new or empty folder,
or, with ``overwrite``, a folder holding an export and nothing else. A folder holding anything that is
not part of an export is refused even with ``overwrite``, so export never deletes a user's files. The
export is written into a new temporary sibling ``OUT.tmp-<random>``, removed on any error or
interrupt, and renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import importlib.metadata
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlightning.contracts import export_format
from dlightning.contracts.checkpoint_format import read_training_checkpoint
from dlightning.contracts.config_io import to_container
from dlightning.errors import ConfigError
from dlightning.inference.config import ExportConfig
from dlightning.models.config import ModelConfig
from dlightning.models.generator import DLoRALGenerator
from dlightning.models.lora import FAMILY_SUFFIX, set_family_scales
from dlightning.models.restore import restore_generator
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""torch dtypes of ``export_format.WEIGHT_DTYPES``."""


def dlightning_version() -> str:
    """Installed dlightning version, or ``unknown`` when running from a source tree."""
    try:
        return importlib.metadata.version("dlightning")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ fusing
def _lora_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def fuse_families(unet: nn.Module, consistency: float = 1.0, detail: float = 1.0) -> list[str]:
    """Fuse both LoRA families into the base weights at the given scales and remove every LoRA layer.

    Run in fp32. The UNet is modified in place.

    Args:
        unet: The generator's adapted UNet.
        consistency: Scale of the C family.
        detail: Scale of the D family (0 = consistency-only).

    Returns:
        The fused adapter names.

    Raises:
        RuntimeError: The UNet has no LoRA layers (already fused and unloaded), has layers already
            merged, or conv_in is not an 8-channel Conv2d afterwards.
    """
    layers = _lora_layers(unet)
    if not layers:
        raise RuntimeError("this UNet has no LoRA layers: it was already fused (exports cannot be fused again)")
    if any(getattr(m, "merged", False) for m in layers):
        raise RuntimeError("this UNet already has merged LoRA weights; refusing to fuse twice")
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        raise RuntimeError("fuse the UNet in fp32 (cast after fusing)")
    names = sorted(unet.peft_config)
    unknown = [n for n in names if not n.endswith(tuple(f"_{s}" for s in FAMILY_SUFFIX.values()))]
    if unknown:
        raise RuntimeError(f"unexpected adapters {unknown}; only the C and D families can be exported")
    set_family_scales(unet, consistency=consistency, detail=detail)
    unet.fuse_lora(adapter_names=names, lora_scale=1.0)
    unet.unload_lora()
    conv = unet.conv_in
    if type(conv) is not nn.Conv2d or conv.in_channels != 8:
        raise RuntimeError(f"after unloading, conv_in is {type(conv).__name__} with "
                           f"{getattr(conv, 'in_channels', '?')} inputs; expected a plain 8-channel Conv2d")
    unet.register_to_config(in_channels=8)
    if _lora_layers(unet) or any(".lora_" in n for n, _ in unet.named_parameters()):
        raise RuntimeError("LoRA parameters remain after unload_lora")
    return names


# ------------------------------------------------------------------------------------------ writing
def export_metadata(generator: DLoRALGenerator, cfg: ExportConfig, fused: dict[str, float], source: str,
                    ) -> dict[str, Any]:
    """The export metadata (:mod:`dlightning.contracts.export_format`): everything needed to run the model."""
    m = generator.cfg
    return {
        "dlightning_version": dlightning_version(),
        "source_checkpoint": source,
        "timestep": m.timestep,
        "x0_rule": m.x0_rule,
        "scale": m.scale,
        "vae_latent": m.vae_latent,
        "vae_scaling_factor": generator.scaling_factor,
        "color_fix": cfg.color_fix,
        "prompt": cfg.prompt,
        "cfr": {"heads": m.cfr.heads, "embed_dim": m.cfr.embed_dim, "temperature": m.cfr.temperature,
                "spynet_input_range": m.cfr.spynet_input_range, "in_channels": m.cfr.in_channels,
                "block_size": m.cfr.block_size, "topk": m.cfr.topk},
        "fused_families": fused,
        "dtype": cfg.dtype,
        "base_path": m.pretrained_path if cfg.link_base else None,
        "model_config": to_container(m),
    }


def check_export_target(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an export target that export may not write (cheap; run before building any model).

    Accepted: a missing or empty folder, or (with ``overwrite``) a folder that holds an export and
    nothing else.

    Raises:
        ConfigError: The target is a file, holds files that are not an export, holds an export and
            ``overwrite`` is off, or its parent cannot be written; the message names the fix.
    """
    out = Path(out)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out {out}: {parent} is not a folder this user can write; choose "
                          "another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder path (new or empty) for the export")
    if not any(out.iterdir()):
        return
    foreign = export_format.foreign_entries(out)
    if foreign or not (out / export_format.METADATA_FILE).is_file():
        shown = ", ".join(foreign[:5]) or f"no {export_format.METADATA_FILE}"
        raise ConfigError(f"--out {out} holds files that are not a dlightning export ({shown}); export never "
                          "deletes them, even with --overwrite: choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds an export; pass --overwrite to replace it, or choose "
                          "another --out")


def _new_temp_folder(out: Path) -> Path:
    """A fresh ``OUT.tmp-<random>`` next to ``out`` (never an existing folder, so never a user's)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; a replaced export is moved aside first and removed after the rename."""
    check_export_target(out, overwrite)  # again: the folder may have changed while the model was written
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # an interrupt between the two renames must not leave OUT missing
        raise
    shutil.rmtree(old)  # checked just above: it held an export's entries and nothing else


def export_generator(generator: DLoRALGenerator, out: str | Path, cfg: ExportConfig | None = None,
                     source: str = "") -> Path:
    """Fuse the generator's LoRA families and write the merged model folder ``out``.

    The generator is consumed: its UNet is fused in place.

    Args:
        generator: A generator with its trained tensors loaded (fp32).
        out: Target folder; must not hold an export unless ``cfg.overwrite``.
        cfg: Scales, dtype, defaults.
        source: Where the weights came from (recorded in the metadata).

    Returns:
        The export folder.

    Raises:
        ConfigError: The target is refused (:func:`check_export_target`) or ``link_base`` is set for a
            model without a base folder.
    """
    cfg = cfg or ExportConfig()
    out = Path(out)
    if cfg.link_base and generator.cfg.preset != "sd21":
        raise ConfigError("export.link_base needs model.preset=sd21 (a tiny model has no base folder)")
    check_export_target(out, cfg.overwrite)
    tmp = _new_temp_folder(out)
    try:
        _write_export(generator, tmp, cfg, source)
        _publish(tmp, out, cfg.overwrite)
    except BaseException:
        # Ctrl-C, SIGTERM (under sigterm_raises) or an error: the temporary folder is ours alone.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported merged model to %s", out)
    return out


def _write_export(generator: DLoRALGenerator, tmp: Path, cfg: ExportConfig, source: str) -> None:
    """Fuse and write every file of the export into ``tmp``."""
    from safetensors.torch import save_file

    dtype = DTYPES[cfg.dtype]
    generator = generator.float().eval()
    fused = {"consistency": float(cfg.scale_consistency), "detail": float(cfg.scale_detail)}
    names = fuse_families(generator.unet, **fused)
    log.info("fused %d adapters at scales %s", len(names), fused)
    generator.unet.to(dtype).save_pretrained(tmp / export_format.UNET_DIR, safe_serialization=True)
    cfr_sd = {k: v.detach().float().contiguous().cpu() for k, v in generator.cfr.reference_state_dict().items()}
    save_file(cfr_sd, str(tmp / export_format.CFR_FILE))
    if not cfg.link_base:
        generator.vae.to(dtype).save_pretrained(tmp / "vae", safe_serialization=True)
        generator.prompt_encoder.text_encoder.to(dtype).save_pretrained(tmp / "text_encoder",
                                                                         safe_serialization=True)
        generator.prompt_encoder.tokenizer.save_pretrained(tmp / "tokenizer")
        _noise_scheduler(generator).save_pretrained(tmp / "scheduler")
    export_format.write_metadata(tmp, export_metadata(generator, cfg, fused, source))


def _noise_scheduler(generator: DLoRALGenerator):
    from diffusers import DDPMScheduler

    from dlightning.models.tiny import SD21_SCHEDULER_CONFIG

    # The one-step forward never uses the scheduler; it is saved so the folder is a complete SD layout.
    if generator.cfg.preset == "sd21":
        return DDPMScheduler.from_pretrained(generator.cfg.pretrained_path, subfolder="scheduler",
                                             local_files_only=True)
    return DDPMScheduler(**SD21_SCHEDULER_CONFIG)


def export_checkpoint(checkpoint: str | Path, out: str | Path, cfg: ExportConfig | None = None) -> Path:
    """Export a dlightning training checkpoint (see :func:`export_generator`); the target is checked first."""
    cfg = cfg or ExportConfig()
    check_export_target(out, cfg.overwrite)
    ckpt = read_training_checkpoint(checkpoint)
    source = f"{checkpoint} ({cfg.weights} weights)" if cfg.weights != "raw" else str(checkpoint)
    return export_generator(restore_generator(ckpt, weights=cfg.weights), out, cfg, source=source)


def export_reference(pkl: str | Path, model_cfg: ModelConfig, out: str | Path,
                     cfg: ExportConfig | None = None) -> Path:
    """Export the authors' ``model.pkl`` (read with ``weights_only=True``) on the base of ``model_cfg``."""
    from dlightning.models.reference_ckpt import load_reference_checkpoint

    check_export_target(out, (cfg or ExportConfig()).overwrite)
    gen = DLoRALGenerator(model_cfg).eval()
    load_reference_checkpoint(gen, pkl)
    return export_generator(gen, out, cfg, source=str(pkl))

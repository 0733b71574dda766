"""Export: a merged single-step model folder that runs without dlightning, or the LoRA-only adapters.

Merged recipe (docs/INTEGRATION.md C2), all in fp32: set each family's scale on its peft layers
(:func:`dlightning.models.lora.set_family_scales`), ``unet.fuse_lora(adapter_names=all six,
lora_scale=1.0)`` (peft's merge uses each adapter's current scaling, so the per-family scales are what
is fused), ``unet.unload_lora()``, check that ``conv_in`` is a plain 8-channel Conv2d and
``unet.config.in_channels == 8``, cast, ``save_pretrained(safe_serialization=True)``. The folder is a
diffusers pipeline: ``model_index.json``, CFR as a custom component (``cfr/``) and byte-for-byte copies of
the standalone-safe modules of :mod:`dlightning.models.standalone`, plus a model card. The adapter export
(``ExportConfig.adapters``) writes each LoRA family in diffusers' LoRA format instead, with the 8-channel
conv_in and CFR. Both layouts are the contract in :mod:`dlightning.contracts.export_format`.

The target is checked before any model is built (:func:`check_export_target`): a new or empty folder,
or, with ``overwrite``, a folder holding an export and nothing else. A folder holding anything that is
not part of an export is refused even with ``overwrite``, so export never deletes a user's files. The
export is written into a new temporary sibling ``OUT.tmp-<random>``, removed on any error or
interrupt; its modes are set as for any file the user creates (0666 / 0777 less the umask: 0644 / 0755
under the usual umask 022), and it is renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dlightning.models.standalone as standalone
from dlightning.contracts import export_format
from dlightning.contracts.checkpoint_format import read_training_checkpoint
from dlightning.contracts.config_io import to_container
from dlightning.contracts.phases import LORA_FAMILIES
from dlightning.errors import ConfigError
from dlightning.inference.config import ExportConfig
from dlightning.inference.exported import cfr_settings
from dlightning.inference.model_card import Provenance, render_model_card
from dlightning.inference.quiet import cast, quiet_model_io
from dlightning.models.config import ModelConfig
from dlightning.models.generator import DLoRALGenerator
from dlightning.models.lora import FAMILY_SUFFIX, set_family_scales
from dlightning.models.restore import restore_generator
from dlightning.models.standalone.dloral_cfr import CrossFrameRetrievalModel
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
def export_metadata(generator: DLoRALGenerator, cfg: ExportConfig, fused: dict[str, float], prov: Provenance,
                    ) -> dict[str, Any]:
    """The export metadata (:mod:`dlightning.contracts.export_format`): everything needed to run the model."""
    m = generator.cfg
    return {
        "kind": "merged",
        "dlightning_version": dlightning_version(),
        "source_checkpoint": prov.source,
        "optimizer_step": prov.optimizer_step,
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
    if foreign or not export_format.is_export(out):
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
                     source: str = "", provenance: Provenance | None = None) -> Path:
    """Write the merged model folder ``out`` (or, with ``cfg.adapters``, the adapter folder).

    The generator is consumed: a merged export fuses its UNet in place.

    Args:
        generator: A generator with its trained tensors loaded (fp32).
        out: Target folder; must not hold an export unless ``cfg.overwrite``.
        cfg: Kind, scales, dtype, defaults.
        source: Where the weights came from (recorded in the metadata) when no ``provenance`` is given.
        provenance: Source, training config, step and command, for the metadata and the model card.

    Returns:
        The export folder.

    Raises:
        ConfigError: The target is refused (:func:`check_export_target`) or ``link_base`` is set for a
            model without a base folder.
    """
    cfg = cfg or ExportConfig()
    out = Path(out)
    prov = provenance or Provenance(source=source)
    if cfg.link_base and generator.cfg.preset != "sd21":
        raise ConfigError("export.link_base needs model.preset=sd21 (a tiny model has no base folder)")
    check_export_target(out, cfg.overwrite)
    tmp = _new_temp_folder(out)
    try:
        write = _write_adapters if cfg.adapters else _write_export
        with quiet_model_io():
            write(generator, tmp, cfg, prov, str(out))
        share_modes(tmp)
        _publish(tmp, out, cfg.overwrite)
    except BaseException:
        # Ctrl-C, SIGTERM (under sigterm_raises) or an error: the temporary folder is ours alone.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", "adapters" if cfg.adapters else "merged model", out)
    return out


def _write_export(generator: DLoRALGenerator, tmp: Path, cfg: ExportConfig, prov: Provenance, shown: str) -> None:
    """Fuse and write every file of the merged export into ``tmp``."""
    dtype = DTYPES[cfg.dtype]
    generator = generator.float().eval()
    fused = {"consistency": float(cfg.scale_consistency), "detail": float(cfg.scale_detail)}
    names = fuse_families(generator.unet, **fused)
    log.info("fused %d adapters at scales %s", len(names), fused)
    cast(generator.unet, dtype).save_pretrained(tmp / export_format.UNET_DIR, safe_serialization=True)
    _write_cfr(generator, tmp)
    if not cfg.link_base:
        cast(generator.vae, dtype).save_pretrained(tmp / "vae", safe_serialization=True)
        cast(generator.prompt_encoder.text_encoder, dtype).save_pretrained(tmp / "text_encoder",
                                                                           safe_serialization=True)
        generator.prompt_encoder.tokenizer.save_pretrained(tmp / "tokenizer")
        _noise_scheduler(generator).save_pretrained(tmp / "scheduler")
    copy_standalone_modules(tmp)
    meta = export_metadata(generator, cfg, fused, prov)
    (tmp / export_format.MODEL_INDEX_FILE).write_text(json.dumps(model_index(generator, meta), indent=2))
    export_format.write_metadata(tmp, meta)
    card = render_model_card(export_format.read_metadata(tmp), prov, "merged", shown)
    (tmp / export_format.MODEL_CARD_FILE).write_text(card)


def _noise_scheduler(generator: DLoRALGenerator):
    from diffusers import DDPMScheduler

    from dlightning.models.tiny import SD21_SCHEDULER_CONFIG

    # Only the epsilon x0 rule reads the schedule; it is saved so the folder is a complete SD layout.
    if generator.cfg.preset == "sd21":
        return DDPMScheduler.from_pretrained(generator.cfg.pretrained_path, subfolder="scheduler",
                                             local_files_only=True)
    return DDPMScheduler(**SD21_SCHEDULER_CONFIG)


# ------------------------------------------------------------------------------------------ diffusers layout
def standalone_source(name: str) -> Path:
    """The package file of a standalone-safe module exports carry (``dlightning/models/standalone/<name>``)."""
    return Path(standalone.__file__).parent / name


def copy_standalone_modules(folder: Path) -> None:
    """Copy the pipeline's modules verbatim into the export's top level (diffusers imports them from there)."""
    for name in export_format.PIPELINE_MODULES:
        shutil.copyfile(standalone_source(name), folder / name)


def _write_cfr(generator: DLoRALGenerator, tmp: Path) -> None:
    """CFR as the diffusers custom component ``cfr/``: config, fp32 weights (reference layout), its module."""
    with torch.random.fork_rng(devices=[]):  # the throw-away initial weights must not move the caller's RNG
        cfr = CrossFrameRetrievalModel(**cfr_settings(generator.cfg.cfr))
    state = {k: v.detach().float().cpu() for k, v in generator.cfr.reference_state_dict().items()}
    cfr.load_state_dict(state, strict=True)
    folder = tmp / export_format.CFR_DIR
    cfr.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(standalone_source(export_format.CFR_MODULE), folder / export_format.CFR_MODULE)


def _library_entry(component: Any) -> list[str]:
    """``[library, class]`` of a component, as diffusers' ``model_index.json`` names it."""
    cls = type(component)
    return [cls.__module__.split(".")[0], cls.__name__]


def model_index(generator: DLoRALGenerator, meta: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' ``model_index.json``: the export's own pipeline class, its components and its settings."""
    import diffusers

    encoder = generator.prompt_encoder
    return {
        "_class_name": [export_format.PIPELINE_MODULES[0].removesuffix(".py"), export_format.PIPELINE_CLASS],
        "_diffusers_version": diffusers.__version__,
        "unet": _library_entry(generator.unet),
        "vae": _library_entry(generator.vae),
        "text_encoder": _library_entry(encoder.text_encoder),
        "tokenizer": _library_entry(encoder.tokenizer),
        "scheduler": ["diffusers", "DDPMScheduler"],
        # A custom component: diffusers loads its class from cfr/dloral_cfr.py.
        export_format.CFR_DIR: [export_format.CFR_MODULE.removesuffix(".py"), export_format.CFR_CLASS],
        **{key: meta[key] for key in ("scale", "timestep", "x0_rule", "vae_latent", "color_fix", "prompt")},
    }


# ------------------------------------------------------------------------------------------ adapters
def family_lora_state(unet: nn.Module, family: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One family's LoRA tensors under peft keys without adapter names (``<module>.lora_A.weight``), and its
    target modules. The family's three group adapters cover disjoint modules, so they merge into one."""
    from peft.utils import get_peft_model_state_dict

    names = [n for n in sorted(getattr(unet, "peft_config", {})) if n.endswith(f"_{FAMILY_SUFFIX[family]}")]
    state: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for name in names:
        part = get_peft_model_state_dict(unet, adapter_name=name)
        clash = sorted(set(part) & set(state))
        if clash:
            raise RuntimeError(f"adapters of the {family} family overlap on {clash[:3]}")
        state.update(part)
        modules += sorted(unet.peft_config[name].target_modules)
    return state, modules


def _adapter_config(rank: int, alpha: float, modules: list[str]) -> dict[str, Any]:
    """The peft ``LoraConfig`` arguments diffusers rebuilds the adapter from (``lora_adapter_metadata``)."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": modules, "lora_dropout": 0.0, "bias": "none",
            "use_dora": False}


def _write_lora_files(generator: DLoRALGenerator, tmp: Path, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Each family's LoRA file in diffusers' format (``unet.``-prefixed peft keys, LoraConfig as metadata)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    lora = generator.cfg.lora
    ranks = {"consistency": lora.rank_consistency, "detail": lora.rank_detail}
    written = {}
    for family in LORA_FAMILIES:
        state, modules = family_lora_state(generator.unet, family)
        if not state:
            continue
        name = export_format.ADAPTER_FILES[family]
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers={k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()},
            weight_name=name, unet_lora_adapter_metadata=_adapter_config(ranks[family], lora.alpha, modules))
        written[family] = {"file": name, "rank": ranks[family], "alpha": lora.alpha, "modules": len(modules)}
    return written


def _write_adapters(generator: DLoRALGenerator, tmp: Path, cfg: ExportConfig, prov: Provenance,
                    shown: str) -> None:
    """Write both LoRA families, the 8-channel conv_in, CFR, the metadata and the card into ``tmp``."""
    from safetensors.torch import save_file

    dtype = DTYPES[cfg.dtype]
    generator = generator.float().eval()
    families = _write_lora_files(generator, tmp, dtype)
    conv = generator.conv_in  # the trained base layer of the 8-channel conv (LoRA'd by the encoder groups)
    save_file({"weight": conv.weight.detach().to(dtype).contiguous().cpu(),
               "bias": conv.bias.detach().to(dtype).contiguous().cpu()}, str(tmp / export_format.CONV_IN_FILE),
              metadata={"in_channels": str(conv.in_channels), "replaces": "unet.conv_in"})
    _write_cfr(generator, tmp)
    scales = {"consistency": float(cfg.scale_consistency), "detail": float(cfg.scale_detail)}
    meta = {**export_metadata(generator, cfg, scales, prov), "kind": "adapters", "families": families,
            "scales": scales, "fused_families": None}
    path = export_format.write_metadata(tmp, meta, export_format.ADAPTER_METADATA_FILE)
    card = render_model_card(json.loads(path.read_text()), prov, "adapters", shown)
    (tmp / export_format.MODEL_CARD_FILE).write_text(card)


# ------------------------------------------------------------------------------------------ file modes
def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(root: Path) -> None:
    """Give every file 0666 and every folder 0777 less the umask, as for files the user creates.

    safetensors writes its files 0600 (through a private temporary file), which would keep colleagues out
    of an export in a shared folder; a restrictive umask (e.g. 077) is still honoured.
    """
    mask = _current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


# ------------------------------------------------------------------------------------------ sources
OVERRIDABLE_KEYS = ("model.pretrained_path", "model.cfr.spynet_path")
"""Keys of a checkpoint's stored config that ``dlightning export --config/overrides`` may change: local
paths of frozen weights, which may differ between the training machine and this one."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_stored_config_changes(stored: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Refuse changes to a checkpoint's stored config other than :data:`OVERRIDABLE_KEYS`.

    The checkpoint's tensors fit only the architecture it was trained with, and export uses nothing outside
    the model section, so any other change could not be honoured.

    Args:
        stored: The stored RootConfig (plain types).
        given: The same after ``--config`` files and overrides.

    Raises:
        ConfigError: Names every refused key and what export does take.
    """
    old, new = _flatten(stored), _flatten(given)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, object()) != new.get(k, object()))
    refused = [k for k in changed if k not in OVERRIDABLE_KEYS]
    if refused:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in refused[:6])
        raise ConfigError(f"export --checkpoint takes the model from the checkpoint's stored config; only "
                          f"{', '.join(OVERRIDABLE_KEYS)} may be changed there, but the config files / overrides "
                          f"change {shown}{' ...' if len(refused) > 6 else ''}; drop these (export settings are "
                          "flags: --scale-detail, --dtype, ...)")


def export_checkpoint(checkpoint: str | Path, out: str | Path, cfg: ExportConfig | None = None, *,
                      model_config: Callable[[dict[str, Any]], ModelConfig] | None = None,
                      command: str | None = None, workdir: str | None = None) -> Path:
    """Export a dlightning training checkpoint (see :func:`export_generator`); the target is checked first.

    Args:
        checkpoint: A checkpoint file, DeepSpeed folder or run folder.
        out: Target folder.
        cfg: Export settings.
        model_config: Turns the stored RootConfig (plain types) into the model section to build (e.g. with
            other local paths, :func:`check_stored_config_changes`); default: the stored model section.
        command: The command line, for the model card.
        workdir: The folder the command ran in.
    """
    cfg = cfg or ExportConfig()
    check_export_target(out, cfg.overwrite)
    ckpt = read_training_checkpoint(checkpoint)
    model_cfg = model_config(ckpt.config) if model_config is not None else None
    source = f"{checkpoint} ({cfg.weights} weights)" if cfg.weights != "raw" else str(checkpoint)
    prov = Provenance(source=source, command=command, workdir=workdir, training_config=ckpt.config,
                      optimizer_step=ckpt.optimizer_step, checkpoint_path=ckpt.path)
    return export_generator(restore_generator(ckpt, model_cfg, weights=cfg.weights), out, cfg, provenance=prov)


def export_reference(pkl: str | Path, model_cfg: ModelConfig, out: str | Path,
                     cfg: ExportConfig | None = None, *, command: str | None = None,
                     workdir: str | None = None) -> Path:
    """Export the authors' ``model.pkl`` (read with ``weights_only=True``) on the base of ``model_cfg``."""
    from dlightning.models.reference_ckpt import load_reference_checkpoint

    check_export_target(out, (cfg or ExportConfig()).overwrite)
    gen = DLoRALGenerator(model_cfg).eval()
    load_reference_checkpoint(gen, pkl)
    prov = Provenance(source=str(pkl), command=command, workdir=workdir)
    return export_generator(gen, out, cfg, provenance=prov)

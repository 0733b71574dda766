"""The export folders: their files and metadata, one definition for the writers and the readers.

Two kinds, both written by ``dlightning.export`` into a new ``DIR.tmp-<random>`` and renamed to ``DIR``:

**Merged export** (``dlightning export``, format 2), a diffusers pipeline folder::

    DIR/model_index.json        diffusers' index: the custom pipeline class, the components, the settings
    DIR/pipeline.py             the pipeline, and the two modules it imports: dloral_onestep.py, dloral_frames.py
    DIR/unet/                   merged UNet (diffusers layout, safetensors, ``in_channels == 8``)
    DIR/cfr/                    CFR as a diffusers custom component: config.json,
                                diffusion_pytorch_model.safetensors (``spynet.*``, ``cross_attn_module.*``, fp32),
                                dloral_cfr.py (its class)
    DIR/vae/ text_encoder/ tokenizer/ scheduler/   base components (absent when ``base_path`` is set)
    DIR/README.md               the model card
    DIR/dlightning_export.json  the metadata below

The ``.py`` files are byte-for-byte copies of the modules in ``dlightning/models/standalone/``
(:data:`PIPELINE_MODULES`, :data:`CFR_MODULE`). Format 1 exports (read, not written) kept CFR as one
``cfr.safetensors`` file and had no diffusers index.

Metadata keys: ``format`` (this file's version), ``kind`` (``merged``), ``dlightning_version``,
``source_checkpoint``, ``optimizer_step`` (of that checkpoint, or null), ``timestep``, ``x0_rule``, ``scale``,
``vae_latent``, ``vae_scaling_factor``, ``color_fix``, ``prompt``, ``cfr`` (the CFR settings),
``fused_families`` (scale per LoRA family), ``dtype``, ``base_path`` (a linked base folder, or null) and
``model_config`` (the model section as a dict).

**Adapter export** (``dlightning export --adapters``), LoRA-only, applied to the base SD 2.1 UNet::

    DIR/lora_consistency.safetensors   C-LoRA, diffusers LoRA format (peft keys ``unet.<module>.lora_A.weight``,
    DIR/lora_detail.safetensors        ``lora_B``; the LoraConfig as the file's ``lora_adapter_metadata``)
    DIR/conv_in.safetensors            the trained 8-channel conv_in (``weight``, ``bias``): a full layer, not a
                                       LoRA; it replaces the base UNet's 4-channel conv_in before the LoRAs load
    DIR/cfr/                           as in the merged export
    DIR/README.md                      the model card (how to apply it)
    DIR/dlightning_adapters.json       the adapter metadata (``kind`` ``adapters``, ranks, alpha, scales, base)

A folder holds only :data:`EXPORT_ENTRIES` (either kind); :func:`foreign_entries` lists anything else, which
``dlightning export --overwrite`` refuses to replace (it replaces an export folder as a whole).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlightning.errors import MissingWeightsError

METADATA_FILE = "dlightning_export.json"
ADAPTER_METADATA_FILE = "dlightning_adapters.json"
MODEL_INDEX_FILE = "model_index.json"
MODEL_CARD_FILE = "README.md"
CFR_DIR = "cfr"
"""The CFR component folder (format 2)."""
CFR_FILE = "cfr.safetensors"
"""The CFR weights of a format 1 export."""
FORMAT_VERSION = 2
UNET_DIR = "unet"
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
"""Sub-folders copied from the base model (or read from ``base_path`` when the export links it)."""
PIPELINE_MODULES = ("pipeline.py", "dloral_onestep.py", "dloral_frames.py")
"""Modules of ``dlightning/models/standalone/`` copied into the export's top level."""
CFR_MODULE = "dloral_cfr.py"
"""Module of ``dlightning/models/standalone/`` copied into ``cfr/`` (diffusers' custom component file)."""
PIPELINE_CLASS = "DLoRALVSRPipeline"
CFR_CLASS = "CrossFrameRetrievalModel"
ADAPTER_FILES = {"consistency": "lora_consistency.safetensors", "detail": "lora_detail.safetensors"}
"""The LoRA file of each family in an adapter export."""
CONV_IN_FILE = "conv_in.safetensors"
WEIGHT_DTYPES = ("fp32", "fp16", "bf16")
"""Dtypes an export's weights may be stored in."""
REQUIRED_KEYS = ("scale", "timestep", "x0_rule", "vae_latent", "color_fix", "prompt", "model_config")
MERGED_ENTRIES = (METADATA_FILE, MODEL_INDEX_FILE, MODEL_CARD_FILE, CFR_DIR, CFR_FILE, UNET_DIR, *BASE_COMPONENTS,
                  *PIPELINE_MODULES)
ADAPTER_ENTRIES = (ADAPTER_METADATA_FILE, MODEL_CARD_FILE, CFR_DIR, CONV_IN_FILE, *ADAPTER_FILES.values())
EXPORT_ENTRIES = tuple(dict.fromkeys(MERGED_ENTRIES + ADAPTER_ENTRIES))
"""Every top-level name an export folder (of either kind) may hold."""


def write_metadata(folder: str | Path, meta: dict[str, Any], name: str = METADATA_FILE) -> Path:
    """Write ``meta`` as the folder's metadata file ``name`` (it must hold every required key)."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"export metadata lacks {missing}")
    path = Path(folder) / name
    path.write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2))
    return path


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The metadata of a merged export folder.

    Raises:
        MissingWeightsError: The folder is not a merged dlightning export (an adapter export is named as
            such), or its metadata is unreadable, lacks a required key, or is from a newer format.
    """
    root = Path(folder)
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
        if (root / ADAPTER_METADATA_FILE).is_file():
            raise MissingWeightsError(f"{str(root)!r} is an adapter export (LoRA only); upscale needs a merged "
                                      "export: `dlightning export --checkpoint CKPT --out DIR` without --adapters")
        raise MissingWeightsError(f"{str(root)!r} is not a dlightning export (no {METADATA_FILE}); create one "
                                  "with `dlightning export --checkpoint CKPT --out DIR`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MissingWeightsError(f"{meta_file} is not readable JSON ({err}); re-run `dlightning export`") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("format", 0), int):
        raise MissingWeightsError(f"{meta_file} is not an export's metadata (a JSON object with an integer "
                                  "format); re-run `dlightning export`")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise MissingWeightsError(f"{meta_file} has export format {meta['format']}; this dlightning reads format "
                                  f"<= {FORMAT_VERSION}: upgrade dlightning")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing or not isinstance(meta.get("scale"), int) or meta["scale"] < 1:
        raise MissingWeightsError(f"{meta_file} lacks {missing or ['a positive integer scale']}; it is damaged: "
                                  "re-run `dlightning export`")
    return meta


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds the metadata file of a merged or an adapter export."""
    root = Path(folder)
    return (root / METADATA_FILE).is_file() or (root / ADAPTER_METADATA_FILE).is_file()


def foreign_entries(folder: str | Path) -> list[str]:
    """Names in ``folder`` that are not part of an export's layout (sorted; empty for a pure export)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in EXPORT_ENTRIES)


def component_folders(folder: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Where each component of a merged export lives (``unet`` and ``cfr`` in the export, the rest possibly in
    ``base_path``); ``cfr`` is the component folder, or the format 1 ``cfr.safetensors`` file.

    Raises:
        MissingWeightsError: A component folder or the CFR weights are missing.
    """
    root = Path(folder)
    base = Path(meta["base_path"]) if meta.get("base_path") else root
    found = {UNET_DIR: root / UNET_DIR, **{name: base / name for name in BASE_COMPONENTS}}
    for path in found.values():
        if not path.is_dir():
            raise MissingWeightsError(f"export {str(root)!r} is incomplete: {path} is missing")
    cfr = root / CFR_DIR if int(meta.get("format", 1)) >= 2 else root / CFR_FILE
    if not cfr.exists():
        raise MissingWeightsError(f"export {str(root)!r} is incomplete: {cfr} is missing")
    return {**found, CFR_DIR: cfr}

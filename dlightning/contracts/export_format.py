"""The merged export folder: its files and metadata, one definition for the writer and the reader.

Layout (``dlightning.export`` writes it into a new ``DIR.tmp-<random>`` and renames it to ``DIR`` at
the end)::

    DIR/unet/                   merged UNet (diffusers layout, safetensors, ``in_channels == 8``)
    DIR/cfr.safetensors         CFR: ``spynet.*`` and ``cross_attn_module.*`` (reference key layout, fp32)
    DIR/vae/ text_encoder/ tokenizer/ scheduler/   base components (absent when ``base_path`` is set)
    DIR/dlightning_export.json  the metadata below

Metadata keys: ``format`` (this file's version), ``dlightning_version``, ``source_checkpoint``,
``timestep``, ``x0_rule``, ``scale``, ``vae_latent``, ``vae_scaling_factor``, ``color_fix``,
``prompt``, ``cfr`` (the CFR settings), ``fused_families`` (scale per LoRA family), ``dtype``,
``base_path`` (a linked base folder, or null) and ``model_config`` (the model section as a dict).

An export folder holds only :data:`EXPORT_ENTRIES`; :func:`foreign_entries` lists anything else, which
``dlightning export --overwrite`` refuses to replace (it replaces an export folder as a whole).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlightning.errors import MissingWeightsError

METADATA_FILE = "dlightning_export.json"
CFR_FILE = "cfr.safetensors"
FORMAT_VERSION = 1
UNET_DIR = "unet"
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
"""Sub-folders copied from the base model (or read from ``base_path`` when the export links it)."""
WEIGHT_DTYPES = ("fp32", "fp16", "bf16")
"""Dtypes an export's weights may be stored in."""
REQUIRED_KEYS = ("scale", "timestep", "x0_rule", "vae_latent", "color_fix", "prompt", "model_config")
EXPORT_ENTRIES = (METADATA_FILE, CFR_FILE, UNET_DIR, *BASE_COMPONENTS)
"""Every top-level name an export folder may hold."""


def write_metadata(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` as the folder's metadata file (it must hold every required key)."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"export metadata lacks {missing}")
    path = Path(folder) / METADATA_FILE
    path.write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2))
    return path


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The metadata of an export folder.

    Raises:
        MissingWeightsError: The folder is not a dlightning export, or its metadata is unreadable,
            lacks a required key, or is from a newer format.
    """
    root = Path(folder)
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
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


def foreign_entries(folder: str | Path) -> list[str]:
    """Names in ``folder`` that are not part of an export's layout (sorted; empty for a pure export)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in EXPORT_ENTRIES)


def component_folders(folder: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Where each component of an export lives (``unet`` in the export, the rest possibly in ``base_path``).

    Raises:
        MissingWeightsError: A component folder or the CFR file is missing.
    """
    root = Path(folder)
    base = Path(meta["base_path"]) if meta.get("base_path") else root
    found = {UNET_DIR: root / UNET_DIR, **{name: base / name for name in BASE_COMPONENTS}}
    for path in found.values():
        if not path.is_dir():
            raise MissingWeightsError(f"export {str(root)!r} is incomplete: {path} is missing")
    if not (root / CFR_FILE).is_file():
        raise MissingWeightsError(f"export {str(root)!r} is incomplete: {root / CFR_FILE} is missing")
    return found

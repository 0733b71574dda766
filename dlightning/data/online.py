"""Online LQ for sources with ``data.sources[i].lq=online`` (docs/DATA.md 1.8).

The loader worker reads and crops the HR clip only and draws the clip's degradation parameters there,
with the offline sampler (:func:`~dlightning.degradation.sampling.sample_params`) and a generator
seeded by (data seed, source, source epoch, slot of the position): the same clip read in another
epoch gets fresh parameters, and the same position always gets the same ones, whichever worker or
resume reads it. The batch carries them as ``batch["degradation"]`` (one ``{"params", "noise_seed"}``
per clip) instead of ``batch["lq"]``; after the batch reaches the training device,
:func:`apply_online_degradation` (called by ``VSRDataModule.on_after_batch_transfer``) degrades the
HR clips there with :func:`~dlightning.degradation.online.degrade_batch` and sets ``batch["lq"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlightning.contracts.shard_format import read_manifest
from dlightning.data.config import DataConfig
from dlightning.degradation.presets import PRESETS, RECIPE_FIELDS, DegradationPreset, get_preset
from dlightning.degradation.sampling import sample_params
from dlightning.errors import ConfigError

DEGRADATION_KEY = "degradation"
"""Batch key of the per-clip parameters of an online batch (popped once the LQ is made)."""


def source_recipes(cfg: DataConfig) -> list[DegradationPreset | None]:
    """Per ``data.sources`` entry, the recipe of its online LQ (None where the LQ is baked).

    ``preset`` names a preset; '' takes the recipe the shard set's manifest records
    (``build_config.degradation``).

    Raises:
        ConfigError: an unknown preset, or '' for a shard set whose manifest records no recipe.
    """
    recipes: list[DegradationPreset | None] = []
    for i, src in enumerate(cfg.sources):
        if src.lq != "online":
            recipes.append(None)
            continue
        key = f"data.sources.{i}"
        if src.preset:
            if src.preset not in PRESETS:
                raise ConfigError(f"{key}.preset={src.preset!r} is unknown; choose one of {sorted(PRESETS)} or '' "
                                  "(the shard set's own recipe)")
            recipes.append(get_preset(src.preset))
            continue
        recipes.append(_manifest_recipe(key, src.path))
    return recipes


def _manifest_recipe(key: str, path: str) -> DegradationPreset:
    """The recipe a shard set's manifest records, as a typed preset."""
    try:
        section = read_manifest(Path(path)).get("build_config", {}).get("degradation")
    except ConfigError as err:
        raise ConfigError(f"{key}.path={path!r}: {err}") from err
    if not isinstance(section, dict) or section.get("preset") not in PRESETS:
        raise ConfigError(f"{key}.path={path!r}: the manifest records no degradation recipe for the online LQ; "
                          f"set {key}.preset to one of {sorted(PRESETS)}")
    values = {k: section[k] for k in RECIPE_FIELDS if k in section}
    return get_preset(section["preset"], values)


def draw_degradation(recipe: DegradationPreset, seed: int) -> dict[str, Any]:
    """One clip's online degradation: ``{"params": sample_params(recipe, ...), "noise_seed": int}``.

    The parameters and the seed of the device-side noise come from two children of ``seed``, so the
    number of draws the parameters take never shifts the noise.
    """
    params_seq, noise_seq = np.random.SeedSequence(int(seed)).spawn(2)
    params = sample_params(recipe, np.random.default_rng(params_seq))
    return {"params": params, "noise_seed": int(noise_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))}


def apply_online_degradation(batch: dict[str, Any], *, scale: int, codec: str = "cpu") -> dict[str, Any]:
    """Make ``batch["lq"]`` from ``batch["hr"]`` where the batch carries ``batch["degradation"]``.

    ``hr`` and the new ``lq`` are in [-1, 1], as the loader makes them (LQ on 8-bit levels, like a baked
    LQ decoded from PNG). Batches without the key are returned unchanged.
    """
    if not isinstance(batch, dict) or DEGRADATION_KEY not in batch:
        return batch
    from dlightning.degradation.online import degrade_batch

    items = batch.pop(DEGRADATION_KEY)
    hr = batch["hr"]
    # back to the exact 8-bit levels the loader decoded (to_tensor: u8 / 127.5 - 1)
    hr01 = ((hr.float() + 1.0) * 127.5).round() / 255.0
    with torch.no_grad():
        lq01 = degrade_batch(hr01, items, scale, codec=codec)
    batch["lq"] = ((lq01 * 255.0).round() / 127.5 - 1.0).to(hr.dtype)
    return batch

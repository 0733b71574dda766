"""Resuming with a changed config: which changes a checkpoint cannot survive, and a record of the others.

A run folder is resumed with whatever config the new command gives. Before the model is built, the
config stored in the checkpoint is compared with the new one, key by key (dotted paths, list items
by index). A change that alters the shapes of the saved tensors, or the meaning of the step counter
the schedule and the data position are keyed on, makes the checkpoint unusable: that is an error
naming each key. Every other change (a longer ``max_steps``, another learning rate, a larger batch)
is allowed, logged, and appended to ``<run_dir>/config_changes.log`` so the run's history stays
readable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dlightning.errors import ConfigError

INCOMPATIBLE: dict[str, str] = {
    "model.preset": "the architecture of every saved tensor",
    "model.lora.rank_consistency": "the shape of the C-LoRA tensors",
    "model.lora.rank_detail": "the shape of the D-LoRA tensors",
    "model.lora.groups": "which LoRA tensors exist",
    "model.cfr.heads": "the shape of the CFR attention tensors",
    "model.cfr.embed_dim": "the shape of the CFR attention tensors",
    "model.cfr.in_channels": "the shape of the CFR attention tensors",
    "model.scale": "what the trained tensors were trained to do",
    "schedule": "which phase and loss weights each saved step had",
    "optim.accumulate": "how micro-batches map to the optimizer steps the schedule counts",
    "trainer.strategy": "the checkpoint's format (DeepSpeed folders vs. DDP files) and optimizer layout",
}
"""Key prefixes a resumed run must keep, and what a change of each would break."""
LOG_NAME = "config_changes.log"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}`` (empty containers kept as values)."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree:
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def config_changes(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` for every leaf that differs (``<absent>`` where one side lacks it)."""
    old_flat, new_flat = flatten(stored), flatten(new)
    absent = "<absent>"
    return [(key, old_flat.get(key, absent), new_flat.get(key, absent))
            for key in sorted(set(old_flat) | set(new_flat)) if old_flat.get(key, absent) != new_flat.get(key, absent)]


def _breaks(key: str) -> str | None:
    for prefix, what in INCOMPATIBLE.items():
        if key == prefix or key.startswith(prefix + "."):
            return what
    return None


def check_resume(stored: dict[str, Any], new: dict[str, Any], *, checkpoint: str | Path, run_dir: str | Path,
                 record: bool = True) -> list[tuple[str, Any, Any]]:
    """Refuse incompatible changes, record the others; returns the allowed changes.

    Args:
        stored: The config the checkpoint was trained with (plain containers).
        new: The config of this start (plain containers).
        checkpoint: The checkpoint being resumed (named in messages and the record).
        run_dir: The run folder; the allowed changes are appended to its ``config_changes.log``.
        record: Write the record (global rank 0 only; every rank checks).

    Raises:
        ConfigError: A change of a key in :data:`INCOMPATIBLE`, naming every such key and the fix.
    """
    changes = [c for c in config_changes(stored, new) if c[0] != "trainer.run_dir"]
    refused = [(key, old, value, what) for key, old, value in changes if (what := _breaks(key))]
    if refused:
        lines = "\n  ".join(f"{key}: {old!r} -> {value!r} (changes {what})" for key, old, value, what in refused)
        raise ConfigError(f"cannot resume {checkpoint} with this config:\n  {lines}\nrestore these values, or "
                          "start a new run in another trainer.run_dir")
    if changes and record:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        body = "".join(f"  {key}: {old!r} -> {value!r}\n" for key, old, value in changes)
        with open(Path(run_dir) / LOG_NAME, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} resume from {checkpoint}:\n{body}")
    return changes

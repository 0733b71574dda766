"""Phase names, optimizer groups, LoRA families and loss terms (docs/METHOD.md 4.3 and 4.5).

Every component that branches on a phase or names a group reads these constants, so a new phase
or group is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable

CONSISTENCY = "consistency"
"""C-LoRA, CFR and conv_in train; video clips feed it."""
DETAIL = "detail"
"""D-LoRA and conv_in train; camera-path image clips feed it."""
PHASES = (CONSISTENCY, DETAIL)

PhaseFn = Callable[[int], str]
"""Micro-batch index -> phase name; the data layer receives one from the composition root."""

PARAM_GROUPS = ("c_lora", "cfr", "d_lora", "conv_in")
"""The optimizer's named parameter groups, in optimizer order."""
ACTIVE_GROUPS: dict[str, tuple[str, ...]] = {
    CONSISTENCY: ("c_lora", "cfr", "conv_in"),
    DETAIL: ("d_lora", "conv_in"),
}
"""The groups that step in each phase; conv_in trains in both."""

LORA_FAMILIES = (CONSISTENCY, DETAIL)
"""The two LoRA families on the UNet, named after the phase that trains them."""

LOSS_TERMS = ("l2", "lpips", "csd", "temporal")
"""Loss terms the schedule weights; a segment's ``weights`` keys come from here."""

SAMPLE_KIND_PHASE = {"video": CONSISTENCY, "image": DETAIL}
"""Which phase a shard sample of each ``meta.kind`` feeds by default."""


def check_phase(phase: str) -> str:
    """Return ``phase`` when it is a known phase name, else raise ValueError naming the valid ones."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {list(PHASES)}")
    return phase

"""The named metrics of ``dlightning evaluate`` (and of validation): kind, direction, weight keys.

Kinds: ``fr`` full-reference per frame (needs GT), ``nr`` no-reference per frame, ``temporal`` one value
per clip (E*warp; flow on the GT when given, else on the evaluated frames).
"""

from __future__ import annotations

from dataclasses import dataclass

from dlightning.errors import ConfigError


@dataclass(frozen=True)
class MetricSpec:
    """One metric: how it is computed and how to read it."""

    name: str
    kind: str
    """fr | nr | temporal."""
    higher_is_better: bool
    weights: tuple[str, ...] = ()
    """Entries of :data:`~dlightning.metrics.weights.WEIGHT_FILES` it reads (``<prefix>.<entry>`` keys)."""
    label: str = ""
    """Name in tables (e.g. ``PSNR (Y)``, ``E*warp (RAFT)``)."""


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("psnr", "fr", True, label="PSNR"),
    MetricSpec("psnr_y", "fr", True, label="PSNR (Y)"),
    MetricSpec("ssim", "fr", True, label="SSIM"),
    MetricSpec("ssim_y", "fr", True, label="SSIM (Y)"),
    MetricSpec("lpips", "fr", False, ("lpips",), "LPIPS"),
    MetricSpec("dists", "fr", False, ("dists_vgg", "dists"), "DISTS"),
    MetricSpec("ewarp_raft", "temporal", False, ("raft",), "E*warp (RAFT)"),
    MetricSpec("ewarp_spynet", "temporal", False, ("spynet",), "E*warp (SPyNet)"),
    MetricSpec("ewarp_farneback", "temporal", False, (), "E*warp (Farneback)"),
    MetricSpec("musiq", "nr", True, ("musiq",), "MUSIQ"),
    MetricSpec("clipiqa", "nr", True, ("clipiqa",), "CLIP-IQA"),
    MetricSpec("niqe", "nr", False, ("niqe",), "NIQE"),
    MetricSpec("brisque", "nr", False, ("brisque",), "BRISQUE"),
)}

UNAVAILABLE: dict[str, str] = {
    "dover": "DOVER has no maintained installable implementation (pyiqa 0.1.16 does not include it); score the "
             "results with the DOVER authors' code and add its CSV column to the table (docs/EVALUATION.md)",
}
"""Metrics the papers report that dlightning cannot compute, with what to do instead."""


def metric_spec(name: str) -> MetricSpec:
    """The spec of metric ``name``.

    Raises:
        ConfigError: An unknown or unavailable metric (the message lists the valid names).
    """
    if name in METRICS:
        return METRICS[name]
    if name in UNAVAILABLE:
        raise ConfigError(f"metric {name!r}: {UNAVAILABLE[name]}")
    raise ConfigError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")


def higher_is_better(name: str) -> bool | None:
    """Direction of a metric column (None for a column that is not a known metric)."""
    base = name.removesuffix("_gt")
    spec = METRICS.get(base)
    return None if spec is None else spec.higher_is_better

"""Degradation recipes as typed dataclasses, the named presets and their plain-dict form.

A :class:`DegradationPreset` says from which ranges the parameters of a clip's second-order
Real-ESRGAN degradation are drawn (docs/DATA.md 1.1, docs/METHOD.md 6.3); :mod:`.sampling` draws them and
:mod:`.operators` applies them. Nothing here imports OpenCV, so a GPU degradation can share the
recipes and the sampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlightning.contracts.config_io import check_choice, check_keys
from dlightning.degradation import kernels
from dlightning.degradation.codec import CODECS, RATE_CONTROLS
from dlightning.errors import ConfigError

RESIZE_MODE_NAMES: tuple[str, ...] = ("area", "bilinear", "bicubic")
"""Interpolations a resize may draw, in drawing order (the operators map them to OpenCV flags)."""
ORDERS: tuple[str, ...] = ("resize_sinc_then_jpeg", "jpeg_then_resize_sinc")
"""The two orders of stage 2's last steps, in drawing order."""
CODEC_POSITIONS: tuple[str, ...] = ("final", "stage1")


@dataclass
class KernelSampling:
    """How a stage's blur kernel is drawn (Real-ESRGAN ``random_mixed_kernels`` + sinc)."""

    sinc_prob: float = 0.1
    types: list[str] = field(default_factory=lambda: list(kernels.MIXED_TYPES))
    probs: list[float] = field(default_factory=lambda: list(kernels.MIXED_PROBS))
    sigma_range: list[float] = field(default_factory=lambda: [0.2, 3.0])
    beta_g_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    beta_p_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    sizes: list[int] = field(default_factory=lambda: list(kernels.KERNEL_SIZES))


@dataclass
class StagePreset:
    """One degradation stage."""

    kernel: KernelSampling = field(default_factory=KernelSampling)
    blur_prob: float = 1.0
    """Probability of blurring at all in this stage (stage 2 of Real-ESRGAN: 0.8)."""
    resize_probs: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])
    """Probabilities of [up, down, keep]."""
    up_range: list[float] = field(default_factory=lambda: [1.0, 1.5])
    down_range: list[float] = field(default_factory=lambda: [0.15, 1.0])
    gaussian_prob: float = 0.5
    """Probability of Gaussian noise; otherwise Poisson."""
    noise_sigma_range: list[float] = field(default_factory=lambda: [1.0, 30.0])
    """Gaussian sigma in 8-bit units (divided by 255)."""
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[int] = field(default_factory=lambda: [30, 95])


@dataclass
class CodecPreset:
    """Video-codec compression of the clip as one sequence (PyAV, in-memory mp4, yuv420p)."""

    prob: float = 0.0
    """Probability that a clip is codec-compressed (0 disables the step)."""
    codecs: list[str] = field(default_factory=lambda: list(CODECS))
    codec_probs: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2])
    rate_control: str = "bitrate"
    """bitrate: ``bitrate_range`` bit/s at 1 fps (= bits per frame); crf: constant quality ``crf_range``."""
    bitrate_range: list[int] = field(default_factory=lambda: [10_000, 100_000])
    crf_range: list[int] = field(default_factory=lambda: [20, 35])
    position: str = "final"
    """final: on the LQ clip after stage 2 (cheap, like a delivery codec); stage1: after stage-1 JPEG."""


@dataclass
class DegradationPreset:
    """A full second-order degradation recipe (the ``realesrgan``/``dloral_mild``/``video`` presets)."""

    name: str = "realesrgan"
    stage1: StagePreset = field(default_factory=StagePreset)
    stage2: StagePreset = field(default_factory=StagePreset)
    final_sinc_prob: float = 0.8
    final_omega_range: list[float] = field(default_factory=lambda: [math.pi / 3, math.pi])
    codec: CodecPreset = field(default_factory=CodecPreset)

    def __post_init__(self) -> None:
        check_codec(self.codec, "codec")


RECIPE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DegradationPreset) if f.name != "name")
"""The fields of a recipe besides its name (what a config section may override)."""


def check_codec(codec: CodecPreset, section: str) -> None:
    """Raise ConfigError when the codec step names an unknown codec, rate control or position."""
    check_choice(section, "rate_control", codec.rate_control, RATE_CONTROLS)
    check_choice(section, "position", codec.position, CODEC_POSITIONS)
    for name in codec.codecs:
        if name not in CODECS:
            raise ConfigError(f"{section}.codecs: codec {name!r} is not supported; choose from {list(CODECS)}")
    if len(codec.codecs) != len(codec.codec_probs):
        raise ConfigError(f"{section}.codecs and {section}.codec_probs must have the same length")


def _realesrgan() -> DegradationPreset:
    stage2 = StagePreset(
        kernel=KernelSampling(sigma_range=[0.2, 1.5]),
        blur_prob=0.8,
        resize_probs=[0.3, 0.4, 0.3],
        up_range=[1.0, 1.2],
        down_range=[0.3, 1.0],
        noise_sigma_range=[1.0, 25.0],
        poisson_scale_range=[0.05, 2.5],
    )
    return DegradationPreset(name="realesrgan", stage1=StagePreset(), stage2=stage2)


def _dloral_mild() -> DegradationPreset:
    stage1 = StagePreset(
        down_range=[0.3, 1.0],
        noise_sigma_range=[1.0, 15.0],
        poisson_scale_range=[0.05, 2.0],
        jpeg_range=[60, 95],
    )
    stage2 = StagePreset(
        kernel=KernelSampling(sigma_range=[0.2, 1.5]),
        blur_prob=0.5,
        resize_probs=[0.3, 0.4, 0.3],
        up_range=[1.0, 1.2],
        down_range=[0.6, 1.0],
        noise_sigma_range=[1.0, 12.0],
        poisson_scale_range=[0.05, 1.0],
        jpeg_range=[60, 100],
    )
    return DegradationPreset(name="dloral_mild", stage1=stage1, stage2=stage2)


def _video() -> DegradationPreset:
    preset = _realesrgan()
    preset.name = "video"
    preset.codec = CodecPreset(prob=1.0)
    return preset


PRESETS = {"realesrgan": _realesrgan, "dloral_mild": _dloral_mild, "video": _video}


def get_preset(name: str, overrides: Mapping[str, Any] | None = None) -> DegradationPreset:
    """Return a preset by name, with optional nested overrides (e.g. ``{"codec": {"prob": 0.5}}``).

    Raises:
        ConfigError: Unknown preset name, unknown override key (with the closest valid one) or a
            value of the wrong type.
    """
    if name not in PRESETS:
        raise ConfigError(f"degradation preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]()
    if not overrides:
        return preset
    check_keys(dict(overrides), DegradationPreset)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(preset), OmegaConf.create(dict(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad degradation override for preset {name!r}: {err}") from err


def preset_to_dict(preset: Any) -> dict[str, Any]:
    """Plain-dict view of a preset (or of any dataclass of this module; for manifests)."""

    def convert(obj: Any) -> Any:
        if is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, list):
            return [convert(v) for v in obj]
        return obj

    return convert(preset)


def recipe_overrides(preset: DegradationPreset, base: DegradationPreset) -> dict[str, Any]:
    """The nested fields where ``preset`` differs from ``base`` (lists compare whole), name left out.

    ``get_preset(base.name, recipe_overrides(preset, base))`` rebuilds ``preset``; the same
    overrides applied to another named preset carry the changes over to it.
    """

    def diff(new: Any, old: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(old.get(key), dict):
                sub = diff(value, old[key])
                if sub:
                    out[key] = sub
            elif value != old.get(key):
                out[key] = value
        return out

    new, old = preset_to_dict(preset), preset_to_dict(base)
    new.pop("name", None)
    return diff(new, old)

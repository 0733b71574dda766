"""Drawing one clip's degradation parameters from a preset with an explicit generator.

:func:`sample_params` makes every random choice of a clip ONCE (kernels as their generating specs,
so the result is JSON-serialisable and stored in ``deg.json``); the operators then apply the same
parameters to every frame and draw only the noise per frame. NumPy only (no OpenCV), so an online
degradation can draw the same parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlightning.degradation import kernels
from dlightning.degradation.presets import (
    ORDERS,
    RESIZE_MODE_NAMES,
    CodecPreset,
    DegradationPreset,
    KernelSampling,
    StagePreset,
)


def _choice(rng: np.random.Generator, options: list[str], probs: list[float] | None = None) -> str:
    p = None if probs is None else np.asarray(probs, dtype=np.float64) / float(np.sum(probs))
    return str(options[int(rng.choice(len(options), p=p))])


def sample_kernel(rng: np.random.Generator, ks: KernelSampling) -> dict[str, Any]:
    """Draw one blur-kernel spec as the stage's kernel settings ask."""
    return kernels.random_mixed_kernel_spec(
        rng,
        sizes=ks.sizes,
        types=ks.types,
        probs=ks.probs,
        sigma_range=ks.sigma_range,
        beta_g_range=ks.beta_g_range,
        beta_p_range=ks.beta_p_range,
        sinc_prob=ks.sinc_prob,
    )


def sample_resize(rng: np.random.Generator, stage: StagePreset) -> dict[str, Any]:
    """Draw a stage's resize: ``{"kind": up/down/keep, "scale", "mode"}``."""
    kind = _choice(rng, ["up", "down", "keep"], stage.resize_probs)
    if kind == "up":
        factor = float(rng.uniform(*stage.up_range))
    elif kind == "down":
        factor = float(rng.uniform(*stage.down_range))
    else:
        factor = 1.0
    return {"kind": kind, "scale": factor, "mode": _choice(rng, list(RESIZE_MODE_NAMES))}


def sample_noise(rng: np.random.Generator, stage: StagePreset) -> dict[str, Any]:
    """Draw a stage's noise type and strength (the realisation is drawn per frame when applied)."""
    gray = bool(rng.uniform() < stage.gray_noise_prob)
    if rng.uniform() < stage.gaussian_prob:
        return {"type": "gaussian", "sigma": float(rng.uniform(*stage.noise_sigma_range)), "gray": gray}
    return {"type": "poisson", "scale": float(rng.uniform(*stage.poisson_scale_range)), "gray": gray}


def sample_jpeg(rng: np.random.Generator, stage: StagePreset) -> int:
    """Draw a stage's JPEG quality, both ends of ``jpeg_range`` included."""
    lo, hi = stage.jpeg_range
    return int(rng.integers(int(lo), int(hi) + 1))


def sample_stage(rng: np.random.Generator, stage: StagePreset) -> dict[str, Any]:
    """Draw one stage: ``{"blur", "kernel", "resize", "noise", "jpeg_quality"}``."""
    blur = bool(rng.uniform() < stage.blur_prob)
    return {
        "blur": blur,
        "kernel": sample_kernel(rng, stage.kernel) if blur else None,
        "resize": sample_resize(rng, stage),
        "noise": sample_noise(rng, stage),
        "jpeg_quality": sample_jpeg(rng, stage),
    }


def sample_codec(rng: np.random.Generator, codec: CodecPreset) -> dict[str, Any] | None:
    """Draw the codec step, or None when the clip is not codec-compressed."""
    if codec.prob <= 0 or rng.uniform() >= codec.prob:
        return None
    out: dict[str, Any] = {
        "codec": _choice(rng, codec.codecs, codec.codec_probs),
        "rate_control": codec.rate_control,
        "position": codec.position,
    }
    if codec.rate_control == "bitrate":
        out["bitrate"] = int(rng.integers(int(codec.bitrate_range[0]), int(codec.bitrate_range[1]) + 1))
    else:
        out["crf"] = int(rng.integers(int(codec.crf_range[0]), int(codec.crf_range[1]) + 1))
    return out


def sample_params(preset: DegradationPreset, rng: np.random.Generator) -> dict[str, Any]:
    """Draw every degradation choice for one clip (JSON-serialisable; kernels as specs).

    Args:
        preset: The recipe (see :data:`~dlightning.degradation.presets.PRESETS`).
        rng: The clip's generator; the same state gives the same parameters.

    Returns:
        ``{"preset", "stage1", "stage2", "final", "codec"}``; ``codec`` is None when not applied.
    """
    stage1 = sample_stage(rng, preset.stage1)
    stage2 = sample_stage(rng, preset.stage2)
    if rng.uniform() < preset.final_sinc_prob:
        sinc = {
            "type": "sinc",
            "size": int(rng.choice(kernels.KERNEL_SIZES)),
            "omega_c": float(rng.uniform(*preset.final_omega_range)),
        }
    else:
        sinc = {"type": "identity", "size": kernels.PAD_TO}
    final = {
        "order": _choice(rng, list(ORDERS)),
        "resize_mode": _choice(rng, list(RESIZE_MODE_NAMES)),
        "sinc": sinc,
    }
    return {
        "preset": preset.name,
        "stage1": stage1,
        "stage2": stage2,
        "final": final,
        "codec": sample_codec(rng, preset.codec),
    }

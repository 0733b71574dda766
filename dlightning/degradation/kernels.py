"""Blur kernels of the Real-ESRGAN family (docs/DATA.md 1.1), built with NumPy/SciPy.

Every kernel is described by a small JSON-serialisable *spec* (its type and generating
parameters), so a clip's degradation can be stored in ``deg.json`` and rebuilt exactly.
``build_kernel(spec)`` turns a spec into a float32 array that sums to one, zero-padded to
``pad_to`` (21 by default, the largest kernel size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special

from dlightning.errors import ConfigError

KERNEL_SIZES: tuple[int, ...] = tuple(range(7, 22, 2))
"""Odd kernel sizes 7..21 drawn uniformly, as in Real-ESRGAN."""
PAD_TO = 21
MIXED_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
MIXED_PROBS: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
ALL_TYPES = (*MIXED_TYPES, "sinc", "identity")


def _check_size(size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"kernel size must be a positive odd integer, got {size}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (x right, y down) centred on the middle pixel."""
    ax = np.arange(size, dtype=np.float64) - size // 2
    return np.meshgrid(ax, ax, indexing="xy")


def compute_mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Squared Mahalanobis distance ``p^T S^-1 p`` on a size x size grid.

    The covariance is ``S = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``, so ``theta`` rotates
    the principal axes counter-clockwise in (x, y) coordinates.
    """
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    x, y = _grid(size)
    return inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y


def _normalise(kernel: np.ndarray) -> np.ndarray:
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"kernel has non-positive or non-finite sum {total}; check its parameters")
    return kernel / total


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> np.ndarray:
    """Anisotropic (or, with sigma_x == sigma_y, isotropic) Gaussian: ``exp(-d/2)``, normalised."""
    _check_size(size)
    return _normalise(np.exp(-0.5 * compute_mahalanobis(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Generalised Gaussian ``exp(-0.5 * d^beta)``, normalised.

    ``d`` is the squared Mahalanobis distance; beta = 1 gives the Gaussian.
    """
    _check_size(size)
    return _normalise(np.exp(-0.5 * np.power(compute_mahalanobis(size, sigma_x, sigma_y, theta), beta)))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Plateau-shaped kernel ``1 / (1 + d^beta)``, normalised (flat top, heavy tails)."""
    _check_size(size)
    return _normalise(1.0 / (1.0 + np.power(compute_mahalanobis(size, sigma_x, sigma_y, theta), beta)))


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Circular low-pass (2-D sinc / Airy) kernel ``omega_c J1(omega_c r) / (2 pi r)``, normalised.

    Its value at r = 0 is the limit ``omega_c^2 / (4 pi)``.
    """
    _check_size(size)
    x, y = _grid(size)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = omega_c * special.j1(omega_c * r) / (2 * math.pi * r)
    kernel[r == 0] = omega_c**2 / (4 * math.pi)
    return _normalise(kernel)


def identity_kernel(size: int = PAD_TO) -> np.ndarray:
    """A unit pulse: filtering with it leaves the image unchanged."""
    _check_size(size)
    kernel = np.zeros((size, size), dtype=np.float64)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def pad_kernel(kernel: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad a square odd kernel symmetrically to ``pad_to`` x ``pad_to``."""
    size = kernel.shape[0]
    if size > pad_to:
        raise ConfigError(f"kernel size {size} is larger than pad_to={pad_to}")
    pad = (pad_to - size) // 2
    return np.pad(kernel, pad)


def build_kernel(spec: dict[str, Any], pad_to: int = PAD_TO) -> np.ndarray:
    """Rebuild a kernel from its spec (as produced by the samplers) as float32, padded to ``pad_to``.

    Args:
        spec: ``{"type": ..., "size": ..., <parameters>}``; types are ``iso``, ``aniso``,
            ``generalized_iso``, ``generalized_aniso``, ``plateau_iso``, ``plateau_aniso``,
            ``sinc`` (``omega_c``) and ``identity``.
        pad_to: Output side length (odd, >= spec size).

    Returns:
        A ``(pad_to, pad_to)`` float32 kernel that sums to one.
    """
    kind, size = spec["type"], int(spec["size"])
    if kind in ("iso", "aniso"):
        k = gaussian_kernel(size, spec["sigma_x"], spec["sigma_y"], spec["theta"])
    elif kind in ("generalized_iso", "generalized_aniso"):
        k = generalized_gaussian_kernel(size, spec["sigma_x"], spec["sigma_y"], spec["theta"], spec["beta"])
    elif kind in ("plateau_iso", "plateau_aniso"):
        k = plateau_kernel(size, spec["sigma_x"], spec["sigma_y"], spec["theta"], spec["beta"])
    elif kind == "sinc":
        k = sinc_kernel(size, spec["omega_c"])
    elif kind == "identity":
        k = identity_kernel(size)
    else:
        raise ConfigError(f"unknown kernel type {kind!r}; choose one of {list(ALL_TYPES)}")
    return pad_kernel(k, pad_to).astype(np.float32)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def sample_sinc_spec(
    rng: np.random.Generator,
    *,
    sizes: Sequence[int] = KERNEL_SIZES,
    omega_small: Sequence[float] = (math.pi / 3, math.pi),
    omega_large: Sequence[float] = (math.pi / 5, math.pi),
) -> dict[str, Any]:
    """Draw a sinc kernel spec: omega from ``omega_small`` when size < 13, else ``omega_large``."""
    size = int(rng.choice(sizes))
    omega = _uniform(rng, omega_small if size < 13 else omega_large)
    return {"type": "sinc", "size": size, "omega_c": omega}


def random_mixed_kernel_spec(
    rng: np.random.Generator,
    *,
    sizes: Sequence[int] = KERNEL_SIZES,
    types: Sequence[str] = MIXED_TYPES,
    probs: Sequence[float] = MIXED_PROBS,
    sigma_range: Sequence[float] = (0.2, 3.0),
    theta_range: Sequence[float] = (-math.pi, math.pi),
    beta_g_range: Sequence[float] = (0.5, 4.0),
    beta_p_range: Sequence[float] = (1.0, 2.0),
    sinc_prob: float = 0.0,
) -> dict[str, Any]:
    """Draw one kernel spec: a sinc with ``sinc_prob``, else a type from ``types`` with ``probs``.

    Isotropic types use sigma_y = sigma_x and theta = 0; anisotropic ones draw sigma_x, sigma_y
    and theta independently; generalised / plateau types add ``beta``.
    """
    if len(types) != len(probs):
        raise ConfigError(f"kernel types {list(types)} and probs {list(probs)} must have the same length")
    if rng.uniform() < sinc_prob:
        return sample_sinc_spec(rng, sizes=sizes)
    p = np.asarray(probs, dtype=np.float64)
    kind = str(types[int(rng.choice(len(types), p=p / p.sum()))])
    if kind not in MIXED_TYPES:
        raise ConfigError(f"unknown mixed kernel type {kind!r}; choose from {list(MIXED_TYPES)}")
    size = int(rng.choice(sizes))
    sigma_x = _uniform(rng, sigma_range)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = _uniform(rng, sigma_range), _uniform(rng, theta_range)
    spec: dict[str, Any] = {
        "type": kind,
        "size": size,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "theta": theta,
    }
    if kind.startswith("generalized"):
        spec["beta"] = _uniform(rng, beta_g_range)
    elif kind.startswith("plateau"):
        spec["beta"] = _uniform(rng, beta_p_range)
    return spec


def random_mixed_kernel(rng: np.random.Generator, pad_to: int = PAD_TO, **kwargs: Any) -> np.ndarray:
    """Draw a kernel with :func:`random_mixed_kernel_spec` and build it (padded to ``pad_to``)."""
    return build_kernel(random_mixed_kernel_spec(rng, **kwargs), pad_to=pad_to)

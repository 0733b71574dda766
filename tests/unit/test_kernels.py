"""Blur kernels: normalisation, closed forms, sinc cutoff, rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlightning.degradation import kernels

C = 10  # centre index of a 21x21 kernel


def _spec(kind: str, **kw: float) -> dict:
    base = {"type": kind, "size": 21, "sigma_x": 2.0, "sigma_y": 2.0, "theta": 0.0}
    base.update(kw)
    return base


@pytest.mark.parametrize("seed", range(40))
def test_random_kernels_sum_to_one_and_are_padded(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spec = kernels.random_mixed_kernel_spec(rng, sinc_prob=0.3)
    k = kernels.build_kernel(spec)
    assert k.shape == (21, 21) and k.dtype == np.float32
    assert spec["size"] in range(7, 22, 2)
    assert abs(float(k.sum()) - 1.0) < 1e-5
    pad = (21 - spec["size"]) // 2
    if pad:
        assert not k[:pad].any() and not k[:, :pad].any() and not k[-pad:].any()


def test_same_rng_same_kernel() -> None:
    a = kernels.random_mixed_kernel(np.random.default_rng(3))
    b = kernels.random_mixed_kernel(np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_iso_gaussian_closed_form() -> None:
    sigma = 1.7
    k = kernels.build_kernel(_spec("iso", sigma_x=sigma, sigma_y=sigma)).astype(np.float64)
    for dx, dy in [(1, 0), (2, 1), (3, 3), (0, 5)]:
        expected = math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))
        assert k[C + dy, C + dx] / k[C, C] == pytest.approx(expected, rel=1e-5)


def test_aniso_axes_and_rotation() -> None:
    k = kernels.build_kernel(_spec("aniso", sigma_x=2.0, sigma_y=1.0)).astype(np.float64)
    # theta = 0: sigma_x acts along columns (x), sigma_y along rows (y).
    assert k[C, C + 1] / k[C, C] == pytest.approx(math.exp(-1 / 8), rel=1e-5)
    assert k[C + 1, C] / k[C, C] == pytest.approx(math.exp(-1 / 2), rel=1e-5)
    rotated = kernels.build_kernel(_spec("aniso", sigma_x=2.0, sigma_y=1.0, theta=math.pi / 2))
    swapped = kernels.build_kernel(_spec("aniso", sigma_x=1.0, sigma_y=2.0))
    np.testing.assert_allclose(rotated, swapped, atol=1e-7)
    np.testing.assert_allclose(rotated, k.T, atol=1e-7)


def test_rotated_aniso_has_tilted_axis() -> None:
    k = kernels.build_kernel(_spec("aniso", sigma_x=3.0, sigma_y=0.5, theta=math.pi / 4))
    # The long axis is the diagonal x = y (y down), so (1,1) is much brighter than (1,-1).
    assert k[C + 2, C + 2] > 10 * k[C - 2, C + 2]


def test_generalized_and_plateau_closed_forms() -> None:
    sigma, beta = 1.5, 2.5
    d = lambda dx, dy: (dx * dx + dy * dy) / sigma**2  # noqa: E731
    g = kernels.build_kernel(_spec("generalized_iso", sigma_x=sigma, sigma_y=sigma, beta=beta)).astype(float)
    p = kernels.build_kernel(_spec("plateau_iso", sigma_x=sigma, sigma_y=sigma, beta=beta)).astype(float)
    for dx, dy in [(1, 0), (1, 1), (2, 2)]:
        assert g[C + dy, C + dx] / g[C, C] == pytest.approx(math.exp(-0.5 * d(dx, dy) ** beta), rel=1e-4)
        assert p[C + dy, C + dx] / p[C, C] == pytest.approx(1 / (1 + d(dx, dy) ** beta), rel=1e-4)
    gauss = kernels.build_kernel(_spec("iso", sigma_x=sigma, sigma_y=sigma))
    np.testing.assert_allclose(
        kernels.build_kernel(_spec("generalized_iso", sigma_x=sigma, sigma_y=sigma, beta=1.0)),
        gauss,
        atol=1e-7,
    )


def test_sinc_matches_disk_fourier_integral() -> None:
    omega = math.pi / 2
    k = kernels.build_kernel({"type": "sinc", "size": 21, "omega_c": omega}).astype(np.float64)
    # Independent reference: inverse Fourier transform of the indicator of the disk |w| < omega,
    # integrated numerically on a fine frequency grid (no Bessel function involved).
    w = np.linspace(-omega, omega, 801)
    wx, wy = np.meshgrid(w, w)
    disk = (wx**2 + wy**2) < omega**2

    def ref(x: float, y: float) -> float:
        return float(np.sum(np.cos(wx * x + wy * y) * disk))

    for x, y in [(1, 0), (3, 0), (2, 2), (0, 4)]:
        assert k[C + y, C + x] / k[C, C] == pytest.approx(ref(x, y) / ref(0, 0), abs=5e-3)


def test_sinc_is_radially_symmetric_with_expected_cutoff() -> None:
    omega = math.pi / 2
    k = kernels.build_kernel({"type": "sinc", "size": 21, "omega_c": omega}).astype(np.float64)
    np.testing.assert_allclose(k, k.T, atol=1e-9)
    np.testing.assert_allclose(k, k[::-1], atol=1e-9)
    np.testing.assert_allclose(k, np.rot90(k), atol=1e-9)
    n = 256
    spectrum = np.abs(np.fft.fft2(k, s=(n, n)))
    freqs = 2 * math.pi * np.fft.fftfreq(n)
    for f in (0.2 * math.pi, 0.35 * math.pi):  # pass band
        assert spectrum[0, int(round(f / (2 * math.pi) * n))] > 0.85
    for f in (0.7 * math.pi, 0.9 * math.pi):  # stop band
        assert spectrum[0, int(round(f / (2 * math.pi) * n))] < 0.15
    assert freqs[1] > 0  # sanity of the frequency axis used above


def test_identity_kernel_is_a_pulse() -> None:
    k = kernels.build_kernel({"type": "identity", "size": 21})
    assert k[C, C] == 1.0 and k.sum() == 1.0


def test_sinc_omega_depends_on_size() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = kernels.sample_sinc_spec(rng)
        low = math.pi / 3 if spec["size"] < 13 else math.pi / 5
        assert low <= spec["omega_c"] <= math.pi


def test_unknown_kernel_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown kernel type"):
        kernels.build_kernel({"type": "box", "size": 7})

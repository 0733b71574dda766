"""Phase schedule: the reference table of docs/METHOD.md 4.3 step by step, custom segments, validation."""

from __future__ import annotations

import pytest

from dlightning.errors import ConfigError
from dlightning.training.config import ScheduleConfig, SegmentConfig
from dlightning.training.schedule import phase_at, phase_changes, reference_segments, resolve_segments

C, D = "consistency", "detail"


def _table_row(step: int) -> tuple[str, float, float, float, float]:
    """docs/METHOD.md 4.3 written out row by row: (phase, l2, lpips, csd, cons)."""
    if step <= 5000:
        return C, 1.0, 2 * 0.02, 0.0, 2 * 10.0
    if step <= 6000:
        p = (step - 5000) / 1000
        return D, 1.0, 2 * (0.02 + 0.98 * p), 1 * p, 10 * (2 - p)
    if step <= 13000:
        return D, 1.0, 2.0, 1.0, 10.0
    if step <= 14000:
        p = (step - 13000) / 1000
        return C, 1.0, 2.0, 1.0, 10 * (1 + p)
    if step <= 18000:
        return C, 1.0, 2.0, 1.0, 20.0
    if step <= 19000:
        p = (step - 18000) / 1000
        return D, 1.0, 2.0, 1.0, 10 * (2 - p)
    return D, 1.0, 2.0, 1.0, 10.0


REFERENCE_STEPS = [
    0,
    1,
    4999,
    5000,
    5001,
    5500,
    6000,
    6001,
    12999,
    13000,
    13001,
    13500,
    14000,
    14001,
    17999,
    18000,
    18001,
    18500,
    19000,
    19001,
    50000,
]


@pytest.mark.parametrize("step", REFERENCE_STEPS)
def test_reference_table(step: int) -> None:
    spec = phase_at(step, ScheduleConfig(preset="reference"))
    phase, l2, lpips_w, csd, cons = _table_row(step)
    assert spec.phase == phase
    assert spec.weights == pytest.approx({"l2": l2, "lpips": lpips_w, "csd": csd, "temporal": cons}, abs=1e-9)


def test_reference_known_values() -> None:
    """A few hand-computed numbers, independent of the table function."""
    cfg = ScheduleConfig(preset="reference")
    assert phase_at(5500, cfg).weights["lpips"] == pytest.approx(1.02)
    assert phase_at(5500, cfg).weights["temporal"] == pytest.approx(15.0)
    assert phase_at(5001, cfg).weights["csd"] == pytest.approx(0.001)
    assert phase_at(13500, cfg).weights["temporal"] == pytest.approx(15.0)
    assert phase_at(18001, cfg).weights["temporal"] == pytest.approx(19.99)
    assert phase_at(18001, cfg).weights["csd"] == 1.0


def test_reference_segments_and_progress() -> None:
    cfg = ScheduleConfig(preset="reference")
    assert [phase_at(s, cfg).segment for s in (0, 5000, 5001, 13000, 13001, 18000, 18001, 10**6)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert phase_at(5250, cfg).progress == pytest.approx(0.25)
    assert phase_at(6000, cfg).progress == 1.0
    assert phase_at(7000, cfg).progress == 1.0
    assert phase_at(0, cfg).progress == 1.0
    assert len(reference_segments()) == 4


def test_reference_ignores_custom_segments() -> None:
    cfg = ScheduleConfig(preset="reference", segments=[SegmentConfig(phase=D, end=None)])
    assert resolve_segments(cfg)[0].end == 5000


def test_phase_changes_reference() -> None:
    cfg = ScheduleConfig(preset="reference")
    near_boundaries = sorted({b + d for b in (0, 5000, 13000, 18000, 19000) for d in (-1, 0, 1, 2)} - {-1})
    changes = [s for s in near_boundaries if phase_changes(s, cfg)]
    assert changes == [0, 5001, 13001, 18001]


def test_default_schedule() -> None:
    cfg = ScheduleConfig()
    assert phase_at(999, cfg).phase == C
    assert phase_at(999, cfg).weights["csd"] == 0.0
    assert phase_at(1000, cfg).phase == D
    assert phase_at(1000, cfg).weights["csd"] == pytest.approx(0.01)
    assert phase_at(1100, cfg).weights["csd"] == 1.0
    assert phase_changes(1000, cfg) and not phase_changes(1001, cfg)


def test_missing_keys_default_to_zero_then_inherit() -> None:
    cfg = ScheduleConfig(
        segments=[
            SegmentConfig(phase=C, end=9, weights={"l2": 3.0}),
            SegmentConfig(phase=D, end=19, ramp=10, weights={"csd": 2.0}),
            SegmentConfig(phase=D, end=None, ramp=0, weights={"l2": 1.0}),
        ]
    )
    assert phase_at(0, cfg).weights == {"l2": 3.0, "lpips": 0.0, "csd": 0.0, "temporal": 0.0}
    assert phase_at(14, cfg).weights == pytest.approx({"l2": 3.0, "lpips": 0.0, "csd": 1.0, "temporal": 0.0})
    assert phase_at(20, cfg).weights == {"l2": 1.0, "lpips": 0.0, "csd": 2.0, "temporal": 0.0}
    # Two segments of the same phase in a row are not a phase change.
    assert not phase_changes(20, cfg)


def test_ramp_equal_to_segment_length_is_allowed() -> None:
    cfg = ScheduleConfig(
        segments=[
            SegmentConfig(phase=C, end=0, weights={"l2": 0.0}),
            SegmentConfig(phase=D, end=4, ramp=4, weights={"l2": 4.0}),
            SegmentConfig(phase=D, end=None),
        ]
    )
    assert [phase_at(s, cfg).weights["l2"] for s in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([], r"schedule\.segments is empty"),
        ([SegmentConfig(end=None), SegmentConfig(end=None)], r"schedule\.segments\.0\.end"),
        (
            [SegmentConfig(end=10), SegmentConfig(end=10), SegmentConfig(end=None)],
            r"schedule\.segments\.1\.end",
        ),
        ([SegmentConfig(end=-1), SegmentConfig(end=None)], r"schedule\.segments\.0\.end"),
        ([SegmentConfig(end=10, ramp=2), SegmentConfig(end=None)], r"schedule\.segments\.0\.ramp"),
        (
            [SegmentConfig(end=10), SegmentConfig(end=15, ramp=6), SegmentConfig(end=None)],
            r"schedule\.segments\.1\.ramp",
        ),
        ([SegmentConfig(end=10), SegmentConfig(end=None, ramp=-1)], r"schedule\.segments\.1\.ramp"),
        ([SegmentConfig(end=None, weights={"l2": -1.0})], r"schedule\.segments\.0\.weights\.l2"),
    ],
)
def test_validation_errors(segments: list[SegmentConfig], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_segments(ScheduleConfig(segments=segments))


def test_step_past_closed_schedule() -> None:
    cfg = ScheduleConfig(segments=[SegmentConfig(end=10)])
    assert phase_at(10, cfg).phase == C
    with pytest.raises(ConfigError, match=r"schedule\.segments\.0\.end"):
        phase_at(11, cfg)


def test_negative_step() -> None:
    with pytest.raises(ValueError, match="step"):
        phase_at(-1, ScheduleConfig())


def test_segment_config_rejects_unknown_weight() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        SegmentConfig(weights={"gan": 1.0})

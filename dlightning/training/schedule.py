"""Phase schedule: which phase trains and with which loss weights, as a pure function of the step.

The step is the module's own optimizer-step counter (not Lightning's ``global_step``, which counts
every ``optimizer.step()`` call). The schedule is a list of segments (``SegmentConfig``); segment k
covers steps (end_{k-1}, end_k], the first one [0, end_0]. Within the first ``ramp`` steps of a
segment its weights move linearly from the previous segment's weights to its own.

``preset: reference`` reproduces docs/METHOD.md 4.3 (the reference training script) exactly. The
``temporal`` weight is the reference's lambda_cons; ``csd`` is inert in consistency phases because
the CSD term is only evaluated in the detail phase (the reference keeps lambda_csd = 1 there).
"""

from __future__ import annotations

from dataclasses import dataclass

from dlightning.contracts.phases import LOSS_TERMS
from dlightning.errors import ConfigError
from dlightning.training.config import ScheduleConfig, SegmentConfig, validate_segments


@dataclass(frozen=True)
class PhaseSpec:
    """What one optimizer step trains.

    Attributes:
        phase: ``"consistency"`` or ``"detail"``.
        weights: loss weights, keys ``l2``, ``lpips``, ``csd``, ``temporal``.
        segment: index of the schedule segment holding the step.
        progress: ramp progress in (0, 1] inside a segment's ramp, 1.0 after it (and for segments
            without a ramp).
    """

    phase: str
    weights: dict[str, float]
    segment: int
    progress: float


def reference_segments() -> list[SegmentConfig]:
    """The reference schedule of docs/METHOD.md 4.3 (base weights l2 1, lpips 2, csd 1, cons 10, L = 1000).

    Returns:
        Four segments: consistency [0, 5000], detail (5000, 13000], consistency (13000, 18000],
        detail (18000, inf), each later one with a 1000-step linear ramp. The first consistency phase
        uses lpips 2 * 0.02; consistency phases double the temporal weight.
    """
    first = {"l2": 1.0, "lpips": 2.0 * 0.02, "csd": 0.0, "temporal": 2.0 * 10.0}
    detail = {"lpips": 2.0, "csd": 1.0, "temporal": 10.0}
    consistency = {"lpips": 2.0, "csd": 1.0, "temporal": 2.0 * 10.0}
    return [
        SegmentConfig(phase="consistency", end=5000, ramp=0, weights=first),
        SegmentConfig(phase="detail", end=13000, ramp=1000, weights=dict(detail)),
        SegmentConfig(phase="consistency", end=18000, ramp=1000, weights=consistency),
        SegmentConfig(phase="detail", end=None, ramp=1000, weights=dict(detail)),
    ]


def resolve_segments(cfg: ScheduleConfig) -> list[SegmentConfig]:
    """Return the validated segments of ``cfg`` (the reference ones for ``preset: reference``).

    Raises:
        ConfigError: naming ``schedule.segments.<i>.<key>`` when the segments are inconsistent.
    """
    segments = reference_segments() if cfg.preset == "reference" else list(cfg.segments)
    validate_segments(segments)
    return segments


def _target_weights(segments: list[SegmentConfig]) -> list[dict[str, float]]:
    """Full weight dicts per segment: missing keys are 0 in the first segment, inherited afterwards."""
    targets: list[dict[str, float]] = []
    previous = dict.fromkeys(LOSS_TERMS, 0.0)
    for seg in segments:
        current = {key: float(seg.weights.get(key, previous[key])) for key in LOSS_TERMS}
        targets.append(current)
        previous = current
    return targets


def _segment_index(step: int, segments: list[SegmentConfig]) -> int:
    for i, seg in enumerate(segments):
        if seg.end is None or step <= seg.end:
            return i
    raise ConfigError(
        f"step {step} is past the last schedule segment (end={segments[-1].end}); "
        f"set schedule.segments.{len(segments) - 1}.end to null or train fewer steps"
    )


def phase_at(step: int, cfg: ScheduleConfig) -> PhaseSpec:
    """Phase and loss weights at optimizer step ``step``.

    Args:
        step: optimizer-step counter, >= 0.
        cfg: the schedule section.

    Returns:
        The ``PhaseSpec`` of that step.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    segments = resolve_segments(cfg)
    index = _segment_index(step, segments)
    targets = _target_weights(segments)
    seg = segments[index]
    progress = 1.0
    if index > 0 and seg.ramp > 0:
        offset = step - segments[index - 1].end
        if offset <= seg.ramp:
            progress = offset / seg.ramp
    start = targets[index - 1] if index > 0 else targets[index]
    end = targets[index]
    weights = {key: start[key] + progress * (end[key] - start[key]) for key in LOSS_TERMS}
    return PhaseSpec(phase=seg.phase, weights=weights, segment=index, progress=progress)


def phase_changes(step: int, cfg: ScheduleConfig) -> bool:
    """Whether ``step`` is the first step of a phase (step 0, or the phase differs from step - 1)."""
    if step == 0:
        return True
    return phase_at(step, cfg).phase != phase_at(step - 1, cfg).phase


class SchedulePhase:
    """Picklable ``phase_fn``: micro-batch m -> ``phase_at(m // accumulate, schedule).phase``.

    Args:
        schedule: The ``ScheduleConfig`` section.
        accumulate: Micro-batches per optimizer step (``optim.accumulate``).
    """

    def __init__(self, schedule: ScheduleConfig, accumulate: int = 1) -> None:
        if accumulate < 1:
            raise ConfigError("optim.accumulate must be >= 1")
        self.schedule, self.accumulate = schedule, accumulate
        self.phases = tuple(sorted({seg.phase for seg in resolve_segments(schedule)}))
        """Phases the schedule uses."""

    def __call__(self, micro_batch: int) -> str:
        """Phase of micro-batch ``micro_batch``."""
        return phase_at(micro_batch // self.accumulate, self.schedule).phase

"""The ``train/...`` metrics of a log line, from numbers the training module hands over.

Loss terms are averaged over every micro-batch since the last log line (a single micro-batch of a
few clips is too noisy to show a trend); throughput counts the clips of every rank since then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dlightning.contracts.phases import PHASES


@dataclass
class StepFacts:
    """What the module knows at a logged optimizer-step boundary."""

    phase: str
    weights: dict[str, float]
    """The schedule's loss weights of the step."""
    optimizer_step: int
    """Optimizer steps taken or skipped so far (the log's x-axis)."""
    skipped_steps: int
    skipped_samples: dict[str, int] | None
    """Samples the data module skipped, by reason (None: it does not count them)."""
    clips_per_micro_batch: int
    world_size: int
    grad_norms: dict[str, float]
    """Gradient norm per group (or ``global`` under DeepSpeed) before clipping."""
    learning_rates: dict[str, float]
    """Learning rate per optimizer group."""
    gpu_mem_gb: float | None
    """Peak GPU memory of this rank (None off the GPU)."""


def peak_gpu_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated on ``device`` in GiB, or None when it is not a GPU."""
    if torch.cuda.is_available() and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


class StepMetrics:
    """Owns the loss window and the throughput clock between two log lines.

    Args:
        log_every: Optimizer steps between log lines (``trainer.log_every``; below 1 counts as 1).
        accumulate: Micro-batches per optimizer step.
    """

    def __init__(self, log_every: int, accumulate: int) -> None:
        self.every = max(log_every, 1)
        self.accumulate = accumulate
        self._window: dict[str, tuple[float, int]] = {}
        """Sum and count per loss term since the last log line."""
        self._t_last = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's scalar values to the window (non-finite ones are left out)."""
        for k, v in values.items():
            if v.numel() == 1 and torch.isfinite(v).all():
                total, count = self._window.get(k, (0.0, 0))
                self._window[k] = (total + float(v.detach()), count + 1)

    def due(self, at_step_boundary: bool, optimizer_step: int) -> bool:
        """Whether a log line is written now: the end of every ``log_every``-th optimizer step."""
        return at_step_boundary and optimizer_step % self.every == 0

    def collect(self, facts: StepFacts) -> dict[str, float]:
        """The metrics of the log line; empties the window and restarts the clock."""
        now = time.perf_counter()
        metrics = {f"train/{k}": total / count for k, (total, count) in self._window.items()}
        self._window = {}
        metrics.update({f"train/weight_{k}": float(v) for k, v in facts.weights.items()})
        metrics["train/phase"] = float(PHASES.index(facts.phase))
        metrics["train/optimizer_step"] = float(facts.optimizer_step)
        metrics["train/skipped_steps"] = float(facts.skipped_steps)
        if facts.skipped_samples is not None:
            metrics["train/skipped_samples"] = float(sum(facts.skipped_samples.values()))
            metrics.update({f"train/skipped_samples_{reason}": float(n)
                            for reason, n in facts.skipped_samples.items()})
        metrics.update(self._throughput(facts, now))
        metrics.update({f"train/grad_norm_{name}": norm for name, norm in facts.grad_norms.items()})
        metrics.update({f"train/lr_{name}": lr for name, lr in facts.learning_rates.items()})
        if facts.gpu_mem_gb is not None:
            metrics["train/gpu_mem_gb"] = facts.gpu_mem_gb
        self._t_last = now
        return metrics

    def _throughput(self, facts: StepFacts, now: float) -> dict[str, float]:
        clips = facts.clips_per_micro_batch * self.accumulate * self.every * facts.world_size
        per_s = clips / max(now - self._t_last, 1e-9)
        return {"train/clips_per_s": per_s, "train/clips_per_s_per_device": per_s / facts.world_size}

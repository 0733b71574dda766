"""A training probe: each phase's objective on a fixed batch, when the phase starts and when it ends.

The per-step training loss of a video SR model is dominated by how hard each clip is, so it is a
noisy view of progress. Evaluating the same batch with the same loss weights and the same CSD draws
before and after a phase shows whether that phase's training reduced its own objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from dlightning.training.schedule import PhaseSpec, phase_at
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

@dataclass
class PhaseRecord:
    """Objective of one phase on its probe batch."""

    phase: str
    first_step: int
    last_step: int
    start: float
    end: float


class PhaseProbe(L.Callback):
    """Records :class:`PhaseRecord` for every phase run; logs ``probe/*`` metrics on rank 0."""

    def __init__(self) -> None:
        self.records: list[PhaseRecord] = []
        self._batch: dict[str, Any] | None = None
        self._spec: PhaseSpec | None = None
        self._first_step = 0
        self._start = 0.0

    @staticmethod
    def evaluate(module: Any, batch: dict[str, Any], spec: PhaseSpec) -> float:
        """The phase's weighted regression objective (L2, LPIPS, temporal) on ``batch``.

        CSD is left out: its value mean(g^2) is not what its gradient descends (the gradient is a
        score direction from the teacher), so it does not measure progress.
        """
        weights = {k: v for k, v in spec.weights.items() if k != "csd"}
        probe_spec = PhaseSpec(phase=spec.phase, weights={**weights, "csd": 0.0}, segment=spec.segment,
                               progress=spec.progress)
        with torch.no_grad():
            losses = module.compute_losses(batch, probe_spec)
        return float(sum(weights[k] * float(losses[f"loss_{k}"]) for k in weights))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.micro_step % pl_module.optim_cfg.accumulate:
            return  # only at the first micro-batch of an optimizer step
        spec = phase_at(pl_module.optimizer_step, pl_module.schedule_cfg)
        if self._spec is not None and spec.phase == self._spec.phase:
            return
        self._finish(trainer, pl_module, pl_module.optimizer_step - 1)
        self._batch, self._spec, self._first_step = batch, spec, pl_module.optimizer_step
        self._start = self.evaluate(pl_module, batch, spec)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._finish(trainer, pl_module, pl_module.optimizer_step - 1)

    def _finish(self, trainer: L.Trainer, pl_module: Any, last_step: int) -> None:
        if self._spec is None or self._batch is None:
            return
        end = self.evaluate(pl_module, self._batch, self._spec)
        record = PhaseRecord(self._spec.phase, self._first_step, last_step, self._start, end)
        self.records.append(record)
        log.info("phase %s (steps %d-%d): objective on its probe batch %.4f -> %.4f", record.phase,
                 record.first_step, record.last_step, record.start, record.end)
        if trainer.is_global_zero:
            index = len(self.records)
            for logger in trainer.loggers:
                logger.log_metrics({f"probe/phase{index}_{record.phase}_start": record.start,
                                    f"probe/phase{index}_{record.phase}_end": record.end}, step=last_step + 1)
        self._batch = self._spec = None

"""A Lightning logger that records when each training step's metrics were logged (for signal tests)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger


class StepClock(Logger):
    """Appends ``<step> <unix time>`` to ``path`` for every ``log_metrics`` call that carries ``train/loss``.

    Listed after another logger in ``logging.backend``, the time is taken after that logger got the row.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "step_clock"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing to record."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record the step and the time, flushed at once (the test reads the file while training runs)."""
        if "train/loss" in metrics:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(f"{step} {time.time()}\n")


def read_clock(path: Path) -> list[tuple[int, float]]:
    """The ``(step, time)`` rows written so far."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    return [(int(step), float(when)) for step, when in rows if step and when]

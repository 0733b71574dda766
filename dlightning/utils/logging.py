"""Rank-aware logging: one logger per module, printing on global rank 0 unless asked otherwise."""

from __future__ import annotations

import logging
import os

_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


def global_rank() -> int:
    """Global rank from the environment variables set by torchrun, SLURM or Lightning (0 when single-process)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and value.isdigit():
            return int(value)
    return 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or global_rank() == 0


def get_logger(name: str) -> logging.Logger:
    """Return a logger that prints on rank 0 only; pass ``extra={"all_ranks": True}`` to print everywhere."""
    logger = logging.getLogger(name)
    root = logging.getLogger("dlightning")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("DLIGHTNING_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger

"""Validation media (side-by-side videos, temporal profiles, per-clip metrics) to whichever loggers can show them.

W&B gets the videos, the profile images and a table of per-clip metrics, through the logger's own
``log_metrics`` (so a lost W&B service stops the logging, not the training, and the media sit on the
optimizer-step axis like every metric). TensorBoard gets the profile images (``add_image``); its video
support needs moviepy, which the project does not depend on, so the videos stay files in the run folder.
Other loggers (CSV, ...) get nothing here: the files are in ``<run_dir>/validation/step-N/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from dlightning.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class ClipMedia:
    """The files one validation clip produced."""

    name: str
    video: Path
    """Side-by-side MP4 (LQ bicubic | output | GT)."""
    profile: Path
    """Temporal-profile PNG."""


def log_validation_media(loggers: Sequence[Logger], step: int, clips: Sequence[ClipMedia],
                         per_clip: Sequence[tuple[str, dict[str, float]]] = ()) -> None:
    """Send one validation's media to every logger that shows media, at optimizer step ``step``.

    Args:
        loggers: the trainer's loggers (any mix; those without media support are skipped).
        step: the optimizer step of the validation.
        clips: the written files of each clip.
        per_clip: ``(clip name, its metrics)`` rows for the W&B table.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _to_wandb(logger, step, clips, per_clip)
        elif isinstance(logger, TensorBoardLogger):
            _to_tensorboard(logger, step, clips)


def _to_wandb(logger: WandbLogger, step: int, clips: Sequence[ClipMedia],
              per_clip: Sequence[tuple[str, dict[str, float]]]) -> None:
    import wandb

    payload: dict[str, Any] = {}
    for clip in clips:
        payload[f"val/video/{clip.name}"] = wandb.Video(str(clip.video), format="mp4")
        payload[f"val/profile/{clip.name}"] = wandb.Image(str(clip.profile))
    if per_clip:
        columns = sorted({k for _, metrics in per_clip for k in metrics})
        rows = [[name, *(metrics.get(k) for k in columns)] for name, metrics in per_clip]
        payload["val/clips"] = wandb.Table(columns=["clip", *columns], data=rows)
    if payload:
        logger.log_metrics(payload, step=step)


def _to_tensorboard(logger: TensorBoardLogger, step: int, clips: Sequence[ClipMedia]) -> None:
    for clip in clips:
        image = cv2.imread(str(clip.profile), cv2.IMREAD_COLOR)
        if image is None:
            log.warning("validation step %d: cannot read %s; not sent to TensorBoard", step, clip.profile)
            continue
        logger.experiment.add_image(f"val/profile/{clip.name}", cv2.cvtColor(image, cv2.COLOR_BGR2RGB),
                                    global_step=step, dataformats="HWC")

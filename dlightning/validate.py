"""Composition root of ``dlightning validate``: the validation callback's work, once, on a checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from dlightning.config import load_config
from dlightning.contracts.checkpoint_format import read_training_checkpoint
from dlightning.models.restore import restore_generator
from dlightning.training.validation import VideoValidation, load_clips
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

_FOLDER_KEYS = ("validation.lq_dir", "validation.gt_dir")


def with_data_source(overrides: Sequence[str]) -> list[str]:
    """Command-line data-source overrides replace the config file's source instead of clashing with it.

    A training config usually names ``validation.shards``; ``validation.lq_dir=... validation.gt_dir=...`` on
    the command line would otherwise fail ValidationConfig's "either folders or shards" check (and the
    other way round), so the source the user did not name is cleared first.
    """
    keys = {item.partition("=")[0].strip() for item in overrides}
    cleared = []
    if keys & set(_FOLDER_KEYS) and "validation.shards" not in keys:
        cleared.append("validation.shards=null")
    if "validation.shards" in keys and not keys & set(_FOLDER_KEYS):
        cleared += [f"{k}=null" for k in _FOLDER_KEYS]
    return cleared + list(overrides)


def validate_checkpoint(config_files: Sequence[str], overrides: Sequence[str], checkpoint: str, *,
                        out: str | None = None, lq_dir: str | None = None, gt_dir: str | None = None,
                        ) -> dict[str, float]:
    """Build the generator of ``checkpoint`` and run the validation once.

    The model section comes from ``config_files`` + ``overrides`` when config files are given, else from
    the config stored in the checkpoint. Data given on the command line (``lq_dir``/``gt_dir`` or
    ``validation.*`` overrides) replaces the config file's validation data source.

    Returns:
        The ``val/*`` metrics.

    Raises:
        ConfigError: No (or an inconsistent) validation data source.
        MissingWeightsError: ``checkpoint`` is missing or not a dlightning training checkpoint.
    """
    root = load_config(config_files, with_data_source(overrides))
    cfg = root.validation
    if lq_dir or gt_dir:
        cfg = dataclasses.replace(cfg, lq_dir=lq_dir or cfg.lq_dir, gt_dir=gt_dir or cfg.gt_dir, shards=None)
    clips = load_clips(cfg)  # before the (slow) model build, so a bad data source fails at once
    if not config_files:
        log.info("validate: no --config given; using the model section stored in %s", checkpoint)
    ckpt = read_training_checkpoint(checkpoint)
    gen = restore_generator(ckpt, root.model if config_files else None, weights=cfg.weights)
    if out:
        run_dir = Path(out)
    elif config_files:
        run_dir = Path(root.trainer.run_dir)
    else:
        run_dir = Path(ckpt.config.get("trainer", {}).get("run_dir") or ckpt.path.parent)
    metrics = VideoValidation(cfg, run_dir, clips=clips).validate(gen, ckpt.optimizer_step)
    log.info("validate: wrote %s", run_dir / "validation" / f"step-{ckpt.optimizer_step:08d}")
    return metrics

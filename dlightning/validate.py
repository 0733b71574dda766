"""Composition root of ``dlightning validate``: the validation callback's work, once, on a checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from dlightning.config import load_config
from dlightning.contracts import export_format
from dlightning.contracts.checkpoint_format import read_training_checkpoint
from dlightning.errors import ConfigError
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
    the config stored in the checkpoint. ``checkpoint`` may also be a merged export folder: its own model
    runs, and the outputs go to ``out`` (or the config's ``trainer.run_dir``). Data given on the command line
    (``lq_dir``/``gt_dir`` or ``validation.*`` overrides) replaces the config file's validation data source.

    Returns:
        The ``val/*`` metrics.

    Raises:
        ConfigError: No (or an inconsistent) validation data source; an export without ``out`` or a config.
        MissingWeightsError: ``checkpoint`` is missing or not a dlightning training checkpoint.
    """
    root = load_config(config_files, with_data_source(overrides))
    cfg = root.validation
    if lq_dir or gt_dir:
        cfg = dataclasses.replace(cfg, lq_dir=lq_dir or cfg.lq_dir, gt_dir=gt_dir or cfg.gt_dir, shards=None)
    exported = export_format.is_export(checkpoint)
    if exported and not (out or config_files):
        raise ConfigError(f"validate of the export {checkpoint} needs --out DIR (or --config naming "
                          "trainer.run_dir): an export folder holds the export only")
    clips = load_clips(cfg)  # before the (slow) model build, so a bad data source fails at once
    if exported:
        return _validate_export(checkpoint, VideoValidation(cfg, Path(out or root.trainer.run_dir), clips=clips))
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


def _validate_export(folder: str, validation: VideoValidation) -> dict[str, float]:
    """Validate a merged export (its own model section); the output folder is named by the step it came from."""
    from dlightning.inference.exported import load_exported

    gen = load_exported(folder)
    step = int(gen.meta.get("optimizer_step") or 0)
    metrics = validation.validate(gen, step)
    log.info("validate: wrote %s", validation.run_dir / "validation" / f"step-{step:08d}")
    return metrics

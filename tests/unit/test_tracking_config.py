"""The ``logging`` section: one logger or a list (names and ``class_path`` entries), checked when the config loads."""

from __future__ import annotations

import pytest

from dlightning.config import load_config
from dlightning.errors import ConfigError


@pytest.mark.parametrize(("override", "expected"), [
    ("logging.backend=csv", ["csv"]),
    ("logging.backend=none", []),
    ("logging.backend=[wandb, csv, tensorboard]", ["wandb", "csv", "tensorboard"]),
    ("logging.backend=[tensorboard, {class_path: lightning.pytorch.loggers.CSVLogger}]",
     ["tensorboard", {"class_path": "lightning.pytorch.loggers.CSVLogger"}]),
])
def test_backend_is_one_logger_or_a_list(override: str, expected: list) -> None:
    assert load_config([], [override]).logging.backends == expected


def test_wandb_run_settings_load() -> None:
    cfg = load_config([], ["logging.wandb_tags=[a, b]", "logging.wandb_group=g", "logging.wandb_notes=n",
                           "logging.wandb_job_type=train", "logging.wandb_log_model=all"]).logging
    assert (cfg.wandb_tags, cfg.wandb_group, cfg.wandb_notes, cfg.wandb_job_type, cfg.wandb_log_model) == (
        ["a", "b"], "g", "n", "train", "all")


@pytest.mark.parametrize(("override", "message"), [
    ("logging.backend=mlflow", "choose one of"),
    ("logging.backend=[csv, csv]", "names a logger twice"),
    ("logging.backend=[none, csv]", "mixes none with loggers"),
    ("logging.backend=[{path: x}]", "neither a logger name"),
    ("logging.backend=[{class_path: lightning.pytorch.loggers.NoSuchLogger}]", "cannot be imported"),
    ("logging.backend=[{class_path: lightning.pytorch.callbacks.EarlyStopping}]", "is not a lightning.pytorch Logger"),
    ("logging.wandb_log_model=sometimes", "must be false, true or all"),
    ("logging.wandb_mode=maybe", "choose one of"),
])
def test_bad_logging_values_are_refused_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])

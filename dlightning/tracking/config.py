"""The ``logging`` config section: experiment tracking through Lightning's loggers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlightning.contracts.config_io import check_choice, import_class_path
from dlightning.contracts.run_layout import BACKENDS
from dlightning.errors import ConfigError

WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class LoggingConfig:
    """Experiment tracking through Lightning's loggers."""

    backend: Any = "csv"
    """One of wandb | tensorboard | csv | none, or a list of loggers: names and LightningCLI-style
    ``{class_path: ..., init_args: {...}}`` entries, e.g. ``[wandb, csv, tensorboard]``. Every logger
    gets every metric; each writes under ``<run_dir>/logs/<name>/``."""
    wandb_mode: str = "auto"
    """auto (online when W&B finds credentials: WANDB_API_KEY, a netrc entry for its host, or a W&B
    settings file; offline otherwise) | online | offline | disabled. A WANDB_MODE environment variable
    wins over this."""
    project: str = "dlightning"
    entity: str | None = None
    run_name: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    wandb_group: str | None = None
    """W&B run group (e.g. one sweep or one ablation)."""
    wandb_notes: str | None = None
    """W&B run notes (a longer description)."""
    wandb_job_type: str | None = None
    """W&B job type, e.g. ``train``."""
    wandb_log_model: Any = False
    """Log the checkpoints of the ``ModelCheckpoint`` callbacks in ``trainer.callbacks`` as W&B model
    artifacts (Lightning's ``log_model``): false | true (at the end of fit) | all (as they are saved).
    Offline runs keep them for ``wandb sync``."""

    def __post_init__(self) -> None:
        check_choice("logging", "wandb_mode", self.wandb_mode, WANDB_MODES)
        if self.wandb_log_model not in (False, True, "all"):
            raise ConfigError(f"logging.wandb_log_model={self.wandb_log_model!r} must be false, true or all")
        specs = self._entries()
        names = [s for s in specs if isinstance(s, str)]
        if "none" in names and len(specs) > 1:
            raise ConfigError(f"logging.backend={list(specs)} mixes none with loggers; give none alone, or drop it")
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                check_choice("logging", f"backend.{i}" if len(specs) > 1 else "backend", spec, (*BACKENDS, "none"))
            elif not (isinstance(spec, dict) and isinstance(spec.get("class_path"), str)
                      and set(spec) <= {"class_path", "init_args"}
                      and isinstance(spec.get("init_args") or {}, dict)):
                raise ConfigError(f"logging.backend.{i}={spec!r} is neither a logger name {BACKENDS} nor "
                                  "{class_path: <module.Class>, init_args: {...}}")
            else:
                logger_class(spec, i)  # a bad class_path fails when the config loads, before anything is built
        if len(set(names)) != len(names):
            raise ConfigError(f"logging.backend={names} names a logger twice; list each once")

    @property
    def backends(self) -> list[str | dict[str, Any]]:
        """``backend`` as a list of entries (names or ``{class_path, init_args}``); empty for ``none``."""
        return [s for s in self._entries() if s != "none"]

    def _entries(self) -> list[Any]:
        value = self.backend
        if isinstance(value, str | dict):
            return [value]
        if isinstance(value, list | tuple):
            return list(value)
        raise ConfigError(f"logging.backend={value!r} must be a logger name or a list of loggers")


def logger_class(spec: dict[str, Any], index: int) -> type:
    """The Lightning Logger class named by a ``{class_path, init_args}`` entry of ``logging.backend``.

    Raises:
        ConfigError: the class cannot be imported or is not a ``lightning.pytorch`` Logger.
    """
    from lightning.pytorch.loggers import Logger

    return import_class_path(spec, f"logging.backend.{index}", Logger, "lightning.pytorch Logger",
                             "lightning.pytorch.loggers.MLFlowLogger")

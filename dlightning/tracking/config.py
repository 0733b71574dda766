"""The ``logging`` config section: experiment tracking through Lightning's loggers."""

from __future__ import annotations

from dataclasses import dataclass

from dlightning.contracts.config_io import check_choice


@dataclass
class LoggingConfig:
    """Experiment tracking through Lightning's loggers."""

    backend: str = "csv"
    """wandb | tensorboard | csv | none."""
    wandb_mode: str = "auto"
    """auto (online when WANDB_API_KEY is set, else offline) | online | offline | disabled."""
    project: str = "dlightning"
    entity: str | None = None
    run_name: str | None = None

    def __post_init__(self) -> None:
        check_choice("logging", "backend", self.backend, ("wandb", "tensorboard", "csv", "none"))
        check_choice("logging", "wandb_mode", self.wandb_mode, ("auto", "online", "offline", "disabled"))

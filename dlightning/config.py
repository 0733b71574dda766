"""Typed configuration: dataclass schema, OmegaConf merge of defaults, YAML files and overrides.

``load_config(["a.yaml", "b.yaml"], ["optim.lr=1e-4"])`` returns a ``RootConfig`` of real
dataclasses. Unknown or misspelt keys fail before anything heavy starts, with an error that names
the key and the closest valid one. Each component receives only its own section.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlightning.data.config import DataConfig
from dlightning.errors import ConfigError
from dlightning.inference.config import ValidationConfig
from dlightning.launch_config import LaunchConfig
from dlightning.losses.config import LossConfig
from dlightning.models.config import ModelConfig, check_choice
from dlightning.training.config import (
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    check_deepspeed_precision,
    global_clip_norm,
    resolve_grad_sync,
)


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


@dataclass
class RootConfig:
    """The whole run. Sections map one-to-one to the components that consume them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.trainer.strategy.startswith("deepspeed"):
            # ZeRO-2 partitions gradients: DDP-style no_sync accumulation and per-group gradient dropping
            # are not available there (INTEGRATION.md C1).
            if self.optim.accumulate != 1:
                raise ConfigError("optim.accumulate must be 1 under trainer.strategy=deepspeed_*: raise "
                                  "data.batch_size instead, or use trainer.strategy=ddp")
            if self.optim.mask_mode == "drop_grad":
                raise ConfigError("optim.mask_mode=drop_grad cannot work under DeepSpeed ZeRO (gradients are "
                                  "partitioned); use auto or zero_lr")
            check_deepspeed_precision(self.trainer.precision)
            global_clip_norm(self.optim.clip_norm)
        resolve_grad_sync(self.trainer, self.optim)
        if self.data.scale != self.model.scale:
            raise ConfigError(
                f"data.scale={self.data.scale} differs from model.scale={self.model.scale}; set both to "
                "the super-resolution factor of your shards"
            )


def _dataclass_field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _element_dataclass(annotation: Any) -> type | None:
    """The dataclass held by ``list[SomeDataclass]`` / ``SomeDataclass | None`` annotations, if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _element_dataclass(arg)
        if found is not None:
            return found
    return None


def _is_mapping_annotation(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def check_keys(user: Any, cls: type, prefix: str = "") -> None:
    """Raise ConfigError for the first key in ``user`` (a plain dict) that ``cls`` does not define."""
    if not isinstance(user, dict):
        return
    types = _dataclass_field_types(cls)
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint} Valid keys here: {sorted(types)}")
        annotation = types[key]
        if _is_mapping_annotation(annotation):
            continue
        sub = _element_dataclass(annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                check_keys(item, sub, f"{path}[{i}].")
        else:
            check_keys(value, sub, f"{path}.")


def _load_yaml(path: str | Path) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist; pass an existing YAML with --config")
    loaded = OmegaConf.load(file)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {file} must hold a mapping at the top level")
    return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]


def _parse_overrides(overrides: Sequence[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=1e-4")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)  # type: ignore
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from err


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), cls: type = RootConfig):
    """Merge the schema defaults, YAML ``files`` (in order) and ``key=value`` overrides.

    Args:
        files: YAML files; later files override earlier ones.
        overrides: dot-list overrides such as ``optim.lr=1e-4``.
        cls: the schema dataclass (``RootConfig`` by default).

    Returns:
        An instance of ``cls`` with every section validated.

    Raises:
        ConfigError: unknown keys (with the closest valid key), wrong types or invalid values.
    """
    layers = [_load_yaml(f) for f in files] + [_parse_overrides(overrides)]
    for layer in layers:
        check_keys(layer, cls)
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {err}") from err


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (written next to every checkpoint and into the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: Any) -> dict:
    """The resolved config as plain Python types (safe for ``torch.load(weights_only=True)``)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_container(data: dict, cls: type = RootConfig):
    """Rebuild a config dataclass from ``to_container`` output (e.g. read back from a checkpoint)."""
    check_keys(data, cls)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


__all__ = ["RootConfig", "LoggingConfig", "load_config", "to_yaml", "to_container", "from_container",
           "check_keys"]

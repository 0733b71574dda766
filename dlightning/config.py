"""The whole run's configuration: ``RootConfig`` composes every component's section.

This module sits at the top of the package with the other composition roots: it imports each
component's config section, and nothing below it imports it. Loading goes through the project's one
loader and override grammar (:mod:`dlightning.contracts.config_io`), so
``load_config(["a.yaml", "b.yaml"], ["data.sources.0.path=/data/reds"])`` returns a ``RootConfig``
of real dataclasses, and an unknown key fails with the closest valid one. Settings derived from
several sections (the mask mode, the gradient sync, the DeepSpeed limits) are resolved here, once,
when the config loads; every component reads the resolved values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dlightning.contracts import config_io
from dlightning.data.config import DataConfig
from dlightning.errors import ConfigError
from dlightning.inference.config import ValidationConfig
from dlightning.launch.config import LaunchConfig
from dlightning.losses.config import LossConfig
from dlightning.models.config import ModelConfig
from dlightning.tracking.config import LoggingConfig
from dlightning.training.config import (
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    check_deepspeed_limits,
    resolve_grad_sync,
    resolve_mask_mode,
)


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
        check_deepspeed_limits(self.trainer, self.optim)
        # Resolved in place: the run folder's config.yaml and the checkpoint record what ran.
        self.optim.mask_mode = resolve_mask_mode(self.optim.mask_mode, self.trainer.strategy)
        self.trainer.grad_sync = resolve_grad_sync(self.trainer, self.optim)
        if self.validation.weights == "ema" and self.validation.every_n_steps > 0 and not self.optim.ema.enabled:
            raise ConfigError("validation.weights=ema validates the moving average, but optim.ema.enabled=false; "
                              "enable optim.ema or set validation.weights=raw")
        if self.data.scale != self.model.scale:
            raise ConfigError(
                f"data.scale={self.data.scale} differs from model.scale={self.model.scale}; set both to "
                "the super-resolution factor of your shards"
            )


def _path_problem(key: str, value: str | None, what: str, *, folder: bool = False) -> str | None:
    """A problem line when ``value`` names no existing file (or folder), else None."""
    if value is None:
        return None
    path = Path(value).expanduser()
    exists = path.is_dir() if folder else path.exists()
    return None if exists else f"{key}={value!r} does not exist; put {what} there"


def local_path_problems(cfg: RootConfig, *, validation: bool | None = None) -> list[str]:
    """Every local path the run needs that is unset or missing, as one line each (empty when all are there).

    Checked by ``dlightning config``, ``fit`` and ``submit`` before anything is built or written.

    Args:
        cfg: The resolved config.
        validation: Check the ``validation`` section's paths too (default: when validation runs
            during training, ``validation.every_n_steps > 0``).
    """
    if validation is None:
        validation = cfg.validation.every_n_steps > 0
    problems = []
    if cfg.model.preset == "sd21" and cfg.model.pretrained_path is None:
        problems.append("model.pretrained_path is not set; model.preset=sd21 needs a local stable-diffusion-2-1-base "
                        "folder (diffusers layout)")
    if cfg.loss.lpips.backbone_path is None and not cfg.loss.lpips.allow_random_backbone:
        problems.append("loss.lpips.backbone_path is not set; put the torchvision VGG-16 ImageNet weights "
                        "(vgg16-397923af.pth) there, or set loss.lpips.allow_random_backbone=true for a toy run")
    checks = [
        ("model.pretrained_path", cfg.model.pretrained_path, "a stable-diffusion-2-1-base folder", True),
        ("model.cfr.spynet_path", cfg.model.cfr.spynet_path, "the SPyNet weights (BasicVSR layout)", False),
        ("loss.lpips.backbone_path", cfg.loss.lpips.backbone_path, "the torchvision VGG-16 weights", False),
        ("loss.temporal.flow_path", cfg.loss.temporal.flow_path, "the SPyNet weights of the flow net", False),
        ("validation.flow_path", cfg.validation.flow_path, "the SPyNet weights for E*warp", False),
        ("validation.lpips.backbone_path", cfg.validation.lpips.backbone_path, "the torchvision VGG-16 weights",
         False),
        ("validation.shards", cfg.validation.shards, "a shard set (dlightning shards build)", True),
        ("validation.lq_dir", cfg.validation.lq_dir, "a folder of LQ videos or frame folders", True),
        ("validation.gt_dir", cfg.validation.gt_dir, "a folder of GT videos or frame folders", True),
    ]
    if not validation:
        checks = [c for c in checks if not c[0].startswith("validation.")]
    if cfg.data.backend == "shards":
        checks += [(f"data.sources.{i}.path", src.path, "a shard set (dlightning shards build)", True)
                   for i, src in enumerate(cfg.data.sources)]
    if cfg.model.preset != "sd21":
        checks = checks[1:]  # the tiny and meta presets read no base folder
    problems += [p for key, value, what, folder in checks if (p := _path_problem(key, value, what, folder=folder))]
    return problems


def check_local_paths(cfg: RootConfig, *, validation: bool | None = None) -> None:
    """Raise one ConfigError listing every missing local path of :func:`local_path_problems`."""
    problems = local_path_problems(cfg, validation=validation)
    if problems:
        raise ConfigError("missing local files:\n  " + "\n  ".join(problems))


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RootConfig:
    """Merge the defaults, YAML ``files`` (in order) and ``key=value`` overrides into a RootConfig.

    Raises:
        ConfigError: Unknown keys (with the closest valid key), wrong types or invalid values.
    """
    return config_io.load_config(files, overrides, cls=RootConfig)


def to_yaml(cfg: RootConfig) -> str:
    """The resolved config as YAML (written into the run folder)."""
    return config_io.to_yaml(cfg)


def to_container(cfg: RootConfig) -> dict:
    """The resolved config as plain Python types (stored in every checkpoint)."""
    return config_io.to_container(cfg)


def from_container(data: dict) -> RootConfig:
    """Rebuild a RootConfig from :func:`to_container` output (e.g. read back from a checkpoint)."""
    return config_io.from_container(data, RootConfig)

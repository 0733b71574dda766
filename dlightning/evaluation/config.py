"""The ``evaluate`` config section (``dlightning evaluate --config F evaluate.key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlightning.contracts.config_io import check_choice, check_range
from dlightning.errors import ConfigError
from dlightning.inference.config import UpscaleConfig
from dlightning.metrics.flows import RAFT_SIZES
from dlightning.metrics.weights import MetricWeights
from dlightning.tracking.config import LoggingConfig

DEFAULT_METRICS = ["psnr", "ssim", "lpips"]


@dataclass
class EvaluateConfig:
    """What ``dlightning evaluate`` measures and how."""

    protocol: str | None = None
    """A named benchmark protocol (videolq | reds4 | udm10 | spmcs | youhq40) that fixes metrics, crop,
    frame count, colour space and colour fix; explicit keys below win over it."""
    metrics: list[str] | None = None
    """Metric names (docs/EVALUATION.md); None = the protocol's, or psnr, ssim, lpips."""
    crop_border: int | None = None
    """Pixels removed from each side before the per-frame metrics; None = the protocol's (0)."""
    max_frames: int | None = None
    """Frames per clip from the start (0 = all); None = the protocol's (0)."""
    color_fix: str | None = None
    """Colour fix of the upscaling (adain | wavelet | none); None = the protocol's, else the model's."""
    weights: MetricWeights = field(default_factory=MetricWeights)
    """Local weight file of each metric network (nothing is downloaded)."""
    lpips_net: str = "vgg"
    raft_size: str = "large"
    device: str = "auto"
    """Where the metric networks run (auto = cuda when available)."""
    batch_frames: int = 8
    """Frames per metric network call."""
    wandb: bool = True
    """Log the per-video and mean tables to W&B (mode from logging.wandb_mode; offline without credentials)."""

    def __post_init__(self) -> None:
        check_choice("evaluate", "lpips_net", self.lpips_net, ("vgg", "alex"))
        check_choice("evaluate", "raft_size", self.raft_size, RAFT_SIZES)
        if self.color_fix is not None:
            check_choice("evaluate", "color_fix", self.color_fix, ("adain", "wavelet", "none"))
        for key in ("crop_border", "max_frames"):
            value = getattr(self, key)
            if value is not None:
                check_range("evaluate", key, value, low=0)
        if self.batch_frames < 1:
            raise ConfigError("evaluate.batch_frames must be >= 1")
        if self.metrics is not None and not isinstance(self.metrics, list):
            raise ConfigError(f"evaluate.metrics={self.metrics!r} must be a list, e.g. evaluate.metrics=[psnr,ssim]")


@dataclass
class EvaluateRoot:
    """The whole config of ``dlightning evaluate``: what to measure, how to upscale, where to log."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    """Inference settings when a model is evaluated."""
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(backend="wandb", project="dlightning-eval"))

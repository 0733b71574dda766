"""Config sections of the training losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlightning.contracts.config_io import check_choice, check_range
from dlightning.errors import ConfigError

NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, "
    "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth"
)


@dataclass
class LPIPSConfig:
    net: str = "vgg"
    backbone_path: str | None = None
    """Local torchvision VGG-16 (or AlexNet) ImageNet weights; None = random backbone (tests only)."""
    allow_random_backbone: bool = False
    """Must be true to train with a random backbone (tests / demo); guards against silent misuse."""

    def __post_init__(self) -> None:
        check_choice("loss.lpips", "net", self.net, ("vgg", "alex"))


@dataclass
class CSDConfig:
    t_min: int = 20
    t_max: int = 500
    """Timesteps drawn in [t_min, t_max) (parity: 20, 500)."""
    guidance_scale: float = 7.5
    shared_noise: bool = True
    """One noise draw shared by the frames of a clip (parity)."""
    negative_prompt: str = NEGATIVE_PROMPT

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise ConfigError(f"loss.csd.t_min={self.t_min} / loss.csd.t_max={self.t_max} must satisfy "
                              "0 <= t_min < t_max <= 1000 (the teacher's timesteps are drawn in [t_min, t_max))")
        check_range("loss.csd", "guidance_scale", self.guidance_scale, low=0)


@dataclass
class TemporalConfig:
    mode: str = "warp"
    """warp: differentiable flow-warping loss with occlusion mask; none: off. The reference's
    zero-gradient Farneback term is always only a logged metric."""
    flow_net: str = "spynet"
    """Flow of the ground-truth pair: spynet (frozen, weights from flow_path) or farneback (OpenCV, no
    weights needed; CPU)."""
    flow_path: str | None = None
    """Local SPyNet weights for the frozen flow net; None = random init (tests only)."""
    log_farneback: bool = True

    def __post_init__(self) -> None:
        check_choice("loss.temporal", "mode", self.mode, ("warp", "none"))
        check_choice("loss.temporal", "flow_net", self.flow_net, ("spynet", "farneback"))


@dataclass
class LossConfig:
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    csd: CSDConfig = field(default_factory=CSDConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)

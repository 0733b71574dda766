"""Typed configuration of the offline shard builder (``python -m data_prep``).

Loaded the lingua way: ``OmegaConf.structured(DataPrepConfig)`` merged with a YAML file and
``key=value`` overrides, in struct mode (unknown keys are errors), then converted back to
dataclasses. Self-contained so the lead can hook it into the main loader later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlightning.data.camera_path import INTERPOLATIONS, CameraPathConfig
from dlightning.data.captions import CaptionConfig
from dlightning.data.degradation import PRESETS
from dlightning.data.sources import CROP_MODES, DEMO_IMAGES, REDS4
from dlightning.errors import ConfigError

SOURCE_KINDS = ("frames", "video", "images", "demo")


@dataclass
class SourceSpec:
    """One input collection."""

    kind: str = "frames"
    """frames: ``<root>/<clip>/<frame>.png|jpg`` (REDS); video: video files under root (PyAV);
    images: image files under root (LSDIR) -> camera-path pseudo-videos; demo: bundled skimage photographs."""
    root: str = ""
    name: str = ""
    """Source name used in sample keys and meta (default: the kind)."""
    exclude: list[str] = field(default_factory=lambda: list(REDS4))
    """Clip folder names / video stems to leave out (default REDS4: 000, 011, 015, 020)."""
    frame_stride: int = 1
    """Temporal step between the frames of one window (Pexels in DLoRAL: 10)."""
    window_step: int = 0
    """Frames between window starts; 0 = non-overlapping windows."""
    crop: str = "center"
    """center / random / resize_center / none (full frame trimmed to a multiple of scale); video sources."""
    clips_per_image: int = 1
    """Pseudo-videos rendered per image (images source)."""
    fps: float = 24.0
    """fps recorded for frame folders and pseudo-videos (video files record their own)."""
    max_clips: int = 0
    """Keep only the first N clips of this source (0 = all)."""
    preset: str = ""
    """Degradation preset for this source ('' = degradation.preset)."""
    images: list[str] = field(default_factory=lambda: list(DEMO_IMAGES))
    """demo: the skimage.data photographs to use."""
    demo_kinds: list[str] = field(default_factory=lambda: ["image", "video"])
    """demo: which clips to make per photograph: image (camera path) and/or video (pan/zoom)."""


@dataclass
class DegradationSelect:
    """Which degradation recipe to apply."""

    preset: str = "video"
    """realesrgan / dloral_mild / video (realesrgan + codec on the clip as one sequence)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested overrides of the preset's fields, e.g. ``{codec: {prob: 0.5}, stage1: {jpeg_range: [40, 95]}}``
    (applied to every preset used by the build)."""
    usm_gt: bool = False
    """Unsharp-mask the HR frames first; the sharpened HR is stored and degraded (Real-ESRGAN's gt_usm)."""


@dataclass
class ShardConfig:
    """Shard sizing and encoding."""

    samples_per_shard: int = 64
    max_shard_bytes: int = 500_000_000
    """Upper bound on a shard's uncompressed frame bytes; shards are planned before any work (for
    exact resume), so this caps the *raw* HR+LQ pixels, and PNG makes the real tar smaller."""
    png_compression: int = 1
    """OpenCV PNG level 0-9 (1: fast, still lossless)."""
    mtime: int = 0
    """mtime of every tar member, so rebuilt shards are byte-identical."""


@dataclass
class DataPrepConfig:
    """The whole ``data_prep build`` run."""

    output_dir: str = ""
    name: str = "clips"
    """Shard file prefix: ``<name>-000000.tar``."""
    seed: int = 0
    """Build seed; clip i draws everything from SeedSequence([seed, i])."""
    scale: int = 4
    num_frames: int = 3
    hr_size: list[int] = field(default_factory=lambda: [512, 512])
    """HR crop [H, W]; both divisible by scale."""
    sources: list[SourceSpec] = field(default_factory=list)
    degradation: DegradationSelect = field(default_factory=DegradationSelect)
    camera: CameraPathConfig = field(default_factory=CameraPathConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    workers: int = 1
    """Processes building shards in parallel (1 = in this process)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: DataPrepConfig) -> None:
    """Collect every problem in ``cfg`` and raise one ConfigError listing them."""
    problems: list[str] = []
    if len(cfg.hr_size) != 2 or any(v <= 0 or v % cfg.scale for v in cfg.hr_size):
        problems.append(
            f"hr_size={list(cfg.hr_size)} must be [H, W], both positive multiples of scale={cfg.scale}"
        )
    if cfg.num_frames < 1:
        problems.append("num_frames must be >= 1")
    if cfg.degradation.preset not in PRESETS:
        problems.append(f"degradation.preset={cfg.degradation.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.camera.interpolation not in INTERPOLATIONS:
        problems.append(
            f"camera.interpolation={cfg.camera.interpolation!r}; choose one of {sorted(INTERPOLATIONS)}"
        )
    if cfg.shards.samples_per_shard < 1 or cfg.shards.max_shard_bytes < 1:
        problems.append("shards.samples_per_shard and shards.max_shard_bytes must be >= 1")
    if "." in cfg.name or "/" in cfg.name:
        problems.append(f"name={cfg.name!r} must not contain '.' or '/'")
    for i, src in enumerate(cfg.sources):
        if src.kind not in SOURCE_KINDS:
            problems.append(f"sources[{i}].kind={src.kind!r}; choose one of {list(SOURCE_KINDS)}")
        if src.kind != "demo" and not src.root:
            problems.append(f"sources[{i}].root is empty; set it to the {src.kind} folder")
        if src.crop not in CROP_MODES:
            problems.append(f"sources[{i}].crop={src.crop!r}; choose one of {list(CROP_MODES)}")
        if src.preset and src.preset not in PRESETS:
            problems.append(f"sources[{i}].preset={src.preset!r}; choose one of {sorted(PRESETS)} or ''")
        if src.frame_stride < 1:
            problems.append(f"sources[{i}].frame_stride must be >= 1")
    if problems:
        raise ConfigError("invalid data_prep config:\n  " + "\n  ".join(problems))


def load_prep_config(
    path: str | None = None, overrides: Sequence[str] = (), *, base: DataPrepConfig | None = None
) -> DataPrepConfig:
    """Merge defaults (or ``base``), an optional YAML file and ``key=value`` overrides into a DataPrepConfig.

    Raises:
        ConfigError: Unknown keys, wrong types or invalid values (the message names them).
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.structured(base if base is not None else DataPrepConfig())
        OmegaConf.set_struct(merged, True)
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path!r} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value")
            # update() (not merge of a dot-list) so that list items can be addressed: sources.0.root=...
            OmegaConf.update(merged, key, yaml.safe_load(value) if value else "", merge=True)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"data_prep config: {err}") from err


def config_to_dict(cfg: DataPrepConfig) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of the config (stored in the manifest)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def demo_config(output_dir: str) -> DataPrepConfig:
    """The offline demo build (mirrors ``configs/data_prep/demo.yaml``): skimage photographs,
    96x96 HR frames, scale 4, 5 frames, the ``video`` preset."""
    return DataPrepConfig(
        output_dir=output_dir,
        name="demo",
        hr_size=[96, 96],
        num_frames=5,
        scale=4,
        sources=[SourceSpec(kind="demo", name="demo")],
        shards=ShardConfig(samples_per_shard=4),
        workers=1,
    )

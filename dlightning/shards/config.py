"""Typed configuration of the offline shard builder (``dlightning shards``).

Loaded like every config of the project, through :func:`dlightning.contracts.config_io.load_config`:
the :class:`DataPrepConfig` dataclass, YAML files merged in order, then ``key=value`` overrides
(``sources.0.root=/data/REDS`` addresses list items; an unknown key names the closest valid one).

The degradation recipe is typed config too. ``degradation.preset`` names a preset and its values
are the defaults of the recipe keys beside it, which mirror
:class:`~dlightning.degradation.presets.DegradationPreset`::

    degradation.preset=dloral_mild degradation.stage1.jpeg_range=[40,95] degradation.codec.prob=0.5

Every recipe key is checked against the preset dataclasses (``degradation.stage1.jpg_range`` fails
with "did you mean 'degradation.stage1.jpeg_range'?"). A source with its own ``sources[i].preset``
starts from that preset, and the recipe keys changed from ``degradation.preset``'s values apply to
it as well (:meth:`DegradationSection.recipe`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlightning.contracts.config_io import check_choice, load_config, to_container
from dlightning.degradation.presets import (
    PRESETS,
    RECIPE_FIELDS,
    CodecPreset,
    DegradationPreset,
    StagePreset,
    check_codec,
    get_preset,
    recipe_overrides,
)
from dlightning.errors import ConfigError
from dlightning.shards.camera_path import INTERPOLATIONS, CameraPathConfig
from dlightning.shards.captions import CaptionConfig
from dlightning.shards.sources import CROP_MODES, DEMO_IMAGES, REDS4

SOURCE_KINDS = ("frames", "video", "images", "demo")
LQ_MODES = ("baked", "online")
"""``lq``: store degraded LQ frames, or HR frames only for the loader's online degradation."""


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
    """Degradation preset for this source ('' = degradation.preset); the recipe keys changed under
    ``degradation`` apply on top of it too."""
    images: list[str] = field(default_factory=lambda: list(DEMO_IMAGES))
    """demo: the skimage.data photographs to use."""
    demo_kinds: list[str] = field(default_factory=lambda: ["image", "video"])
    """demo: which clips to make per photograph: image (camera path) and/or video (pan/zoom)."""


@dataclass
class DegradationSection:
    """The build's degradation recipe: a named preset, and typed recipe keys that default to its values.

    The recipe keys (``stage1``, ``stage2``, ``final_sinc_prob``, ``final_omega_range``, ``codec``) are
    those of :class:`~dlightning.degradation.presets.DegradationPreset`; None (the default) takes the
    named preset's value, filled in when the section is built, so a loaded config holds every number.
    """

    preset: str = "video"
    """realesrgan / dloral_mild / video (realesrgan + codec on the clip as one sequence)."""
    usm_gt: bool = False
    """Unsharp-mask the HR frames first; the sharpened HR is stored and degraded (Real-ESRGAN's gt_usm)."""
    stage1: StagePreset | None = None
    stage2: StagePreset | None = None
    final_sinc_prob: float | None = None
    final_omega_range: list[float] | None = None
    codec: CodecPreset | None = None

    def __post_init__(self) -> None:
        check_choice("degradation", "preset", self.preset, sorted(PRESETS))
        named = get_preset(self.preset)
        for key in RECIPE_FIELDS:
            if getattr(self, key) is None:
                setattr(self, key, getattr(named, key))
        check_codec(self.codec, "degradation.codec")  # type: ignore[arg-type]

    def overrides(self) -> dict[str, Any]:
        """The recipe keys whose values differ from ``preset``'s, as nested overrides."""
        return recipe_overrides(self.recipe(), get_preset(self.preset))

    def recipe(self, name: str = "") -> DegradationPreset:
        """The recipe to degrade with: this section's for ``preset`` (or ''), else preset ``name`` with
        the same changes (:meth:`overrides`) applied on top.

        Raises:
            ConfigError: ``name`` is not a preset, or the changes do not fit it.
        """
        if not name or name == self.preset:
            values = {key: copy.deepcopy(getattr(self, key)) for key in RECIPE_FIELDS}
            return DegradationPreset(name=self.preset, **values)
        return get_preset(name, self.overrides())


_UNMIRRORED = set(RECIPE_FIELDS) - {f.name for f in dataclasses.fields(DegradationSection)}
if _UNMIRRORED:
    # A new DegradationPreset field must become a config key too, or it could never be set.
    raise TypeError(f"DegradationSection lacks the recipe fields {sorted(_UNMIRRORED)}")


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
    degradation: DegradationSection = field(default_factory=DegradationSection)
    lq: str = "baked"
    """baked: degrade every clip once and store its LQ frames; online: store the HR frames only (no LQ, no
    drawn parameters): the training loader degrades them on the device (``data.sources[i].lq=online``,
    docs/DATA.md 1.8) with the ``degradation`` recipe this manifest records."""
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
    if cfg.lq not in LQ_MODES:
        problems.append(f"lq={cfg.lq!r}; choose one of {list(LQ_MODES)}")
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


def _file_list(files: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    if files is None or files == "":
        return []
    if isinstance(files, (str, Path)):
        return [files]
    return list(files)


def load_prep_config(
    files: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
    *,
    base: DataPrepConfig | None = None,
) -> DataPrepConfig:
    """Merge defaults (or ``base``), YAML ``files`` and ``key=value`` overrides into a DataPrepConfig.

    Loads through :func:`~dlightning.contracts.config_io.load_config`. When the files or overrides
    choose another ``degradation.preset`` than the starting point, the load runs again from that
    preset's values, so the recipe keys default to the chosen preset (and keys set alongside the
    choice still apply on top).

    Raises:
        ConfigError: Unknown keys (with the closest valid key), wrong types or invalid values.
    """
    paths = _file_list(files)
    start = base if base is not None else DataPrepConfig()
    first = load_config(paths, overrides, cls=DataPrepConfig, base=start)
    chosen = first.degradation.preset
    if chosen == start.degradation.preset:
        return first
    fresh = DegradationSection(preset=chosen, usm_gt=start.degradation.usm_gt)
    return load_config(paths, overrides, cls=DataPrepConfig, base=dataclasses.replace(start, degradation=fresh))


def config_to_dict(cfg: DataPrepConfig) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of the config (stored in the manifest)."""
    return to_container(cfg)


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

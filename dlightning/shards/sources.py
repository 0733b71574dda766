"""Clip sources for offline shard building: frame folders, video files, images, demo photographs.

Building happens in two steps so that work can be split into deterministic shards:
``enumerate_*`` lists lightweight, picklable :class:`ClipSpec` s (no pixel decoding except a
video's first frame, or its whole stream when the container stores no frame count), then
:func:`load_clip` reads and crops one clip's HR frames. Inputs that cannot be read are never
dropped silently: enumeration records them in a :class:`SkipReport`, and ``load_clip`` raises
:class:`~dlightning.media.UnreadableInputError` for the caller to record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dlightning.contracts.shard_format import sanitize_key
from dlightning.errors import ConfigError
from dlightning.media import UnreadableInputError, probe_video, read_image
from dlightning.shards.camera_path import (
    CameraPathConfig,
    linear_pan_zoom_path,
    render_camera_path,
    sample_camera_path,
)

REDS4: tuple[str, ...] = ("000", "011", "015", "020")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
CROP_MODES: tuple[str, ...] = ("center", "random", "resize_center", "none")
DEMO_IMAGES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
)


@dataclass
class SkipReport:
    """Inputs skipped during a build, with the reason for each."""

    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        """Record one skipped input."""
        self.skipped.append({"path": str(path), "reason": reason})


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to load one clip later, in any process."""

    key: str
    source: str
    kind: str
    """``video`` (consistency phase) or ``image`` (pseudo-video, detail phase)."""
    clip_id: str
    loader: str
    """``frames``, ``video``, ``image``, ``demo_image`` or ``demo_video``."""
    paths: tuple[str, ...]
    frame_indices: tuple[int, ...]
    fps: float
    preset: str = ""
    """Degradation preset for this clip ('' = the build's default)."""


@dataclass
class Clip:
    """HR frames of one clip and their provenance."""

    frames: np.ndarray
    """``(T, H, W, 3)`` uint8 RGB."""
    spec: ClipSpec
    camera_path: list[list[float]] | None = None


def _window_starts(length: int, num_frames: int, stride: int, window_step: int) -> range:
    span = (num_frames - 1) * stride + 1
    step = window_step if window_step > 0 else span
    return range(0, max(0, length - span + 1), step)


def _window(start: int, num_frames: int, stride: int) -> tuple[int, ...]:
    return tuple(start + i * stride for i in range(num_frames))


def _check_root(root: str, what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(
            f"{what} root {root!r} is not a directory; set sources[i].root to an existing folder"
        )
    return path


def enumerate_frame_folders(
    root: str,
    *,
    source: str,
    num_frames: int,
    stride: int = 1,
    window_step: int = 0,
    exclude: Sequence[str] = REDS4,
    fps: float = 24.0,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    preset: str = "",
    report: SkipReport | None = None,
) -> list[ClipSpec]:
    """Windows of ``num_frames`` frames (every ``stride``-th) from ``<root>/<clip>/<frame>.png|jpg``.

    Args:
        root: Folder of clip folders (REDS layout); frames sorted by file name.
        exclude: Clip folder names to leave out (default: the REDS4 test clips).
        window_step: Frames between window starts (0 = non-overlapping windows).
    """
    specs: list[ClipSpec] = []
    for clip_dir in sorted(p for p in _check_root(root, "frame-folder").iterdir() if p.is_dir()):
        if clip_dir.name in set(exclude):
            continue
        files = sorted(str(p) for p in clip_dir.iterdir() if p.suffix.lower() in extensions)
        starts = _window_starts(len(files), num_frames, stride, window_step)
        if not starts and report is not None:
            report.add(
                str(clip_dir), f"only {len(files)} frames; a window needs {(num_frames - 1) * stride + 1}"
            )
        for start in starts:
            idx = _window(start, num_frames, stride)
            specs.append(
                ClipSpec(
                    key=sanitize_key(f"{source}_{clip_dir.name}_s{start:04d}"),
                    source=source,
                    kind="video",
                    clip_id=clip_dir.name,
                    loader="frames",
                    paths=tuple(files[i] for i in idx),
                    frame_indices=idx,
                    fps=fps,
                    preset=preset,
                )
            )
    return specs


def enumerate_videos(
    root: str,
    *,
    source: str,
    num_frames: int,
    stride: int = 1,
    window_step: int = 0,
    exclude: Sequence[str] = (),
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    preset: str = "",
    report: SkipReport | None = None,
) -> list[ClipSpec]:
    """Windows from every video file under ``root`` (recursive), decoded with PyAV."""
    report = report if report is not None else SkipReport()
    specs: list[ClipSpec] = []
    files = sorted(p for p in _check_root(root, "video").rglob("*") if p.suffix.lower() in extensions)
    for path in files:
        if path.stem in set(exclude):
            continue
        try:
            probe = probe_video(path, count_frames=True)
        except UnreadableInputError as err:
            report.add(str(path), str(err))
            continue
        count, fps = probe.num_frames or 0, float(probe.fps or 0.0)
        clip_id = str(path.relative_to(root).with_suffix(""))
        starts = _window_starts(count, num_frames, stride, window_step)
        if not starts:
            report.add(str(path), f"only {count} frames; a window needs {(num_frames - 1) * stride + 1}")
        for start in starts:
            specs.append(
                ClipSpec(
                    key=sanitize_key(f"{source}_{clip_id}_s{start:04d}"),
                    source=source,
                    kind="video",
                    clip_id=clip_id,
                    loader="video",
                    paths=(str(path),),
                    frame_indices=_window(start, num_frames, stride),
                    fps=fps,
                    preset=preset,
                )
            )
    return specs


def enumerate_images(
    root: str,
    *,
    source: str,
    num_frames: int,
    clips_per_image: int = 1,
    fps: float = 24.0,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    preset: str = "",
) -> list[ClipSpec]:
    """One or more camera-path pseudo-videos per image under ``root`` (recursive, LSDIR layout)."""
    specs: list[ClipSpec] = []
    files = sorted(p for p in _check_root(root, "image").rglob("*") if p.suffix.lower() in extensions)
    for path in files:
        clip_id = str(path.relative_to(root).with_suffix(""))
        for j in range(clips_per_image):
            specs.append(
                ClipSpec(
                    key=sanitize_key(f"{source}_{clip_id}_c{j}"),
                    source=source,
                    kind="image",
                    clip_id=clip_id,
                    loader="image",
                    paths=(str(path),),
                    frame_indices=tuple(range(num_frames)),
                    fps=fps,
                    preset=preset,
                )
            )
    return specs


def enumerate_demo(
    *,
    source: str = "demo",
    num_frames: int,
    names: Sequence[str] = DEMO_IMAGES,
    fps: float = 24.0,
    preset: str = "",
    kinds: Sequence[str] = ("image", "video"),
) -> list[ClipSpec]:
    """Per skimage photograph: one camera-path image clip and one pan/zoom "video" clip (as ``kinds`` asks).

    The "video" clips are an animated constant-velocity pan with a slow zoom over the still
    photograph: real pixels with real, smooth motion, standing in for footage in the offline demo.
    """
    specs: list[ClipSpec] = []
    for name in names:
        for kind, loader, tag in (("image", "demo_image", "cam"), ("video", "demo_video", "pan")):
            if kind not in kinds:
                continue
            specs.append(
                ClipSpec(
                    key=sanitize_key(f"{source}_{name}_{tag}"),
                    source=source,
                    kind=kind,
                    clip_id=name,
                    loader=loader,
                    paths=(name,),
                    frame_indices=tuple(range(num_frames)),
                    fps=fps,
                    preset=preset,
                )
            )
    return specs


# ----------------------------------------------------------------------------------------- loading


def demo_image(name: str) -> np.ndarray:
    """A bundled ``skimage.data`` photograph as uint8 RGB (no network access)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def read_video_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at ``indices`` (sorted, 0-based) of a video as ``(T, H, W, 3)`` uint8 RGB."""
    import av

    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
                if i >= max(indices):
                    break
    except av.error.FFmpegError as err:
        raise UnreadableInputError(f"{path}: {err}") from err
    if len(found) != len(wanted):
        raise UnreadableInputError(f"{path}: decoded {len(found)} of the {len(wanted)} frames wanted")
    return np.stack([found[i] for i in indices])


def crop_frames(
    frames: np.ndarray, hr_hw: tuple[int, int], mode: str, scale: int, rng: np.random.Generator
) -> np.ndarray:
    """Crop (or resize then crop) frames to ``hr_hw``, the same window for every frame.

    ``none`` keeps the full frame, trimmed to a multiple of ``scale``; ``resize_center`` area-resizes
    the short side to fit then centre-crops (DLoRAL's REDS/Pexels recipe).
    """
    if mode not in CROP_MODES:
        raise ConfigError(f"crop mode {mode!r} is unknown; choose one of {list(CROP_MODES)}")
    t, h, w, _ = frames.shape
    if mode == "none":
        return frames[:, : h - h % scale, : w - w % scale]
    th, tw = hr_hw
    if mode == "resize_center":
        factor = max(th / h, tw / w)
        size = (max(tw, round(w * factor)), max(th, round(h * factor)))
        frames = np.stack(
            [
                cv2.resize(f, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
                for f in frames
            ]
        )
        t, h, w, _ = frames.shape
    if h < th or w < tw:
        raise UnreadableInputError(f"frames are {h}x{w}, smaller than hr_size {th}x{tw}")
    if mode == "random":
        y, x = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
    else:
        y, x = (h - th) // 2, (w - tw) // 2
    return frames[:, y : y + th, x : x + tw]


def _demo_video_path(
    rng: np.random.Generator, num_frames: int, image_hw: tuple[int, int], crop_hw: tuple[int, int]
) -> list[list[float]]:
    margin_y = max(0.0, (image_hw[0] - crop_hw[0]) / 2.0 - 4)
    margin_x = max(0.0, (image_hw[1] - crop_hw[1]) / 2.0 - 4)
    start = [
        float(rng.uniform(-margin_x, margin_x)) / 2,
        float(rng.uniform(-margin_y, margin_y)) / 2,
        0.0,
        1.0,
    ]
    pan = 3.0 * (num_frames - 1)
    angle = float(rng.uniform(0, 2 * np.pi))
    end = [
        float(np.clip(start[0] + pan * np.cos(angle), -margin_x, margin_x)),
        float(np.clip(start[1] + pan * np.sin(angle), -margin_y, margin_y)),
        0.0,
        float(rng.choice([0.92, 1.08])),
    ]
    return linear_pan_zoom_path(num_frames, start, end)


def load_clip(
    spec: ClipSpec,
    *,
    hr_hw: tuple[int, int],
    crop: str,
    scale: int,
    camera: CameraPathConfig,
    rng: np.random.Generator,
) -> Clip:
    """Read one clip's HR frames (cropped to ``hr_hw``; camera-path rendered for image clips).

    Raises:
        UnreadableInputError: An input is unreadable or too small.
    """
    if spec.loader == "frames":
        frames = [read_image(p) for p in spec.paths]
        if len({f.shape for f in frames}) != 1:
            raise UnreadableInputError(f"frames of {spec.clip_id} differ in size")
        return Clip(crop_frames(np.stack(frames), hr_hw, crop, scale, rng), spec)
    if spec.loader == "video":
        return Clip(
            crop_frames(read_video_frames(spec.paths[0], spec.frame_indices), hr_hw, crop, scale, rng), spec
        )
    if spec.loader in ("image", "demo_image", "demo_video"):
        image = demo_image(spec.paths[0]) if spec.loader.startswith("demo") else read_image(spec.paths[0])
        if image.shape[0] < hr_hw[0] or image.shape[1] < hr_hw[1]:
            raise UnreadableInputError(f"{spec.paths[0]}: {image.shape[:2]} is smaller than hr_size {hr_hw}")
        n = len(spec.frame_indices)
        if spec.loader == "demo_video":
            path = _demo_video_path(rng, n, image.shape[:2], hr_hw)
        else:
            path = sample_camera_path(rng, n, image.shape[:2], hr_hw, camera)
        return Clip(render_camera_path(image, path, hr_hw, camera.interpolation), spec, camera_path=path)
    raise ConfigError(f"unknown clip loader {spec.loader!r}")

"""The clips of an evaluation set: a folder of videos and/or frame folders, paired by name.

Layout (the usual one of REDS4, UDM10, SPMCS, VideoLQ): ``ROOT/<clip>.mp4`` or ``ROOT/<clip>/<frames>``;
a folder that holds frames itself is one clip. LQ, GT and result folders pair their clips by name
(the file stem or the folder name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dlightning.errors import ConfigError
from dlightning.inference.video_io import IMAGE_SUFFIXES, VideoSource, is_video_path, probe_frames, video_source


def _has_frames(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def list_clips(root: str | Path, what: str = "input") -> dict[str, VideoSource]:
    """``{clip name: source}`` of an evaluation folder, sorted by name.

    Raises:
        ConfigError: ``root`` is missing or holds no clip.
    """
    root = Path(root)
    if root.is_file() and is_video_path(root):
        return {root.stem: video_source(root)}
    if not root.is_dir():
        raise ConfigError(f"{what} folder {root} does not exist; pass a folder of videos or frame folders")
    if _has_frames(root):
        return {root.name: probe_frames(root)}
    clips: dict[str, VideoSource] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file() and is_video_path(entry):
            clips[entry.stem] = video_source(entry)
        elif entry.is_dir() and _has_frames(entry):
            clips[entry.name] = probe_frames(entry)
    if not clips:
        raise ConfigError(f"{what} folder {root} holds no video and no folder of frames")
    return clips


def pair_clips(inputs: dict[str, VideoSource], others: dict[str, VideoSource], what: str) -> None:
    """Check that ``others`` (GT or results) has a clip for every input clip.

    Raises:
        ConfigError: Names the missing clips.
    """
    missing = sorted(set(inputs) - set(others))
    if missing:
        raise ConfigError(f"{what} has no clip named {missing[:5]}{' ...' if len(missing) > 5 else ''}; clips "
                          "pair by file stem or folder name")


def read_clip(source: VideoSource, max_frames: int = 0) -> torch.Tensor:
    """The frames of ``source`` as ``(T, 3, H, W)`` float32 in [0, 1] (at most ``max_frames`` when > 0)."""
    frames = list(source.frames(max_frames))
    if not frames:
        raise ConfigError(f"{source.path} holds no frame")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ConfigError(f"{source.path}: frames differ in size {sorted(shapes)}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0

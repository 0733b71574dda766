"""Reading image files and probing video files: the one implementation for the whole package.

The shard builder (``dlightning.shards``) and inference (``dlightning.inference.video_io``) read the
same kinds of inputs (frame folders, images, videos); both import these readers. OpenCV and PyAV only.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dlightning.errors import ConfigError


class UnreadableInputError(ConfigError):
    """An image or video file cannot be read (missing, corrupt, no video stream or no frame).

    The shard builder skips such an input and lists it in its report; inference stops with the
    message, which names the path and what to check.
    """


@dataclass(frozen=True)
class VideoProbe:
    """What opening a video file told: its rate, length and whether it has audio."""

    fps: Fraction | None
    """The stream's average rate (total frames / duration), else its guessed or base rate; None if none."""
    num_frames: int | None
    """Frames in the stream: the container's count, or counted by decoding (``count_frames``); None if unknown."""
    has_audio: bool


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` of an image file (grayscale expanded, alpha dropped, 16 bit reduced).

    Raises:
        UnreadableInputError: OpenCV cannot decode it.
    """
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UnreadableInputError(f"cannot read image {path}; check that it is a valid image file")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def probe_video(path: str | Path, *, count_frames: bool = False) -> VideoProbe:
    """Open a video, check it has a decodable video frame, and read its rate and length.

    Args:
        path: The video file.
        count_frames: Decode the whole stream when the container does not store a frame count.

    Raises:
        UnreadableInputError: The file is missing, unreadable or has no decodable video frame.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"input {str(path)!r} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableInputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            has_audio = bool(container.streams.audio)
            frames = container.decode(stream)
            if next(frames, None) is None:
                raise UnreadableInputError(f"{path} has no decodable video frame")
            count = int(stream.frames or 0) or None
            if count is None and count_frames:
                count = 1 + sum(1 for _ in frames)
    except av.error.FFmpegError as err:
        raise UnreadableInputError(f"cannot read video {path}: {err}; check the file is a complete video") from err
    return VideoProbe(fps=Fraction(rate) if rate else None, num_frames=count, has_audio=has_audio)

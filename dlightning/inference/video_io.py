"""Reading and writing videos (PyAV) and frame folders (OpenCV), with atomic outputs.

* Inputs: a video file (any container FFmpeg reads), a folder of frames (sorted by name), or a folder
  of videos. Frames come out as RGB uint8 ``(H, W, 3)``; grayscale and alpha inputs are converted.
* Frame rate: the stream's average rate (total frames / duration), so a variable-frame-rate source is
  written at constant rate with the same duration.
* Outputs are written into a new temporary sibling (``OUT.tmp-<random>`` for a frame folder,
  ``<stem>.tmp-<random><suffix>`` for a video, so the container format is kept) and renamed at the
  end, so the final name never holds a partial result. An existing frame folder keeps every file that
  is not named like one of upscale's frames (:data:`FRAME_NAME`); only those are replaced.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dlightning.errors import ConfigError
from dlightning.media import UnreadableInputError, probe_video, read_image
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "opus", "alac", "flac"}


InputError = UnreadableInputError
"""An input video, frame or folder cannot be used; the message names the path and the fix.

The same class as the shared readers raise (``read_image``/``probe_video`` of
:mod:`dlightning.media`, which the shard builder uses too), so callers catch one type."""


@dataclass
class VideoSource:
    """One input: a video file or a frame folder."""

    path: Path
    kind: str
    """``video`` or ``frames``."""
    fps: Fraction | None
    num_frames: int | None
    has_audio: bool = False
    size: tuple[int, int] | None = None
    """``(height, width)`` of the frames, when the container or the first image tells it."""

    def frames(self, max_frames: int = 0) -> Iterator[np.ndarray]:
        """RGB uint8 frames ``(H, W, 3)`` in order (at most ``max_frames`` when > 0)."""
        it = _video_frames(self.path) if self.kind == "video" else _folder_frames(self.path)
        for i, frame in enumerate(it):
            if max_frames and i >= max_frames:
                return
            yield frame


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _video_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _folder_frames(folder: Path) -> Iterator[np.ndarray]:
    for path in _image_files(folder):
        yield read_image(path)


def video_source(path: str | Path) -> VideoSource:
    """A video file as a source: checked to have a decodable frame and a frame rate.

    Raises:
        InputError: The file is missing, unreadable, has no decodable video frame or no frame rate.
    """
    path = Path(path)
    info = probe_video(path)
    if info.fps is None:
        raise InputError(f"{path} has no frame rate; re-mux it with a rate or pass a frame folder")
    return VideoSource(path=path, kind="video", fps=info.fps, num_frames=info.num_frames,
                       has_audio=info.has_audio, size=_video_size(path))


def _video_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` the container declares for the first video stream (None when it says 0)."""
    import av

    # probe_video has already decoded a frame, so the file opens; only the header is read here.
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        height, width = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
    return (height, width) if height and width else None


def probe_frames(folder: Path) -> VideoSource:
    """A frame folder as a source (no frame rate); its first image must be readable."""
    files = _image_files(folder)
    if not files:
        raise InputError(f"folder {folder} holds no frames ({', '.join(IMAGE_SUFFIXES)})")
    first = read_image(files[0])
    return VideoSource(path=folder, kind="frames", fps=None, num_frames=len(files),
                       size=(int(first.shape[0]), int(first.shape[1])))


def collect_inputs(path: str | Path) -> list[VideoSource]:
    """The sources of an input path: one video, one frame folder, or every video of a folder.

    A folder holding videos is a folder of videos (its images, if any, are ignored); otherwise it must
    hold frames. Every source is probed before any processing starts.

    Raises:
        InputError: Nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_file():
        return [video_source(path)]
    if not path.is_dir():
        raise InputError(f"input {str(path)!r} does not exist; pass a video file or a folder")
    videos = _video_files(path)
    if videos:
        return [video_source(v) for v in videos]
    if _image_files(path):
        return [probe_frames(path)]
    raise InputError(f"folder {path} holds no video ({', '.join(VIDEO_SUFFIXES)}) and no frames "
                     f"({', '.join(IMAGE_SUFFIXES)})")


def is_video_path(path: str | Path) -> bool:
    """Whether ``path`` names a video file by its suffix."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


FRAME_NAME = "frame_{:06d}.png"
"""File name of output frame ``i`` in a frame folder; ``--overwrite`` replaces only files named so."""
_FRAME_NAME_RE = re.compile(r"frame_\d{6}\.png")


def is_frame_name(name: str) -> bool:
    """Whether ``name`` is the name of one of upscale's output frames (:data:`FRAME_NAME`)."""
    return _FRAME_NAME_RE.fullmatch(name) is not None


def temp_sibling(final: Path) -> Path:
    """A fresh temporary name next to ``final``: ``OUT.tmp-<random>``, the suffix kept for videos."""
    token = secrets.token_hex(4)
    if is_video_path(final):
        return final.with_name(f"{final.stem}.tmp-{token}{final.suffix}")
    return final.with_name(f"{final.name}.tmp-{token}")


class FrameFolderWriter:
    """Write :data:`FRAME_NAME` frames into a new temporary sibling folder, published by :meth:`close`.

    Args:
        final: The frame folder. When it exists, it must be empty unless ``overwrite``.
        overwrite: Let :meth:`close` publish into an existing non-empty folder: frames named like
            ours are replaced (and older ones beyond the new count removed); every other file stays.
    """

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final)
        self.overwrite = overwrite
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_sibling(self.final)
        self.tmp.mkdir()  # exist_ok=False: a fresh folder of our own, the only one abort() removes
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame."""
        cv2.imwrite(str(self.tmp / FRAME_NAME.format(self.count)), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self) -> None:
        """Publish the frames under the final name.

        Raises:
            ConfigError: ``final`` became a file or a non-empty folder (without ``overwrite``) during
                the run; the temporary folder is left for the caller's :meth:`abort`.
        """
        if self.final.is_dir() and not any(self.final.iterdir()):
            self.final.rmdir()
        if not self.final.exists():
            self.tmp.rename(self.final)
            return
        if not self.final.is_dir() or not self.overwrite:
            raise ConfigError(f"{self.final} was created by something else during the run; choose another "
                              "output (or pass --overwrite to replace the frames in a folder)")
        self._merge_into_final()

    def _merge_into_final(self) -> None:
        """Move our frames into the existing folder, then remove its older frames beyond the new count."""
        # Each os.replace is atomic, so every frame name holds either the old or the new complete frame.
        for i in range(self.count):
            name = FRAME_NAME.format(i)
            os.replace(self.tmp / name, self.final / name)
        self.tmp.rmdir()
        stale = (p for p in self.final.iterdir() if p.is_file() and is_frame_name(p.name))
        for path in stale:
            if int(path.stem.split("_")[1]) >= self.count:
                path.unlink()

    def abort(self) -> None:
        """Remove the temporary folder (only ever our own, created by __init__)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


class VideoWriter:
    """H.264 video at ``fps`` with the source's audio copied, written to a temporary sibling then renamed.

    :meth:`close` replaces an existing ``final`` file only when ``replace`` is true.

    Args:
        final: Output video path (its suffix picks the container).
        fps: Frame rate (the source's average rate).
        audio_from: Source video whose audio streams are remuxed (re-encoded to AAC when the codec
            cannot go into an mp4).
        crf: H.264 constant rate factor.
        replace: Replace an existing ``final`` file; when false, :meth:`close` refuses to.
    """

    def __init__(self, final: str | Path, fps: Fraction, audio_from: Path | None = None, crf: int = 18,
                 replace: bool = True) -> None:
        self.final = Path(final)
        self.replace = replace
        self.tmp = temp_sibling(self.final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.fps = Fraction(fps).limit_denominator(100000)
        self.audio_from = audio_from
        self.crf = crf
        self.container = None
        self.stream = None

    def _open(self, height: int, width: int) -> None:
        import av

        self.container = av.open(str(self.tmp), mode="w")
        self.stream = self.container.add_stream("libx264", rate=self.fps)
        self.stream.width, self.stream.height = width, height
        # 4:2:0 needs even sides; odd output sizes are written in 4:4:4.
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": str(self.crf)}
        self._audio = self._add_audio()

    def _add_audio(self) -> list:
        if self.audio_from is None:
            return []
        import av

        src = av.open(str(self.audio_from))
        pairs = []
        for a in src.streams.audio:
            name = a.codec_context.name
            mp4 = self.final.suffix.lower() in (".mp4", ".m4v", ".mov")
            if mp4 and name not in _MP4_AUDIO:
                out = self.container.add_stream("aac", rate=a.rate)
                pairs.append((a, out, True))
            else:
                pairs.append((a, self.container.add_stream_from_template(a), False))
        self._audio_src = src
        return pairs

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame ``(H, W, 3)``."""
        import av

        if self.container is None:
            self._open(frame.shape[0], frame.shape[1])
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)

    def _copy_audio(self) -> None:
        for src_stream, out_stream, transcode in self._audio:
            if transcode:
                for frame in self._audio_src.decode(src_stream):
                    frame.pts = None
                    for packet in out_stream.encode(frame):
                        self.container.mux(packet)
                for packet in out_stream.encode(None):
                    self.container.mux(packet)
                continue
            for packet in self._audio_src.demux(src_stream):
                if packet.dts is None:
                    continue  # demux's final flush packet
                packet.stream = out_stream
                self.container.mux(packet)
            self._audio_src.seek(0)

    def close(self) -> None:
        """Flush, copy the audio and publish under the final name.

        Raises:
            InputError: No frame was written.
            ConfigError: ``final`` exists and ``replace`` is false (the temporary file is left for
                :meth:`abort`).
        """
        if self.container is None:
            raise InputError(f"no frame was produced for {self.final}")
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        if self._audio:
            self._copy_audio()
            self._audio_src.close()
        self.container.close()
        if self.final.exists() and not self.replace:
            raise ConfigError(f"{self.final} was created by something else during the run; choose another "
                              "output or pass --overwrite")
        self.tmp.replace(self.final)

    def abort(self) -> None:
        """Close and remove the partial file."""
        import av

        if self.container is not None:
            # Already failing: a close error must not hide the original one; the file goes anyway.
            with contextlib.suppress(av.error.FFmpegError, OSError, ValueError):
                self.container.close()
        if getattr(self, "_audio_src", None) is not None:
            self._audio_src.close()
        self.tmp.unlink(missing_ok=True)


def read_video_info(path: str | Path) -> tuple[int, Fraction, int, int, bool]:
    """``(frames decoded, average rate, height, width, has_audio)`` of a video (tests and checks)."""
    src = video_source(path)
    frames = list(src.frames())
    return len(frames), src.fps, frames[0].shape[0], frames[0].shape[1], src.has_audio

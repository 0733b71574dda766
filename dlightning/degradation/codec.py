"""Video-codec compression of a whole clip with PyAV, in memory (docs/DATA.md 1.3, 1.7).

The clip is encoded as ONE sequence (so motion-compensated artefacts are coherent in time) into
an mp4 held in a ``BytesIO``, then decoded back. yuv420p needs even sizes: frames are edge-padded
to whole macroblocks before encoding and cropped back after decoding.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

CODECS: tuple[str, ...] = ("libx264", "mpeg4", "libx265")
RATE_CONTROLS: tuple[str, ...] = ("bitrate", "crf")

# ffmpeg is chatty (x265 prints banners); keep only errors, as mmagic does.
logging.getLogger("libav").setLevel(logging.ERROR)


def _encoder_options(codec: str, rate_control: str, crf: int | None) -> dict[str, str]:
    options: dict[str, str] = {}
    if codec == "libx265":
        # x265's thread pool / frame threads make its output non-deterministic; one thread fixes that.
        options["x265-params"] = "log-level=error:pools=none:frame-threads=1"
    if rate_control == "crf":
        if codec == "mpeg4":
            # mpeg4 has no CRF; a fixed quantiser is its constant-quality mode.
            options["qscale"] = str(max(2, min(31, int(crf or 20) // 2)))
        else:
            options["crf"] = str(int(crf if crf is not None else 28))
    return options


def _pad_frames(frames: np.ndarray, codec: str) -> np.ndarray:
    """Edge-pad to a multiple of 16 (whole macroblocks; yuv420p needs even sizes anyway).

    x265 also gets at least one 64x64 CTU: on smaller frames it reads padding it never wrote and
    its output becomes non-deterministic.
    """
    _, h, w, _ = frames.shape
    multiple, minimum = 16, (64 if codec == "libx265" else 16)
    th, tw = max(minimum, -(-h // multiple) * multiple), max(minimum, -(-w // multiple) * multiple)
    if (th, tw) == (h, w):
        return frames
    return np.pad(frames, ((0, 0), (0, th - h), (0, tw - w), (0, 0)), mode="edge")


def compress_clip(frames: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Encode and decode a clip with a video codec.

    Args:
        frames: ``(T, H, W, 3)`` uint8 RGB frames (any H, W >= 1).
        params: ``{"codec": "libx264"|"mpeg4"|"libx265", "rate_control": "bitrate"|"crf",
            "bitrate": int (bit/s at 1 fps, so bits per frame), "crf": int}``.

    Returns:
        ``(T, H, W, 3)`` uint8 decoded frames, one per input frame.

    Raises:
        RuntimeError: The codec returned a different number of frames than it was given.
    """
    import av  # lazy: keeps `import dlightning.degradation` light

    t, h, w, _ = frames.shape
    codec, rate_control = params["codec"], params.get("rate_control", "bitrate")
    padded = _pad_frames(frames, codec)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height = padded.shape[2], padded.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # one core per worker, and bit-reproducible output
        if rate_control == "bitrate":
            stream.bit_rate = int(params["bitrate"])
        stream.options = _encoder_options(codec, rate_control, params.get("crf"))
        for frame in padded:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    buf.seek(0)
    with av.open(buf, mode="r") as container:
        out = [f.to_ndarray(format="rgb24")[:h, :w] for f in container.decode(video=0)]
    if len(out) != t:
        raise RuntimeError(f"codec {codec} returned {len(out)} frames for a {t}-frame clip")
    return np.stack(out)

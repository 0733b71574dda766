"""The shard format: one definition for the writer (``dlightning.shards``) and the readers
(``dlightning.data`` loader, training validation), docs/INTERFACES.md "Shards".

A shard set is a folder holding ``manifest.json`` and WebDataset tar shards named
``<name>-000000.tar``. A sample is the tar members ``<key>.<field>`` sharing one key:

- ``hr_000.png`` ... and ``lq_000.png`` ...: the HR frames and their LQ twins, lossless RGB PNG,
  ``num_frames`` of each (:func:`frame_field` names them);
- ``meta.json``: ``{"source", "kind", "clip_id", "frame_indices", "fps", "hr_size", "lq_size",
  "scale", "num_frames", "data_prep_version", ...}``;
- ``deg.json``: the degradation parameters drawn for the clip and its seed;
- ``caption.txt``: UTF-8 text (may be empty).

The manifest is ``{"version": 1, "build_config": {...}, "shards": [{"file", "samples", "bytes",
"sha256"}, ...]}`` with the records sorted by file name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dlightning.errors import ConfigError

# ------------------------------------------------------------------------------------------ samples
HR = "hr"
"""Prefix of the HR frame fields."""
LQ = "lq"
"""Prefix of the LQ frame fields."""
FRAME_PREFIXES: tuple[str, ...] = (HR, LQ)
FRAME_SUFFIX = "png"
META_FIELD = "meta.json"
DEG_FIELD = "deg.json"
CAPTION_FIELD = "caption.txt"
SAMPLE_FIELDS: tuple[str, ...] = (META_FIELD, DEG_FIELD, CAPTION_FIELD)
"""The fields every sample has besides its frames."""
SAMPLE_KINDS: tuple[str, ...] = ("video", "image")
"""Values of ``meta.kind``: real footage, or a camera-path pseudo-video of one image."""
DATA_PREP_VERSION = "1"
"""Version of the sample layout (stored in every ``meta.json`` as ``data_prep_version``)."""


def frame_field(prefix: str, index: int) -> str:
    """Field name of frame ``index``: ``frame_field("hr", 0) == "hr_000.png"``."""
    return f"{prefix}_{index:03d}.{FRAME_SUFFIX}"


def frame_fields(prefix: str, num_frames: int) -> list[str]:
    """The frame field names of a ``num_frames``-frame clip, in frame order."""
    return [frame_field(prefix, i) for i in range(num_frames)]


# ------------------------------------------------------------------------------------------ keys
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(text: str) -> str:
    """A WebDataset-safe sample key: letters, digits, ``_`` and ``-`` only (never a dot)."""
    return _KEY_UNSAFE.sub("_", text)


def check_key(key: str) -> None:
    """Raise ValueError when ``key`` cannot be a sample key (a dot would split it into fields)."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; sanitise it with sanitize_key")


def split_member(name: str) -> tuple[str, str]:
    """``(key, field)`` of a tar member name, split at the first dot (WebDataset's rule)."""
    key, _, field = name.partition(".")
    return key, field


# ------------------------------------------------------------------------------------------ shards
SHARD_SUFFIX = ".tar"


def shard_file_name(name: str, index: int) -> str:
    """File name of shard ``index`` of the set called ``name``: ``clips-000000.tar``."""
    return f"{name}-{index:06d}{SHARD_SUFFIX}"


def shard_glob(name: str) -> str:
    """Glob pattern matching every shard file of the set called ``name``."""
    return f"{name}-*{SHARD_SUFFIX}"


# ------------------------------------------------------------------------------------------ manifest
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARD_KEYS: tuple[str, ...] = ("file", "samples", "bytes", "sha256")
"""The keys of one shard record in the manifest."""


def manifest_document(build_config: Mapping[str, Any], shards: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest content: version, build config and the shard records (contract keys only, by file)."""
    records = sorted(({k: s[k] for k in SHARD_KEYS} for s in shards), key=lambda r: r["file"])
    return {"version": MANIFEST_VERSION, "build_config": dict(build_config), "shards": records}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check the ``manifest.json`` of a shard-set folder.

    Returns:
        The manifest dict; ``shards`` is a list of records, each with every key of :data:`SHARD_KEYS`.

    Raises:
        ConfigError: The manifest is missing, not JSON, of another version, or has malformed records.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; build the shard set with `dlightning shards build` "
                          "or point at a folder written by it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable JSON manifest ({err}); rebuild the shard set") from err
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(
            data.get("shards"), list):
        raise ConfigError(f"{path} is not a version-{MANIFEST_VERSION} manifest with a 'shards' list; "
                          "rebuild the shard set with `dlightning shards build`")
    for i, rec in enumerate(data["shards"]):
        missing = [k for k in SHARD_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing or not isinstance(rec["file"], str) or not rec["file"]:
            raise ConfigError(f"{path}: shards[{i}] lacks {missing or ['a file name']} (each record holds "
                              f"{list(SHARD_KEYS)}); rebuild the shard set")
        if not _is_plain_name(rec["file"]):
            # Shards live in the manifest's folder: a path would make readers open files elsewhere.
            raise ConfigError(f"{path}: shards[{i}].file {rec['file']!r} is not a file name in the shard-set "
                              "folder; rebuild the shard set")
    return data


def _is_plain_name(name: str) -> bool:
    return name not in (".", "..") and "/" not in name and "\\" not in name


def manifest_shard_files(manifest: Mapping[str, Any]) -> list[str]:
    """The shard file names a manifest lists, in its order."""
    return [str(rec["file"]) for rec in manifest["shards"]]


# ------------------------------------------------------------------------------------------ frames
class FrameDecodeError(ValueError):
    """A frame field's bytes are not a decodable 3-channel image."""


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """Lossless PNG bytes of a uint8 RGB image (OpenCV compression ``level`` 0-9)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write a PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Decode a frame field to an RGB uint8 array ``(H, W, 3)``.

    Raises:
        FrameDecodeError: The bytes are empty or not a decodable 3-channel image.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise FrameDecodeError("not a decodable PNG frame")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

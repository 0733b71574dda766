"""Writing clip samples into WebDataset shards (docs/INTERFACES.md, "Shards").

A shard is written to ``<name>.tar.tmp`` with a fixed member mtime (byte-reproducible), then
fsynced and atomically renamed to ``<name>.tar``; a crash never leaves a truncated shard under a
valid name. :func:`run_shard_task` builds one whole shard (load, degrade, caption, write) and is
the unit of parallel work and of resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dlightning.data.captions import Captioner, build_captioner
from dlightning.data.degradation import degrade_clip, get_preset, sample_params, usm_sharpen
from dlightning.data.sources import Clip, ClipSpec, UnreadableInputError, load_clip
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

DATA_PREP_VERSION = "1"
"""Version of the sample layout written by this module (stored in every meta.json)."""


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """Lossless PNG bytes of a uint8 RGB image."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write a PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 RGB image from PNG bytes."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def frame_field(prefix: str, index: int) -> str:
    """Field name of frame ``index``: ``hr_000.png`` / ``lq_000.png``."""
    return f"{prefix}_{index:03d}.png"


def clip_meta(clip: Clip, lq: np.ndarray, scale: int) -> dict[str, Any]:
    """The ``meta.json`` content of one sample."""
    spec = clip.spec
    meta: dict[str, Any] = {
        "source": spec.source,
        "kind": spec.kind,
        "clip_id": spec.clip_id,
        "frame_indices": list(spec.frame_indices),
        "fps": spec.fps,
        "hr_size": list(clip.frames.shape[1:3]),
        "lq_size": list(lq.shape[1:3]),
        "scale": scale,
        "num_frames": int(clip.frames.shape[0]),
        "data_prep_version": DATA_PREP_VERSION,
    }
    if clip.camera_path is not None:
        # Only image clips carry camera_path (INTERFACES.md); demo "video" clips keep their pan separately.
        meta["camera_path" if spec.kind == "image" else "synthetic_motion"] = clip.camera_path
    return meta


def build_sample(
    clip: Clip, lq: np.ndarray, deg: dict[str, Any], caption: str, *, scale: int, png_level: int = 1
) -> dict[str, Any]:
    """Encode one clip as a WebDataset sample dict (``__key__`` plus bytes fields)."""
    sample: dict[str, Any] = {"__key__": clip.spec.key}
    for i, frame in enumerate(clip.frames):
        sample[frame_field("hr", i)] = encode_png(frame, png_level)
    for i, frame in enumerate(lq):
        sample[frame_field("lq", i)] = encode_png(frame, png_level)
    sample["meta.json"] = json.dumps(clip_meta(clip, lq, scale), sort_keys=True).encode("utf-8")
    sample["deg.json"] = json.dumps(deg, sort_keys=True).encode("utf-8")
    sample["caption.txt"] = caption.encode("utf-8")
    return sample


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]], *, mtime: int = 0) -> dict[str, Any]:
    """Write samples to ``path`` atomically (tmp file, fsync, rename).

    Returns:
        ``{"file", "samples", "bytes", "sha256"}`` of the finished shard.
    """
    import webdataset as wds

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    count = 0
    with open(tmp, "wb") as fh:
        writer = wds.TarWriter(fh, encoder=False, mtime=mtime)
        for sample in samples:
            if "." in sample["__key__"]:
                raise ValueError(f"sample key {sample['__key__']!r} contains a dot; sanitise it")
            writer.write(sample)
            count += 1
        writer.close()
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return {"file": final.name, "samples": count, "bytes": final.stat().st_size, "sha256": sha256_file(final)}


@dataclass
class ShardTask:
    """One shard's worth of clips; picklable so it can run in a worker process."""

    shard_path: str
    clip_indices: list[int]
    specs: list[ClipSpec]
    cfg: Any
    """The build's ``DataPrepConfig``."""
    plan_hash: str


_CAPTIONERS: dict[str, Captioner] = {}
"""Per-process captioner cache (a captioning model is loaded once per worker)."""


def clip_rngs(seed: int, clip_index: int) -> tuple[np.random.Generator, ...]:
    """Independent (load, params, noise) generators of clip ``clip_index`` under build seed ``seed``."""
    children = np.random.SeedSequence([seed, clip_index]).spawn(3)
    return tuple(np.random.default_rng(c) for c in children)


def make_sample(spec: ClipSpec, clip_index: int, cfg: Any, captioner: Captioner) -> dict[str, Any]:
    """Load, degrade and caption one clip and encode it as a sample.

    Raises:
        UnreadableInputError: The clip's inputs cannot be read.
    """
    load_rng, param_rng, noise_rng = clip_rngs(cfg.seed, clip_index)
    hr_hw = (int(cfg.hr_size[0]), int(cfg.hr_size[1]))
    crop = _source_crop(cfg, spec.source)
    clip = load_clip(spec, hr_hw=hr_hw, crop=crop, scale=cfg.scale, camera=cfg.camera, rng=load_rng)
    if cfg.degradation.usm_gt:
        clip.frames = usm_sharpen(clip.frames)
    preset = get_preset(spec.preset or cfg.degradation.preset, cfg.degradation.overrides)
    params = sample_params(preset, param_rng)
    lq = degrade_clip(clip.frames, params, cfg.scale, noise_rng)
    deg = {
        "seed": {"build_seed": cfg.seed, "clip_index": clip_index},
        "usm_gt": cfg.degradation.usm_gt,
        "scale": cfg.scale,
        **params,
    }
    caption = captioner(spec.key, spec.clip_id, clip.frames)
    return build_sample(clip, lq, deg, caption, scale=cfg.scale, png_level=cfg.shards.png_compression)


def _source_crop(cfg: Any, source: str) -> str:
    for src in cfg.sources:
        if (src.name or src.kind) == source:
            return src.crop
    return "center"


def run_shard_task(task: ShardTask) -> dict[str, Any]:
    """Build one shard; clips whose inputs are unreadable are skipped and listed in ``skipped``.

    Returns:
        The shard record (``file, samples, bytes, sha256``) plus ``plan_hash`` and ``skipped``.
    """
    cv2.setNumThreads(1)
    cfg = task.cfg
    key = repr(cfg.captions)
    captioner = _CAPTIONERS.get(key) or _CAPTIONERS.setdefault(key, build_captioner(cfg.captions))
    skipped: list[dict[str, str]] = []

    def samples() -> Iterable[dict[str, Any]]:
        for spec, index in zip(task.specs, task.clip_indices, strict=True):
            try:
                yield make_sample(spec, index, cfg, captioner)
            except UnreadableInputError as err:
                log.warning("skipping clip %s: %s", spec.key, err)
                skipped.append({"path": spec.key, "reason": str(err)})

    record = write_shard(task.shard_path, samples(), mtime=cfg.shards.mtime)
    return {**record, "plan_hash": task.plan_hash, "skipped": skipped}

"""Writing clip samples into WebDataset shards (the format: :mod:`dlightning.contracts.shard_format`).

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

from dlightning.contracts.shard_format import (
    CAPTION_FIELD,
    DATA_PREP_VERSION,
    DEG_FIELD,
    HR,
    LQ,
    META_FIELD,
    check_key,
    encode_png,
    frame_field,
)
from dlightning.degradation.operators import degrade_clip, usm_sharpen
from dlightning.degradation.presets import DegradationPreset
from dlightning.degradation.sampling import sample_params
from dlightning.media import UnreadableInputError
from dlightning.shards.captions import Captioner, build_captioner
from dlightning.shards.sources import Clip, ClipSpec, load_clip
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def clip_meta(clip: Clip, lq: np.ndarray | None, scale: int) -> dict[str, Any]:
    """The ``meta.json`` content of one sample (``lq`` None: an HR-only sample, marked ``"lq": "online"``)."""
    spec = clip.spec
    hr_hw = list(clip.frames.shape[1:3])
    meta: dict[str, Any] = {
        "source": spec.source,
        "kind": spec.kind,
        "clip_id": spec.clip_id,
        "frame_indices": list(spec.frame_indices),
        "fps": spec.fps,
        "hr_size": hr_hw,
        "lq_size": [hr_hw[0] // scale, hr_hw[1] // scale] if lq is None else list(lq.shape[1:3]),
        "scale": scale,
        "num_frames": int(clip.frames.shape[0]),
        "data_prep_version": DATA_PREP_VERSION,
    }
    if lq is None:
        meta["lq"] = "online"
    if clip.camera_path is not None:
        # Only image clips carry camera_path (docs/INTERFACES.md); demo "video" clips keep their pan separately.
        meta["camera_path" if spec.kind == "image" else "synthetic_motion"] = clip.camera_path
    return meta


def build_sample(
    clip: Clip, lq: np.ndarray | None, deg: dict[str, Any], caption: str, *, scale: int, png_level: int = 1
) -> dict[str, Any]:
    """Encode one clip as a WebDataset sample dict (``__key__`` plus bytes fields; no LQ fields when ``lq``
    is None)."""
    sample: dict[str, Any] = {"__key__": clip.spec.key}
    for i, frame in enumerate(clip.frames):
        sample[frame_field(HR, i)] = encode_png(frame, png_level)
    for i, frame in enumerate(lq if lq is not None else ()):
        sample[frame_field(LQ, i)] = encode_png(frame, png_level)
    sample[META_FIELD] = json.dumps(clip_meta(clip, lq, scale), sort_keys=True).encode("utf-8")
    sample[DEG_FIELD] = json.dumps(deg, sort_keys=True).encode("utf-8")
    sample[CAPTION_FIELD] = caption.encode("utf-8")
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
            check_key(sample["__key__"])
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
_RECIPES: dict[tuple[str, str], DegradationPreset] = {}
"""Per-process cache of the resolved recipe per (degradation section, preset name)."""


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
    seed = {"build_seed": cfg.seed, "clip_index": clip_index}
    if getattr(cfg, "lq", "baked") == "online":
        # HR only: the training loader draws fresh parameters each time it reads the clip
        lq, deg = None, {"seed": seed, "usm_gt": cfg.degradation.usm_gt, "scale": cfg.scale, "lq": "online"}
    else:
        params = sample_params(resolved_recipe(cfg, spec.preset), param_rng)
        lq = degrade_clip(clip.frames, params, cfg.scale, noise_rng)
        deg = {"seed": seed, "usm_gt": cfg.degradation.usm_gt, "scale": cfg.scale, **params}
    caption = captioner(spec.key, spec.clip_id, clip.frames)
    return build_sample(clip, lq, deg, caption, scale=cfg.scale, png_level=cfg.shards.png_compression)


def resolved_recipe(cfg: Any, name: str = "") -> DegradationPreset:
    """The recipe a clip with preset ``name`` ('' = the build's) is degraded with (cached per process)."""
    key = (repr(cfg.degradation), name)
    if key not in _RECIPES:
        _RECIPES[key] = cfg.degradation.recipe(name)
    return _RECIPES[key]


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

"""Tiny shard-set writer for the loader tests (fields and manifest of dlightning.contracts.shard_format).

Independent of the shard builder on purpose: it writes the contract's format with
webdataset.TarWriter, so the loader is tested against the contract rather than against another
module's output.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from dlightning.contracts.shard_format import (
    CAPTION_FIELD,
    DEG_FIELD,
    HR,
    LQ,
    MANIFEST_NAME,
    META_FIELD,
    encode_png,
    frame_field,
    manifest_document,
)


def make_clip(rng: np.random.Generator, *, frames: int = 3, hr_size: int = 32, scale: int = 4):
    """Random-noise HR clip (T, H, W, 3) and its LQ made with INTER_AREA, both uint8."""
    hr = rng.integers(0, 256, size=(frames, hr_size, hr_size, 3), dtype=np.uint8)
    side = hr_size // scale
    lq = np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in hr])
    return hr, lq


def clip_sample(key: str, hr: np.ndarray, lq: np.ndarray, *, kind: str = "video", scale: int = 4,
                caption: str = "a caption") -> dict:
    """The TarWriter dict of one clip."""
    sample = {"__key__": key, CAPTION_FIELD: caption.encode(), DEG_FIELD: b'{"seed": 0}'}
    for i in range(len(hr)):
        sample[frame_field(HR, i)] = encode_png(hr[i])
        sample[frame_field(LQ, i)] = encode_png(lq[i])
    meta = {"source": "test", "kind": kind, "clip_id": key, "frame_indices": list(range(len(hr))), "fps": 24,
            "hr_size": list(hr.shape[1:3]), "lq_size": list(lq.shape[1:3]), "scale": scale,
            "num_frames": len(hr), "data_prep_version": "test"}
    sample[META_FIELD] = json.dumps(meta).encode()
    return sample


def write_shard(path: Path, samples: list[dict]) -> None:
    """Write samples into one tar shard."""
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def write_manifest(folder: Path, files: list[str]) -> None:
    """manifest.json for the shards in ``folder``."""
    shards = []
    for name in files:
        data = (folder / name).read_bytes()
        shards.append({"file": name, "samples": -1, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest_document({}, shards)))


def truncate_inside(path: Path, member_suffix: str) -> None:
    """Cut a shard in the middle of the data of the last member whose name ends with ``member_suffix``."""
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(member_suffix)][-1]
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])


def write_good_set(folder: Path, *, name: str, kind: str, num_shards: int, per_shard: int, seed: int,
                   frames: int = 3, hr_size: int = 32) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """A clean shard set; returns ``{key: (hr, lq, shard index)}``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    clips, files = {}, []
    for s in range(num_shards):
        samples = []
        for j in range(per_shard):
            key = f"{name}_{s:02d}_{j:02d}"
            hr, lq = make_clip(rng, frames=frames, hr_size=hr_size)
            clips[key] = (hr, lq, s)
            samples.append(clip_sample(key, hr, lq, kind=kind))
        files.append(f"{name}-{s:06d}.tar")
        write_shard(folder / files[-1], samples)
    write_manifest(folder, files)
    return clips


def write_faulty_set(folder: Path, *, seed: int = 0) -> dict:
    """A "video" shard set with every fault the loader must survive.

    Shards: 0 clean (3 clips); 1 cut in the middle of its last clip; 2 zero bytes; 3 one clean clip, one
    missing ``lq_002.png``, one with a corrupt PNG, one whose LQ is the wrong size, one clean clip.

    Returns:
        ``{"valid": {key: (hr, lq)}, "bad": set of keys that must never appear}``.
    """
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    valid, bad = {}, set()

    def clip(key):
        hr, lq = make_clip(rng)
        return key, hr, lq

    shard0 = [clip(f"v_00_{j}") for j in range(3)]
    shard1 = [clip(f"v_01_{j}") for j in range(3)]
    for key, hr, lq in shard0 + shard1[:2]:
        valid[key] = (hr, lq)
    bad.add(shard1[2][0])
    write_shard(folder / "video-000000.tar", [clip_sample(k, h, q) for k, h, q in shard0])
    write_shard(folder / "video-000001.tar", [clip_sample(k, h, q) for k, h, q in shard1])
    truncate_inside(folder / "video-000001.tar", frame_field(LQ, 1))
    (folder / "video-000002.tar").write_bytes(b"")

    shard3 = []
    for key, hr, lq in (clip("v_03_good_a"), clip("v_03_good_b")):
        valid[key] = (hr, lq)
        shard3.append(clip_sample(key, hr, lq))
    key, hr, lq = clip("v_03_missing")
    missing = clip_sample(key, hr, lq)
    del missing[frame_field(LQ, 2)]
    key2, hr, lq = clip("v_03_corrupt")
    corrupt = clip_sample(key2, hr, lq)
    corrupt[frame_field(HR, 1)] = corrupt[frame_field(HR, 1)][:40] + b"\x00" * 200
    key3, hr, lq = clip("v_03_wrongsize")
    wrong = clip_sample(key3, hr, np.ascontiguousarray(lq[:, :7, :7]))
    bad.update({key, key2, key3})
    shard3 = [shard3[0], missing, corrupt, wrong, shard3[1]]
    write_shard(folder / "video-000003.tar", shard3)
    write_manifest(folder, [f"video-{i:06d}.tar" for i in range(4)])
    return {"valid": valid, "bad": bad}

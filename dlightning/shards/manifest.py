"""The writing side of a shard set's manifest: ``manifest.json``, per-shard done records, verification.

The manifest layout and its reader live in :mod:`dlightning.contracts.shard_format`, shared with
the training loader. Done records live in ``<out>/.progress/<shard>.json`` and add the shard's plan
hash (what it was built from), so a resumed build reuses a shard only when its file still matches
its record and the plan is unchanged.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from dlightning.contracts.shard_format import (
    CAPTION_FIELD,
    DEG_FIELD,
    HR,
    LQ,
    MANIFEST_NAME,
    META_FIELD,
    SAMPLE_FIELDS,
    SHARD_SUFFIX,
    decode_png,
    frame_fields,
    manifest_document,
    read_manifest,
    split_member,
)
from dlightning.shards.writer import sha256_file
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

PROGRESS_DIR = ".progress"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(out_dir: str | Path, build_config: dict[str, Any], shards: list[dict[str, Any]]) -> Path:
    """Write ``manifest.json`` with the shard records (only the contract's keys) sorted by file."""
    path = Path(out_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest_document(build_config, shards))
    return path


def done_record_path(out_dir: str | Path, shard_file: str) -> Path:
    """Where the done record of ``shard_file`` lives."""
    return Path(out_dir) / PROGRESS_DIR / f"{shard_file}.json"


def write_done_record(out_dir: str | Path, record: dict[str, Any]) -> None:
    """Persist a finished shard's record (after its tar was renamed into place)."""
    path = done_record_path(out_dir, record["file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def finished_record(out_dir: str | Path, shard_file: str, plan_hash: str) -> dict[str, Any] | None:
    """The done record of a shard if the shard is finished and still valid for ``plan_hash``, else None."""
    rec_path = done_record_path(out_dir, shard_file)
    shard = Path(out_dir) / shard_file
    if not rec_path.is_file() or not shard.is_file():
        return None
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        # A damaged record only costs a rebuild of its shard, which rewrites it.
        log.warning("%s is unreadable (%s); shard %s is rebuilt", rec_path, err, shard_file)
        return None
    if not isinstance(record, dict):
        log.warning("%s is not a done record; shard %s is rebuilt", rec_path, shard_file)
        return None
    if record.get("plan_hash") != plan_hash or record.get("bytes") != shard.stat().st_size:
        return None
    return record if sha256_file(shard) == record.get("sha256") else None


# ----------------------------------------------------------------------------------------- verify


def _read_samples(path: Path) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """Group tar members into samples by the key before the first dot (WebDataset's rule)."""
    order: list[str] = []
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, field = split_member(member.name)
            if key not in samples:
                order.append(key)
            data = tar.extractfile(member)
            samples[key][field] = data.read() if data is not None else b""
    return order, samples


def check_sample(key: str, fields: dict[str, bytes], *, deep: bool = False) -> list[str]:
    """Problems with one sample's field set (and, with ``deep``, its decoded frame sizes)."""
    missing = [f for f in SAMPLE_FIELDS if f not in fields]
    if missing:
        return [f"sample {key}: missing {missing}"]
    try:
        meta = json.loads(fields[META_FIELD])
        json.loads(fields[DEG_FIELD])
        fields[CAPTION_FIELD].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as err:
        return [f"sample {key}: unreadable meta/deg/caption ({err})"]
    n = int(meta.get("num_frames", -1))
    problems = []
    for prefix, size in ((HR, meta.get("hr_size")), (LQ, meta.get("lq_size"))):
        present = sorted(f for f in fields if f.startswith(prefix + "_"))
        # an HR-only sample (built with lq=online) has no LQ frames
        expected = [] if prefix == LQ and meta.get("lq") == "online" else frame_fields(prefix, n)
        if present != expected:
            problems.append(f"sample {key}: {prefix} frames {present} != expected {n} frames")
        elif deep:
            for name in expected:
                shape = list(decode_png(fields[name]).shape[:2])
                if shape != list(size):
                    problems.append(f"sample {key}: {name} is {shape}, meta says {size}")
    return problems


def verify_shard_set(out_dir: str | Path, *, deep: bool = False) -> tuple[list[str], dict[str, int]]:
    """Re-read every shard in the manifest: size, sha256, sample count and field sets.

    Returns:
        ``(problems, stats)``; an empty ``problems`` list means the shard set is intact.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    problems: list[str] = []
    stats = {"shards": 0, "samples": 0}
    for rec in manifest["shards"]:
        path = out / rec["file"]
        if not path.is_file():
            problems.append(f"{rec['file']}: missing")
            continue
        size = path.stat().st_size
        if size != rec["bytes"]:
            problems.append(f"{rec['file']}: {size} bytes, manifest says {rec['bytes']}")
        if sha256_file(path) != rec["sha256"]:
            problems.append(f"{rec['file']}: sha256 does not match the manifest (corrupted or rewritten)")
        try:
            order, samples = _read_samples(path)
        except (tarfile.TarError, OSError) as err:
            problems.append(f"{rec['file']}: unreadable tar ({err})")
            continue
        if len(order) != rec["samples"]:
            problems.append(f"{rec['file']}: {len(order)} samples, manifest says {rec['samples']}")
        for key in order:
            problems.extend(f"{rec['file']}: {p}" for p in check_sample(key, samples[key], deep=deep))
        stats["shards"] += 1
        stats["samples"] += len(order)
    listed = {rec["file"] for rec in manifest["shards"]}
    for stray in sorted(p.name for p in out.glob(f"*{SHARD_SUFFIX}") if p.name not in listed):
        problems.append(f"{stray}: shard file not listed in the manifest")
    return problems, stats

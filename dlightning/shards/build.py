"""Building, resuming and verifying a shard set: plain functions under any front end (no argparse).

:func:`build_shards` lists every clip first (cheap), splits them into shards deterministically, then
builds one shard per task, in worker processes when ``workers > 1``. A finished shard has a done
record with its sha256 and the hash of its plan; rerunning the same build skips those shards and
rebuilds only the rest. :func:`verify_shards` re-reads a shard set against its manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlightning.contracts.shard_format import (
    DATA_PREP_VERSION,
    MANIFEST_NAME,
    read_manifest,
    shard_file_name,
    shard_glob,
)
from dlightning.degradation.presets import preset_to_dict
from dlightning.errors import ConfigError
from dlightning.shards.config import DataPrepConfig, config_to_dict, demo_config, load_prep_config
from dlightning.shards.manifest import (
    finished_record,
    verify_shard_set,
    write_done_record,
    write_json_atomic,
    write_manifest,
)
from dlightning.shards.sources import (
    ClipSpec,
    SkipReport,
    enumerate_demo,
    enumerate_frame_folders,
    enumerate_images,
    enumerate_videos,
)
from dlightning.shards.writer import ShardTask, run_shard_task
from dlightning.utils.logging import get_logger

log = get_logger("dlightning.data_prep")

REPORT_NAME = "report.json"
_RUNTIME_KEYS = ("output_dir", "workers", "progress")
"""Config keys that change how a build runs, not what it writes (left out of the manifest and plan)."""


@dataclass
class BuildResult:
    """What a build did."""

    out_dir: Path
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    num_clips: int = 0


@dataclass
class VerifyResult:
    """What verifying a shard set found."""

    out_dir: Path
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0

    @property
    def ok(self) -> bool:
        """True when the shard set is intact."""
        return not self.problems


def plan_clips(cfg: DataPrepConfig, report: SkipReport) -> list[ClipSpec]:
    """Enumerate every clip of every source, in a deterministic order.

    Raises:
        ConfigError: No sources, a missing root, or two clips with the same key.
    """
    if not cfg.sources:
        raise ConfigError("data_prep config has no sources; add at least one under `sources:`")
    specs: list[ClipSpec] = []
    for src in cfg.sources:
        name = src.name or src.kind
        common = {"source": name, "num_frames": cfg.num_frames, "preset": src.preset}
        if src.kind == "frames":
            found = enumerate_frame_folders(
                src.root,
                stride=src.frame_stride,
                window_step=src.window_step,
                exclude=src.exclude,
                fps=src.fps,
                report=report,
                **common,
            )
        elif src.kind == "video":
            found = enumerate_videos(
                src.root,
                stride=src.frame_stride,
                window_step=src.window_step,
                exclude=src.exclude,
                report=report,
                **common,
            )
        elif src.kind == "images":
            found = enumerate_images(src.root, clips_per_image=src.clips_per_image, fps=src.fps, **common)
        else:
            found = enumerate_demo(names=src.images, fps=src.fps, kinds=src.demo_kinds, **common)
        specs.extend(found[: src.max_clips] if src.max_clips > 0 else found)
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ConfigError(f"duplicate sample keys {dupes}; give each source a distinct `name`")
    return specs


def clips_per_shard(cfg: DataPrepConfig) -> int:
    """Samples per shard: ``samples_per_shard`` capped by ``max_shard_bytes`` of raw HR+LQ pixels."""
    h, w = cfg.hr_size
    raw = cfg.num_frames * h * w * 3 * (1 + 1 / cfg.scale**2)
    return max(1, min(cfg.shards.samples_per_shard, int(cfg.shards.max_shard_bytes // raw)))


def build_config_dict(cfg: DataPrepConfig) -> dict[str, Any]:
    """The config as recorded in the manifest (without run-time-only keys).

    ``degradation`` holds the build's typed recipe; ``resolved_presets`` holds the recipe of every
    preset the build uses (the per-source ones with the same changes applied), so the manifest
    documents the numbers even if a preset's defaults change later.
    """
    data = config_to_dict(cfg)
    for key in _RUNTIME_KEYS:
        data.pop(key, None)
    data["data_prep_version"] = DATA_PREP_VERSION
    names = {cfg.degradation.preset, *(src.preset for src in cfg.sources if src.preset)}
    data["resolved_presets"] = {n: preset_to_dict(cfg.degradation.recipe(n)) for n in sorted(names)}
    return data


def plan_tasks(cfg: DataPrepConfig, specs: list[ClipSpec]) -> list[ShardTask]:
    """Split clips into shard tasks; each task's plan hash covers the build config and its clips."""
    out = Path(cfg.output_dir)
    per = clips_per_shard(cfg)
    config_json = json.dumps(build_config_dict(cfg), sort_keys=True)
    tasks = []
    for n, start in enumerate(range(0, len(specs), per)):
        chunk = specs[start : start + per]
        indices = list(range(start, start + len(chunk)))
        plan = json.dumps({"config": config_json, "keys": [s.key for s in chunk], "indices": indices})
        tasks.append(
            ShardTask(
                shard_path=str(out / shard_file_name(cfg.name, n)),
                clip_indices=indices,
                specs=chunk,
                cfg=cfg,
                plan_hash=hashlib.sha256(plan.encode()).hexdigest(),
            )
        )
    return tasks


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def _run_tasks(cfg: DataPrepConfig, todo: list[ShardTask], on_done: Callable[[dict[str, Any]], None]) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="shard", disable=not cfg.progress, desc=f"data_prep {cfg.name}")
    if cfg.workers <= 1:
        for task in todo:
            on_done(run_shard_task(task))
            bar.update()
    else:
        import multiprocessing as mp

        # spawn: workers start clean (no inherited OpenCV/ffmpeg threads or locks).
        with ProcessPoolExecutor(
            cfg.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker
        ) as pool:
            futures = [pool.submit(run_shard_task, task) for task in todo]
            for future in as_completed(futures):
                on_done(future.result())
                bar.update()
    bar.close()


def prepare_output_dir(out: Path) -> None:
    """Check ``out`` can take this build and create it.

    The build deletes nothing: it writes its shards (``<name>-NNNNNN.tar``, via ``.tar.tmp``),
    ``manifest.json``, ``report.json`` and ``.progress/`` and leaves every other file alone. So a
    folder with other files is fine, but one whose ``manifest.json`` or ``report.json`` is not a
    shard set's would lose that file, and is refused.

    Raises:
        ConfigError: ``out`` is a file, cannot be created, or holds a foreign manifest or report.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file; pass a folder (new, or one holding this shard set) as "
                          "output_dir=<folder>")
    if any((out / name).exists() for name in (MANIFEST_NAME, REPORT_NAME)):
        try:
            read_manifest(out)
        except ConfigError as err:
            raise ConfigError(f"output_dir={out} holds a {MANIFEST_NAME} or {REPORT_NAME} that is not a shard "
                              f"set's ({err}); the build would replace it: choose another output_dir") from err
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output_dir={out} ({err.strerror}); choose a folder this user can "
                          "write") from err


def build_shards(cfg: DataPrepConfig) -> BuildResult:
    """Build (or resume building) the shard set described by ``cfg`` into ``cfg.output_dir``.

    Writes the shards, ``manifest.json`` (after every finished shard, so an interrupted build
    leaves a manifest of what is done) and ``report.json`` (inputs that were skipped and why).

    Raises:
        ConfigError: No output folder, an output folder that cannot take the build
            (:func:`prepare_output_dir`), no sources, a missing source root or duplicate sample keys.
    """
    if not cfg.output_dir:
        raise ConfigError("output_dir is empty; pass output_dir=<folder>")
    out = Path(cfg.output_dir)
    prepare_output_dir(out)
    report = SkipReport()
    specs = plan_clips(cfg, report)
    tasks = plan_tasks(cfg, specs)
    result = BuildResult(out_dir=out, num_clips=len(specs))
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        rec = finished_record(out, Path(task.shard_path).name, task.plan_hash)
        if rec is None:
            todo.append(task)
        else:
            records[rec["file"]] = rec
            result.reused.append(rec["file"])
    planned = {Path(t.shard_path).name for t in tasks}
    for stale in out.glob(shard_glob(cfg.name)):
        if stale.name not in planned:
            log.warning("%s is not part of this build's plan; it is left out of the manifest", stale.name)
    log.info(
        "%d clips in %d shards: %d to build, %d already done",
        len(specs),
        len(tasks),
        len(todo),
        len(result.reused),
    )
    config_dict = build_config_dict(cfg)

    def on_done(rec: dict[str, Any]) -> None:
        write_done_record(out, rec)
        records[rec["file"]] = rec
        result.built.append(rec["file"])
        write_manifest(out, config_dict, list(records.values()))

    _run_tasks(cfg, todo, on_done)
    write_manifest(out, config_dict, list(records.values()))
    result.skipped = report.skipped + [s for r in records.values() for s in r.get("skipped", [])]
    write_json_atomic(
        out / REPORT_NAME,
        {
            "num_clips_planned": len(specs),
            "num_samples": sum(r["samples"] for r in records.values()),
            "shards_built": sorted(result.built),
            "shards_reused": sorted(result.reused),
            "skipped": result.skipped,
        },
    )
    if result.skipped:
        log.warning("%d inputs were skipped; see %s", len(result.skipped), out / REPORT_NAME)
    return result


def verify_shards(out_dir: str | Path, *, deep: bool = False) -> VerifyResult:
    """Re-read every shard of a set against its manifest (with ``deep``, decode every frame too).

    Logs every problem and a one-line summary.

    Raises:
        ConfigError: The folder has no readable manifest.
    """
    problems, stats = verify_shard_set(out_dir, deep=deep)
    result = VerifyResult(Path(out_dir), problems, stats["shards"], stats["samples"])
    for problem in problems:
        log.error("verify: %s", problem)
    if problems:
        log.error("verify FAILED: %d problem(s) in %s", len(problems), out_dir)
    else:
        log.info("verify OK: %d shards, %d samples in %s", result.shards, result.samples, out_dir)
    return result


def build_demo_shards(out_dir: str | Path, overrides: Sequence[str] = ()) -> BuildResult:
    """Build the offline demo shard set (skimage photographs) into ``out_dir``, ``overrides`` applied.

    Raises:
        ConfigError: A bad override (the message names the key and the closest valid one).
    """
    return build_shards(load_prep_config(None, overrides, base=demo_config(str(out_dir))))

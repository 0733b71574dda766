"""Training loader: WebDataset shard sets -> phase-aware batches of aligned HR/LQ clips.

Design (docs/DATA.md 2, docs/INTEGRATION.md C3, docs/METHOD.md 12.5):

* The unit of work is a whole **micro-batch**. ``MicroBatchDataset`` is an ``IterableDataset`` whose
  items are finished batches (use ``DataLoader(batch_size=None)``). PyTorch's DataLoader asks its W
  workers for items round-robin, so worker w of an epoch that starts at micro-batch s yields the
  batches s + w, s + w + W, ...; every batch therefore knows its global micro-batch index m on its rank.
* ``data.access=indexed`` (default): batch m is built from the global sample order by random access
  into the tars (``dlightning.data.indexed``, ``order``, ``tar_index``); it is a function of m, the rank
  and the global batch only, so a resume continues it exactly.
* ``data.access=stream`` (the rest of this docstring): batch m uses the phase ``phase_fn(m)`` to pick one
  source by that phase's mixing weights, then takes
  ``batch_size`` clips from stream ``m % cfg.streams`` of that source. A stream is an explicit
  ``wds.DataPipeline``: ``ResampledShards(deterministic=True)`` (or a disjoint per-rank shard cycle) ->
  ``tarfile_to_samples`` with a counting handler -> ``validate_samples`` -> seeded ``shuffle``. Stream
  seeds mix (data seed, resume count) with (rank, source, stream, epoch) explicitly, because
  ``seed_everything`` gives every rank the same seed and webdataset's default worker seed
  (``rank * 1000 + worker``) reads the rank from the environment. Window, crop and flips of batch m
  use a generator seeded by (data seed, resume count, rank, m). Hence the batch sequence of a rank is
  a function of the seeds, ``start_micro_batch`` and ``cfg.streams`` only: the same with 0, 1 or 2
  workers as long as ``cfg.streams`` is fixed.
* Each epoch yields exactly ``cfg.batches_per_epoch`` batches per rank (equal on all ranks, so DDP
  cannot hang on uneven counts); streams are reopened per epoch with the epoch in their seed.
* Bad data never crashes and never leaks a partial sample: unreadable, empty or truncated shards are
  counted by the tar handler, samples missing fields or with undecodable/mismatched images by the
  validation steps. Counts travel inside each batch as ``batch["skipped"]`` (workers are separate
  processes) and ``VSRDataModule`` pops and aggregates them.
"""

from __future__ import annotations

import json
import random
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlightning.contracts.shard_format import (
    CAPTION_FIELD,
    FRAME_PREFIXES,
    HR,
    LQ,
    META_FIELD,
    FrameDecodeError,
    decode_png,
    frame_field,
    manifest_shard_files,
    read_manifest,
)
from dlightning.data.config import DataConfig
from dlightning.data.online import DEGRADATION_KEY, draw_degradation, source_recipes
from dlightning.data.order import OrderOrigin, SourcePlan, checked_phase
from dlightning.data.tar_index import SourceIndex, index_source
from dlightning.data.transforms import (
    Dihedral,
    SampleError,
    check_pair_sizes,
    collate_clips,
    derive_seed,
    random_aligned_crop,
    random_window,
    stack_frames,
    to_tensor,
)
from dlightning.degradation.presets import DegradationPreset
from dlightning.errors import ConfigError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

PHASES = ("consistency", "detail")
PhaseFn = Callable[[int], str]

# Purpose tags keep the seeds of different random decisions independent (order.py uses 5-8, synthetic 4).
_TAG_SHARDS, _TAG_SHUFFLE, _TAG_BATCH, _TAG_DEGRADE = 1, 2, 3, 9


class SkipCounter:
    """Counts skipped samples/shards per reason; also the tar-reading exception handler.

    ``pop()`` returns the counts since the previous ``pop()`` (what one batch carries), ``totals``
    everything seen by this process. After ``max_consecutive`` skips without a good sample in between
    the data is unusable and ``add`` raises instead of looping forever.
    """

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._consecutive = 0
        self.max_consecutive = max_consecutive
        self.context = ""

    def add(self, reason: str, detail: str = "") -> None:
        """Record one skip; raise RuntimeError if the data looks unusable."""
        if reason not in self.totals:
            log.warning("data: skipping %s (%s); further skips of this kind are only counted",
                        reason, detail, extra={"all_ranks": True})
        self.totals[reason] += 1
        self._pending[reason] += 1
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"data: {self._consecutive} bad samples/shards in a row {self.context} "
                f"(counts {dict(self.totals)}); check the shard set with `dlightning shards verify` "
                "or raise data.max_consecutive_skips")

    def ok(self) -> None:
        """Record a good sample (resets the consecutive-skip guard)."""
        self._consecutive = 0

    def pop(self) -> dict[str, int]:
        """Counts since the last pop."""
        out, self._pending = dict(self._pending), Counter()
        return out

    def handler(self, exn: Exception) -> bool:
        """Exception handler for webdataset: count the error by kind and continue with the next item."""
        self.add(classify_exception(exn), repr(exn)[:300])
        return True


def classify_exception(exn: Exception) -> str:
    """Map an exception raised while reading tars to a skip reason."""
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, tarfile.ReadError) and "empty file" in str(exn):
        return "empty_shard"
    if isinstance(exn, (tarfile.TarError, EOFError, OSError)):
        return "tar_error"
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return "tar_error"
    raise exn  # a bug, not bad data: let it surface


# ----------------------------------------------------------------------------------------------
# Start-up checks


def load_shard_urls(cfg: DataConfig, *, world_size: int) -> list[list[str]]:
    """Read every source's manifest and return its shard paths; fail early with the config key.

    Args:
        cfg: The data section.
        world_size: Number of ranks (for the shard-count checks).

    Returns:
        One list of shard paths per ``cfg.sources`` entry.

    Raises:
        ConfigError: a source folder or manifest is missing, empty or unreadable, or (stream access,
            non-resampled) a source has fewer shards than world_size * streams.
    """
    if not cfg.sources:
        raise ConfigError("data.sources is empty; list at least one shard folder "
                          "(or use data.backend=synthetic)")
    urls = [_source_urls(i, src.path) for i, src in enumerate(cfg.sources)]
    if cfg.access == "indexed":
        return urls  # every rank reads from every shard: no shard count to check
    needed = world_size * cfg.streams
    for i, shards in enumerate(urls):
        if len(shards) >= needed:
            continue
        key = f"data.sources.{i}.path={cfg.sources[i].path!r}"
        if not cfg.resampled:
            raise ConfigError(
                f"{key} has {len(shards)} shards but data.resampled=false needs at least "
                f"world_size x streams = {world_size} x {cfg.streams} = {needed} so every stream gets its "
                "own shards; "
                "write more, smaller shards or set data.resampled=true")
        log.warning("%s has %d shards < world_size x streams = %d: resampling keeps loading correct and "
                    "ranks equal, but the same samples will repeat more often within an epoch; "
                    "consider writing more, smaller shards", key, len(shards), needed)
    return urls


def _source_urls(index: int, path: str) -> list[str]:
    key = f"data.sources.{index}.path"
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}={path!r} is not a folder; point it at a shard set written by data_prep")
    try:
        files = manifest_shard_files(read_manifest(folder))
    except ConfigError as exn:
        raise ConfigError(f"{key}={path!r}: {exn}") from exn
    present = [str(folder / f) for f in files if (folder / f).is_file()]
    if len(present) < len(files):
        log.warning("%s=%r: %d of %d shards listed in manifest.json are missing; reading the others",
                    key, path, len(files) - len(present), len(files))
    if not present:
        raise ConfigError(f"{key}={path!r}: manifest.json lists no existing shard")
    return present


def index_shard_sets(cfg: DataConfig, urls: list[list[str]]) -> list[SourceIndex]:
    """Index the tar members of every source (headers only), for the indexed access.

    Args:
        cfg: The data section (names the sources in messages).
        urls: Shard paths per source (``load_shard_urls``).

    Returns:
        One :class:`SourceIndex` per source.

    Raises:
        ConfigError: a source none of whose shards holds a readable sample.
    """
    indexes = []
    for i, shards in enumerate(urls):
        started = time.perf_counter()
        index = index_source(shards)
        if index.num_samples == 0:
            raise ConfigError(f"data.sources.{i}.path={cfg.sources[i].path!r}: no shard holds a readable sample; "
                              "check the shard set with `dlightning shards verify`")
        log.info("data.sources.%d: indexed %d samples in %d shards (%d damaged) in %.1f s", i, index.num_samples,
                 len(shards), len(index.faults), time.perf_counter() - started)
        indexes.append(index)
    return indexes


def check_phase_weights(cfg: DataConfig, phases: Sequence[str]) -> None:
    """Every phase the schedule uses needs a source with a positive weight for it (ConfigError)."""
    for phase in phases:
        if phase not in PHASES:
            raise ConfigError(f"unknown phase {phase!r}; valid: {list(PHASES)}")
        if cfg.backend == "shards" and not any(_weight(s, phase) > 0 for s in cfg.sources):
            raise ConfigError(f"the schedule uses phase {phase!r} but no data.sources[] entry has "
                              f"weight_{phase} > 0; give the source that feeds it a positive weight")


def _weight(source, phase: str) -> float:
    return source.weight_consistency if phase == "consistency" else source.weight_detail


# ----------------------------------------------------------------------------------------------
# Per-sample steps


def validate_samples(src: Iterator[dict], *, counter: SkipCounter, min_frames: int,
                     lq: bool = True) -> Iterator[dict]:
    """Pipeline stage: drop samples lacking meta.json or any of their num_frames HR/LQ PNGs.

    A truncated tar can yield a sample with its last fields missing (docs/DATA.md 2.2); such samples are
    counted as ``missing_field`` and never passed on. Adds the parsed meta as ``sample["__meta__"]``.
    ``lq=False`` (online LQ) requires the HR frames only.
    """
    for sample in src:
        try:
            yield validated_sample(sample, min_frames, lq=lq)
        except SampleError as err:
            counter.add(err.reason, f"{sample.get('__key__')} in {sample.get('__url__')}: {err}")


def validated_sample(sample: dict, min_frames: int, *, lq: bool = True) -> dict:
    """The sample with its parsed ``meta.json`` added as ``sample["__meta__"]``; ``lq=False`` (online LQ)
    requires the HR frames only.

    Raises:
        SampleError: ``missing_field`` (no meta, or one of its ``num_frames`` HR/LQ PNGs absent),
            ``bad_meta`` or ``too_few_frames``.
    """
    if not sample.get(META_FIELD):
        raise SampleError("missing_field", META_FIELD)
    try:
        meta = json.loads(sample[META_FIELD])
        num_frames = int(meta["num_frames"])
    except (ValueError, KeyError, TypeError) as exn:
        raise SampleError("bad_meta", repr(exn)) from exn
    if num_frames < min_frames:
        raise SampleError("too_few_frames", f"{num_frames} < data.frames={min_frames}")
    for i in range(num_frames):
        for kind in FRAME_PREFIXES if lq else (HR,):
            if not sample.get(frame_field(kind, i)):
                raise SampleError("missing_field", frame_field(kind, i))
    sample["__meta__"] = meta
    return sample


def _decode_frame(data: bytes) -> np.ndarray:
    try:
        return decode_png(data)
    except FrameDecodeError as err:
        raise SampleError("decode_error") from err


def prepare_clip(sample: dict, cfg: DataConfig, rng: np.random.Generator,
                 online: tuple[DegradationPreset, int] | None = None) -> dict:
    """Validated raw sample -> clip dict: random frame window, decode, aligned crop, flips, tensors.

    ``online=(recipe, seed)`` (a source with ``lq=online``, docs/DATA.md 1.8): the LQ frames are not
    read; the clip carries ``degradation``, its parameters drawn from ``seed``, instead of ``lq``. The
    window, crop and flips are the same draws from ``rng`` either way.

    Raises:
        SampleError: ``decode_error``, ``size_mismatch`` or ``too_small``.
    """
    meta = sample["__meta__"]
    t0 = random_window(int(meta["num_frames"]), cfg.frames, rng)
    window = range(t0, t0 + cfg.frames)
    hr = stack_frames([_decode_frame(sample[frame_field(HR, i)]) for i in window], HR)
    lq = None if online else stack_frames([_decode_frame(sample[frame_field(LQ, i)]) for i in window], LQ)
    if "hr_size" in meta and list(hr.shape[1:3]) != list(meta["hr_size"]):
        raise SampleError("size_mismatch", f"hr {hr.shape[1:3]} vs meta.hr_size {meta['hr_size']}")
    check_pair_sizes(hr, lq, scale=cfg.scale, crop_size=cfg.crop_size)
    hr, lq = random_aligned_crop(hr, lq, crop_size=cfg.crop_size, scale=cfg.scale, rng=rng)
    if cfg.augment:
        flip = Dihedral.draw(rng)
        hr, lq = flip.apply(hr), None if lq is None else flip.apply(lq)
    caption = sample.get(CAPTION_FIELD, b"")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    clip = {"hr": to_tensor(hr), "key": sample["__key__"], "caption": str(caption),
            "kind": str(meta.get("kind", "video"))}
    if online is None:
        clip["lq"] = to_tensor(lq)
    else:
        clip[DEGRADATION_KEY] = draw_degradation(*online)
    return clip


# ----------------------------------------------------------------------------------------------
# Streams and batches


class _ShardCycle(IterableDataset):
    """Non-resampled shard list: endless passes over fixed shards, each pass in a new seeded order."""

    def __init__(self, urls: list[str], seed: int) -> None:
        super().__init__()
        self.urls, self.seed = urls, seed

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.seed)
        while True:
            order = list(self.urls)
            rng.shuffle(order)
            for url in order:
                yield {"url": url}


def choose_source(cfg: DataConfig, phase: str, rng: np.random.Generator) -> int:
    """Index of the source batch draws from, by the phase's mixing weights."""
    weights = np.array([_weight(s, phase) for s in cfg.sources], dtype=np.float64)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


class ShardBatchBuilder:
    """Builds micro-batch m of one rank from the shard sets (see the module docstring).

    Args:
        cfg: Data section.
        urls: Shard paths per source (``load_shard_urls``).
        rank: This process's rank.
        world_size: Number of ranks.
        phase_fn: Micro-batch index -> phase.
        resume_count: How often the run was resumed (folded into stream seeds: a resume draws fresh data).
        recipes: Per source, its online-LQ recipe or None (``source_recipes``; read from the config if None).
    """

    def __init__(self, cfg: DataConfig, urls: list[list[str]], *, rank: int, world_size: int,
                 phase_fn: PhaseFn, resume_count: int = 0,
                 recipes: list[DegradationPreset | None] | None = None) -> None:
        self.cfg, self.urls, self.rank, self.world_size = cfg, urls, rank, world_size
        self.phase_fn, self.resume_count = phase_fn, resume_count
        self.recipes = recipes if recipes is not None else source_recipes(cfg)
        self.counter = SkipCounter(cfg.max_consecutive_skips)
        self._streams: dict[tuple[int, int], Iterator[dict]] = {}
        self._epoch = -1

    def build(self, micro_batch: int, epoch: int) -> dict:
        """Batch dict for micro-batch ``micro_batch`` (its epoch decides which streams are open)."""
        if epoch != self._epoch:  # streams are per epoch; drop the old ones (and their buffers)
            self._streams, self._epoch = {}, epoch
        phase = checked_phase(self.phase_fn, micro_batch)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, self.resume_count, self.rank, micro_batch,
                                                _TAG_BATCH))
        source = choose_source(self.cfg, phase, rng)
        stream = self._stream(source, micro_batch % self.cfg.streams, epoch)
        self.counter.context = f"from data.sources.{source}.path={self.cfg.sources[source].path!r}"
        recipe = self.recipes[source]
        clips = []
        for j in range(self.cfg.batch_size):
            # online LQ: parameters seeded like the batch's other draws, one seed per clip
            seed = derive_seed(self.cfg.seed, self.resume_count, self.rank, micro_batch, j, _TAG_DEGRADE)
            clips.append(self._next_clip(stream, rng, None if recipe is None else (recipe, seed)))
        return collate_clips(clips, micro_batch=micro_batch, skipped=self.counter.pop())

    def _next_clip(self, stream: Iterator[dict], rng: np.random.Generator,
                   online: tuple[DegradationPreset, int] | None) -> dict:
        while True:
            sample = next(stream)
            try:
                clip = prepare_clip(sample, self.cfg, rng, online)
            except SampleError as err:
                self.counter.add(err.reason, f"{sample['__key__']} in {sample.get('__url__')}: {err}")
                continue
            self.counter.ok()
            return clip

    def _stream(self, source: int, lane: int, epoch: int) -> Iterator[dict]:
        if (source, lane) not in self._streams:
            self._streams[source, lane] = iter(self._pipeline(source, lane, epoch))
        return self._streams[source, lane]

    def _pipeline(self, source: int, lane: int, epoch: int) -> wds.DataPipeline:
        cfg = self.cfg
        stream_seed = derive_seed(self.rank, source, lane, epoch)
        base_seed = derive_seed(cfg.seed, self.resume_count, _TAG_SHARDS)
        if cfg.resampled:
            # worker_seed replaces webdataset's env-derived rank*1000+worker with our explicit stream id.
            shards = wds.ResampledShards(self.urls[source], seed=base_seed, deterministic=True,
                                         worker_seed=lambda: stream_seed)
        else:
            rank_urls = self.urls[source][self.rank::self.world_size]  # explicit split by node
            shards = _ShardCycle(rank_urls[lane::cfg.streams], derive_seed(base_seed, stream_seed))
        shuffle_rng = random.Random(derive_seed(base_seed, stream_seed, _TAG_SHUFFLE))
        return wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(handler=self.counter.handler),
            lambda src: validate_samples(src, counter=self.counter, min_frames=cfg.frames,
                                         lq=self.recipes[source] is None),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=shuffle_rng),
        )


def worker_micro_batches(start: int, epoch: int, batches_per_epoch: int, worker: int,
                         num_workers: int) -> range:
    """Micro-batch indices worker ``worker`` of ``num_workers`` (0 = main process) yields in ``epoch``.

    DataLoader fetches from its workers round-robin, so this interleaving reproduces the global order
    start + epoch * batches_per_epoch, +1, +2, ... and sums to exactly batches_per_epoch per rank.
    """
    first = start + epoch * batches_per_epoch
    return range(first + worker, first + batches_per_epoch, max(1, num_workers))


class MicroBatchDataset(IterableDataset):
    """Iterable of whole micro-batches; each worker yields its share of the rank's epoch.

    Args:
        builder: Object with ``build(micro_batch, epoch) -> batch dict`` (shards or synthetic).
        start_micro_batch: Micro-batch index of the first batch (the resume position).
        batches_per_epoch: Batches per rank per epoch.
        num_streams: ``cfg.streams`` of the stream access, which must be a multiple of the DataLoader's
            num_workers; None where batches have no streams (indexed access, synthetic backend).
    """

    def __init__(self, builder, *, start_micro_batch: int, batches_per_epoch: int,
                 num_streams: int | None = None) -> None:
        super().__init__()
        self.builder, self.start, self.batches_per_epoch = builder, start_micro_batch, batches_per_epoch
        self.num_streams = num_streams
        self._epoch = 0  # counted per process: persistent workers keep their own copy

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 0)
        if self.num_streams is not None and self.num_streams % max(1, num_workers):
            raise ConfigError(f"data.num_streams={self.num_streams} must be a multiple of "
                              f"num_workers={num_workers}")
        epoch, self._epoch = self._epoch, self._epoch + 1
        for m in worker_micro_batches(self.start, epoch, self.batches_per_epoch, worker, num_workers):
            yield self.builder.build(m, epoch)


def build_train_dataloader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, phase_fn: PhaseFn,
                           phases: Sequence[str] = PHASES, start_micro_batch: int = 0,
                           resume_count: int = 0, shard_urls: list[list[str]] | None = None,
                           indexes: list[SourceIndex] | None = None, plan: SourcePlan | None = None,
                           origin: OrderOrigin | None = None,
                           recipes: list[DegradationPreset | None] | None = None) -> DataLoader:
    """Check the sources and build the training DataLoader of one rank.

    Args:
        cfg: Data section.
        rank: This rank.
        world_size: Number of ranks.
        phase_fn: Micro-batch index -> "consistency" / "detail" (e.g. ``SchedulePhase``).
        phases: Phases the schedule uses (each needs a source weight > 0).
        start_micro_batch: First micro-batch index (resume position).
        resume_count: Number of resumes so far (stream access: fresh stream per resume).
        shard_urls: Result of an earlier ``load_shard_urls`` (skips re-reading the manifests).
        indexes: Result of an earlier ``index_shard_sets`` (indexed access; skips re-indexing).
        plan: The sources of the micro-batches (indexed access; built from ``phase_fn`` when None).
        origin: Where the current global batch took over the order (indexed access; default: the start).
        recipes: Per source, its online-LQ recipe or None (``source_recipes``; read from the config if None).

    Returns:
        ``DataLoader(batch_size=None)`` yielding ``cfg.batches_per_epoch`` batch dicts per epoch.
    """
    check_phase_weights(cfg, phases)
    num_streams = None
    if cfg.backend == "shards" and recipes is None:
        recipes = source_recipes(cfg)
    if cfg.backend == "synthetic":
        from dlightning.data.synthetic import SyntheticBatchBuilder

        builder = SyntheticBatchBuilder(cfg, rank=rank, phase_fn=phase_fn)
    elif cfg.access == "indexed":
        from dlightning.data.indexed import IndexedBatchBuilder

        urls = shard_urls if shard_urls is not None else load_shard_urls(cfg, world_size=world_size)
        plan = plan or SourcePlan(cfg, phase_fn)
        plan.counts_before(start_micro_batch)  # computed once here, before workers inherit the plan
        builder = IndexedBatchBuilder(cfg, indexes if indexes is not None else index_shard_sets(cfg, urls),
                                      plan=plan, origin=origin or OrderOrigin(), rank=rank, world_size=world_size,
                                      recipes=recipes)
    else:
        urls = shard_urls if shard_urls is not None else load_shard_urls(cfg, world_size=world_size)
        builder = ShardBatchBuilder(cfg, urls, rank=rank, world_size=world_size, phase_fn=phase_fn,
                                    resume_count=resume_count, recipes=recipes)
        num_streams = cfg.streams
    dataset = MicroBatchDataset(builder, start_micro_batch=start_micro_batch,
                                batches_per_epoch=cfg.batches_per_epoch, num_streams=num_streams)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      persistent_workers=cfg.num_workers > 0, worker_init_fn=_init_worker)


WORKER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""SLURM's pre-emption signals. SLURM sends them to every process of a task, workers included; the
trainer decides what they mean (a checkpoint at the next step boundary), so a worker must not die of
them, or the trainer fails with "DataLoader worker ... killed by signal" before it can save."""


def ignore_preemption_signals_in_worker() -> None:
    """Set the pre-emption signals to ``SIG_IGN`` in this (worker) process.

    It replaces torch's worker SIGTERM handler, which exits quietly only for its parent's SIGTERM. A
    worker that outlives its trainer still ends on its own: it polls for the parent's death.
    """
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _init_worker(worker_id: int) -> None:
    ignore_preemption_signals_in_worker()
    # Decoding runs in many workers at once; one OpenCV/torch thread each avoids oversubscription.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)

"""Config section of the training data loader."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlightning.contracts.config_io import check_choice
from dlightning.errors import ConfigError

LQ_MODES: tuple[str, ...] = ("baked", "online")
ONLINE_CODEC_MODES: tuple[str, ...] = ("cpu", "skip")
"""How a video-codec step drawn by an online recipe runs: on the host with PyAV, or left out (1.8)."""


@dataclass
class SourceConfig:
    """One shard set (a folder with shards and manifest.json, see docs/INTERFACES.md)."""

    path: str = ""
    weight_consistency: float = 1.0
    """Mixing weight of this source in the consistency phase (0 = never)."""
    weight_detail: float = 0.0
    """Mixing weight of this source in the detail phase (0 = never)."""
    lq: str = "baked"
    """baked: the LQ frames stored in the shards; online: the loader reads HR only and the LQ is made on
    the training device each time a clip is read, with fresh parameters per (seed, sample, epoch)
    (docs/DATA.md 1.8). A shard set built with ``lq=online`` holds no LQ and needs ``online``."""
    preset: str = ""
    """Online LQ only: the degradation preset (realesrgan / dloral_mild / video); '' takes the recipe
    recorded in the shard set's manifest (the build's ``degradation`` section)."""

    def __post_init__(self) -> None:
        if self.weight_consistency < 0 or self.weight_detail < 0:
            raise ConfigError("data.sources[].weight_consistency / weight_detail must be >= 0")
        check_choice("data.sources[]", "lq", self.lq, LQ_MODES)
        if self.preset and self.lq != "online":
            raise ConfigError(f"data.sources[].preset={self.preset!r} applies to online LQ only; set "
                              "data.sources[].lq=online with it, or leave preset empty for baked LQ")


@dataclass
class DataConfig:
    """WebDataset loader: clips, crops, augmentation, phase-aware mixing."""

    backend: str = "shards"
    """shards: WebDataset shard sets in ``sources``; synthetic: in-memory random clips (smoke tests)."""
    access: str = "indexed"
    """How shards are read. indexed: random access through an index of the tar members built at start-up,
    one global sample order per source, a resume continues it exactly at any num_workers and world size
    (docs/DATA.md 2.3). stream: webdataset's sequential pipeline for storage without random access; a
    resume draws a fresh stream (docs/DATA.md 2.6)."""
    sources: list[SourceConfig] = field(default_factory=list)
    frames: int = 3
    """Frames per training clip (windows (0,1), (1,2), ...)."""
    crop_size: int = 512
    """HR crop side; the LQ crop is crop_size / scale, aligned."""
    scale: int = 4
    batch_size: int = 1
    """Clips per GPU per micro-batch."""
    num_workers: int = 2
    shuffle_buffer: int = 64
    """Stream access: samples in each stream's shuffle buffer."""
    augment: bool = True
    """Per-clip flips and 90-degree rotations, the same for every frame of the clip."""
    batches_per_epoch: int = 1000
    """Batches every rank yields per (virtual) epoch; equal on all ranks by construction."""
    seed: int = 0
    """Base data seed; ranks, workers and resumes derive their own from it."""
    resampled: bool = True
    """Stream access only. True: every stream draws shards with replacement (no node split needed, equal batch counts by
    construction). False: each rank reads a disjoint shard subset (split by node, then by stream), each
    stream cycling through its shards in a fresh random order every pass."""
    num_streams: int = 0
    """Stream access only. Independent sample streams per rank and source (0 = max(1, num_workers)).
    Micro-batch m is drawn from stream m % num_streams, so batch contents depend on this value and the
    seeds but not on num_workers; it must be a multiple of num_workers."""
    max_consecutive_skips: int = 1000
    """Stop with an error after this many bad samples/shards in a row from one source (data unusable)."""
    online_codec: str = "cpu"
    """Sources with ``lq=online`` whose recipe draws a video codec (the ``video`` preset): cpu runs the
    PyAV codec on the host between the device steps (the offline codec exactly); skip leaves it out."""

    def __post_init__(self) -> None:
        check_choice("data", "backend", self.backend, ("shards", "synthetic"))
        check_choice("data", "access", self.access, ("indexed", "stream"))
        check_choice("data", "online_codec", self.online_codec, ONLINE_CODEC_MODES)
        if self.frames < 2:
            raise ConfigError("data.frames must be >= 2 (the generator needs a previous frame)")
        if self.crop_size % (self.scale * 8):
            raise ConfigError(f"data.crop_size={self.crop_size} must be a multiple of 8 * data.scale")
        for key in ("batch_size", "batches_per_epoch", "shuffle_buffer", "max_consecutive_skips"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1")
        if self.num_workers < 0 or self.num_streams < 0:
            raise ConfigError("data.num_workers and data.num_streams must be >= 0")
        if self.num_streams and self.num_workers and self.num_streams % self.num_workers:
            raise ConfigError(f"data.num_streams={self.num_streams} must be a multiple of "
                              f"data.num_workers={self.num_workers} (or 0 for num_workers streams)")

    @property
    def streams(self) -> int:
        """Effective number of sample streams per rank and source."""
        return self.num_streams or max(1, self.num_workers)

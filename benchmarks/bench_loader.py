"""Loader throughput: 3-frame 512x512 clips (HR PNG 512x512 + LQ 128x128) from local shards.

Writes ~40 synthetic clips (smooth textures, like real frames compress) into a temporary shard set,
then times the training loader with 0 workers (decoding in the main process) and 1 worker, for the
indexed access (random access through the start-up tar index, the default) and the stream access
(webdataset's sequential pipeline), and reports clips/s per worker process (= per CPU core), plus the
start-up index cost per tar member. docs/DESIGN.md target: >= 20 clips/s per core.

Usage: python benchmarks/bench_loader.py [--clips 40] [--batches 60] [--access indexed stream] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import results_path  # noqa: E402

from dlightning.contracts.shard_format import (
    CAPTION_FIELD,
    HR,
    LQ,
    MANIFEST_NAME,
    META_FIELD,
    encode_png,
    frame_field,
    manifest_document,
    shard_file_name,
)
from dlightning.data.config import DataConfig, SourceConfig
from dlightning.data.loader import build_train_dataloader
from dlightning.data.synthetic import synthetic_clip
from dlightning.data.tar_index import index_source


def write_shards(folder: Path, clips: int, per_shard: int = 10) -> int:
    """Write the benchmark shard set; returns the mean HR+LQ PNG bytes per clip."""
    rng = np.random.default_rng(0)
    files, total = [], 0
    for s in range(0, clips, per_shard):
        name = shard_file_name("bench", s // per_shard)
        with wds.TarWriter(str(folder / name), mtime=0) as sink:
            for j in range(s, min(clips, s + per_shard)):
                hr, lq = synthetic_clip(rng, frames=3, size=512, scale=4)
                sample = {"__key__": f"bench_{j:04d}", CAPTION_FIELD: b""}
                for i in range(3):
                    sample[frame_field(HR, i)], sample[frame_field(LQ, i)] = encode_png(hr[i]), encode_png(lq[i])
                total += sum(len(v) for k, v in sample.items() if k.endswith(".png"))
                meta = {"kind": "video", "num_frames": 3, "hr_size": [512, 512], "lq_size": [128, 128],
                        "scale": 4}
                sample[META_FIELD] = json.dumps(meta).encode()
                sink.write(sample)
        files.append(name)
    manifest = [{"file": f, "samples": per_shard, "bytes": (folder / f).stat().st_size,
                 "sha256": hashlib.sha256((folder / f).read_bytes()).hexdigest()} for f in files]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest_document({}, manifest)))
    return total // clips


def measure(folder: Path, access: str, workers: int, batches: int) -> float:
    """Clips per second after a warm-up of 5 batches (worker start-up, index and buffer fill excluded)."""
    cfg = DataConfig(sources=[SourceConfig(path=str(folder))], access=access, frames=3, crop_size=512, scale=4,
                     batch_size=1, num_workers=workers, shuffle_buffer=8, batches_per_epoch=batches + 5, seed=0)
    it = iter(build_train_dataloader(cfg, phase_fn=lambda m: "consistency", phases=["consistency"]))
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def index_cost(folder: Path, repeats: int = 20) -> tuple[float, int]:
    """Microseconds per tar member to index the shard set's headers, and the member count."""
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    start = time.perf_counter()
    for _ in range(repeats):
        index = index_source(urls)
    members = len(index.member_offset)
    return (time.perf_counter() - start) / repeats / members * 1e6, members


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--results", default=None, help="markdown file to append to (default RESULTS.md)")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1], help="loader worker counts")
    parser.add_argument("--access", nargs="+", default=["indexed", "stream"], choices=["indexed", "stream"],
                        help="data.access values to time")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        png_bytes = write_shards(folder, args.clips)
        rows = [(a, w, measure(folder, a, w, args.batches)) for a in args.access for w in args.workers]
        per_member, members = index_cost(folder)
    lines = [
        f"### bench_loader ({datetime.date.today().isoformat()})",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared); "
        f"python {platform.python_version()}, torch {torch.__version__}, opencv {cv2.__version__}, "
        f"webdataset {wds.__version__ if hasattr(wds, '__version__') else '1.0.2'}",
        f"clips: 3 frames, HR 512x512 + LQ 128x128 PNG ({png_bytes / 1e6:.2f} MB per clip), crop 512, "
        f"augment on, {args.batches} timed batches of 1 clip; indexed start-up: {per_member:.1f} us per tar "
        f"member to index the headers ({members} members)",
        "",
        "| access | num_workers | clips/s | clips/s per core | target |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {w} | {rate:.1f} | {rate:.1f} | >= 20 |" for a, w, rate in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_append:
        with open(results_path(args.results), "a") as fh:
            fh.write("\n" + table)


if __name__ == "__main__":
    main()

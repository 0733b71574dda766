"""Data benchmarks in one command: the loader (``bench_loader.py``) and the degradation
(``bench_data_prep.py``), each appending its own table.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--quick] [--results PATH] [--no-append]

``--quick`` shrinks both to a smoke run (few clips, 0 workers); its figures are not targets.
docs/DESIGN.md targets: >= 20 three-frame 512x512 clips/s per core from local shards; data_prep degrades
such a clip (second-order degradation plus codec) in < 100 ms on one core.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data_prep  # noqa: E402
import bench_loader  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Run both data benchmarks with shared ``--results`` / ``--no-append``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few clips, loader without workers")
    parser.add_argument("--results", default=None, help="markdown file to append to (default RESULTS.md)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    common = ["--results", args.results] if args.results else []
    common += ["--no-append"] if args.no_append else []
    loader = ["--clips", "4", "--batches", "3", "--workers", "0", "--online", "realesrgan"] if args.quick else []
    prep = ["--clips", "1"] if args.quick else []
    bench_loader.main(loader + common)
    bench_data_prep.main(prep + common)


if __name__ == "__main__":
    main()

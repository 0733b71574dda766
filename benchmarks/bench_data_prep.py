"""Seconds per clip per core of the offline degradation, per preset (docs/DESIGN.md target: < 100 ms
for a 3-frame 512x512 clip with codec).

    OMP_NUM_THREADS=1 python benchmarks/bench_data_prep.py [--clips 20] [--no-append]

Single process, OpenCV threads 1. HR clips are camera-path renders of skimage's astronaut. Times
``sample_params + degrade_clip`` (the per-clip work of data_prep besides PNG encoding, which is
timed separately). Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import results_path  # noqa: E402


def _clip(seed: int) -> np.ndarray:
    from dlightning.shards.camera_path import CameraPathConfig, render_camera_path, sample_camera_path
    from dlightning.shards.sources import demo_image

    image = demo_image("astronaut")
    image = cv2.resize(image, (768, 768), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    path = sample_camera_path(rng, 3, image.shape[:2], (512, 512), CameraPathConfig())
    return render_camera_path(image, path, (512, 512))


def _time_preset(name: str, clips: list[np.ndarray]) -> tuple[float, float]:
    from dlightning.degradation.operators import degrade_clip
    from dlightning.degradation.presets import get_preset
    from dlightning.degradation.sampling import sample_params

    preset = get_preset(name)
    times = []
    for i, hr in enumerate(clips):
        rng = np.random.default_rng(i)
        start = time.perf_counter()
        degrade_clip(hr, sample_params(preset, rng), 4, rng)
        times.append(time.perf_counter() - start)
    return float(np.mean(times)), float(np.median(times))


def _time_png(clips: list[np.ndarray]) -> float:
    from dlightning.contracts.shard_format import encode_png

    start = time.perf_counter()
    for hr in clips:
        for frame in hr:
            encode_png(frame)
    return (time.perf_counter() - start) / len(clips)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table and append it to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--results", default=None, help="markdown file to append to (default RESULTS.md)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    import av
    import scipy

    from dlightning.degradation.presets import PRESETS

    clips = [_clip(i) for i in range(args.clips)]
    rows = [(name, *_time_preset(name, clips)) for name in sorted(PRESETS)]
    png = _time_png(clips)
    lines = [
        f"### data_prep degradation, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''} ({platform.node()}), "
        f"{os.cpu_count()} CPUs, 1 process, cv2 threads 1; python {platform.python_version()}, "
        f"numpy {np.__version__}, opencv {cv2.__version__}, PyAV {av.__version__}, "
        f"scipy {scipy.__version__}. Clips: {args.clips} x 3 frames 512x512 HR, scale 4.",
        "",
        "| preset | mean s/clip/core | median s/clip/core |",
        "|---|---|---|",
        *[f"| {name} | {mean:.4f} | {median:.4f} |" for name, mean, median in rows],
        f"| (PNG encode of the 3 HR frames, level 1) | {png:.4f} | |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results = results_path(args.results)
        with open(results, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

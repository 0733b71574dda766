"""The Python API example of README.md runs as printed there, and does what it says."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import av
import cv2
import numpy as np
from helpers.media import randomized_generator, smooth_frames, write_video

from dlightning.export import export_generator

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_api_example() -> str:
    """The first ``python`` code block of the README's "Python API" section."""
    text = README.read_text()
    section = text[text.index("\n## Python API\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README's Python API section has no python block"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch) -> None:
    export_generator(copy.deepcopy(randomized_generator()), tmp_path / "my_export")
    # Few, small frames: the example's default settings enlarge them to a 128-pixel short side first.
    lq = smooth_frames(2, 16, 20, seed=1)
    write_video(tmp_path / "input.mp4", lq[:1], fps=5)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(lq):
        cv2.imwrite(str(tmp_path / "frames" / f"{i:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_api_example(), "README.md (Python API)", "exec"), namespace)  # noqa: S102 - our README
    with av.open(str(tmp_path / "output.mp4")) as container:
        video = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(video) == 1 and video[0].shape == (64, 80, 3)  # x4 of the tiny model
    upscaled = namespace["upscaled"]
    assert len(upscaled) == 2 and all(f.shape == (64, 80, 3) and f.dtype == np.uint8 for f in upscaled)

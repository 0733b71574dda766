"""`export`, then `upscale` and `validate` of that export, print no warning at the default verbosity.

Each command runs as its own process through the console script, as a user runs it, so every once-per-process
message (an import-time warning, a library's first-use notice) shows up in the command that causes it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from helpers.media import randomized_generator, smooth_frames, tiny_model_config, write_video
from helpers.run_checkpoint import write_run_checkpoint

CLI = Path(sys.executable).parent / "dlightning"
NOISE = ("Resuming from", "kept in float32", "Setting accelerator", "random weights", "Writing model shards",
         "Loading weights", "Tip:")
"""Messages the commands printed before (besides anything with "warn" in it)."""


def _run(*args: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([str(CLI), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (proc.stdout + proc.stderr).splitlines()


def _noise(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search("warn", line, re.IGNORECASE) or any(n in line for n in NOISE)]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quiet")
    gt = smooth_frames(3, 64, 80, seed=3)
    lq = [cv2.resize(f, (20, 16), interpolation=cv2.INTER_AREA) for f in gt]
    for sub, frames in (("lq", lq), ("gt", gt)):
        (root / sub).mkdir()
        write_video(root / sub / "clip.mp4", frames, fps=6)
    write_run_checkpoint(randomized_generator(), root / "run", tiny_model_config(), step=3)
    return root


def test_export_upscale_and_validate_of_an_export_print_no_warning(media: Path) -> None:
    export = media / "export"
    printed = {"export": _run("export", "--checkpoint", str(media / "run"), "--out", str(export))}
    printed["upscale"] = _run("upscale", str(media / "lq" / "clip.mp4"), "-o", str(media / "up.mp4"), "--model",
                              str(export), "--min-short-side", "0")
    # LPIPS and the SPyNet flow metric would warn, rightly, that they have no weights here: the metrics that
    # need none are chosen.
    printed["validate"] = _run("validate", "--checkpoint", str(export), "--out", str(media / "val"), "--lq-dir",
                               str(media / "lq"), "--gt-dir", str(media / "gt"), "validation.compute_lpips=false",
                               "validation.flow_net=farneback", "validation.upscale.min_short_side=0")
    assert {verb: _noise(lines) for verb, lines in printed.items()} == {"export": [], "upscale": [], "validate": []}
    assert any("val/psnr" in line for line in printed["validate"])
    # The export's step names the validation folder.
    assert (media / "val" / "validation" / "step-00000003" / "metrics.json").is_file()


def test_validate_of_an_export_needs_an_output_folder(tmp_path: Path) -> None:
    from dlightning.cli import main
    from dlightning.contracts import export_format

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / export_format.METADATA_FILE).write_text("{}")
    assert main(["validate", "--checkpoint", str(tmp_path / "e"), "--lq-dir", str(tmp_path)]) == 2

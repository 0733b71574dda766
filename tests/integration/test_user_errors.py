"""Hostile inputs through ``dlightning.cli.main``: nothing the user owns is lost, and every bad input ends
with one line naming the problem and the fix and exit code 2 (no traceback), before heavy work starts.

Each test runs the tiny model on a few frames. A test that must not reach the model swaps the loader
(or the generator restore) for one that fails the test, so "refused before the model loads" is checked,
not assumed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest
import torch
from helpers.media import randomized_generator, smooth_frames, tiny_model_config, write_video
from helpers.paths import CONFIGS, REPO

from dlightning.cli import main
from dlightning.export import export_generator

USAGE_ERROR = 2
FAST = ["--min-short-side", "0", "--batch-windows", "2"]


@pytest.fixture(scope="module")
def gen():
    return randomized_generator()


@pytest.fixture(scope="module")
def model(gen, tmp_path_factory) -> Path:
    return export_generator(copy.deepcopy(gen), tmp_path_factory.mktemp("exp") / "model")


@pytest.fixture
def errors():
    """The ERROR lines the ``dlightning`` loggers printed during the test, joined."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    root = logging.getLogger("dlightning")
    root.addHandler(handler)
    yield lambda: "\n".join(r.getMessage() for r in records)
    root.removeHandler(handler)


def _frames_folder(path: Path, n: int = 3, h: int = 16, w: int = 16) -> Path:
    path.mkdir(parents=True)
    for i, f in enumerate(smooth_frames(n, h, w)):
        cv2.imwrite(str(path / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _upscale(inp: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["upscale", str(inp), "-o", str(out), "--model", str(model), *FAST, *extra])


def _interrupted(argv: list[str]) -> int | str:
    """``main(argv)``, with a KeyboardInterrupt that escapes it reported instead of ending pytest."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped main()"


def _no_model(*_args, **_kwargs):
    raise AssertionError("the model was loaded although the input should have been refused first")


# ------------------------------------------------------------------------------------------ upscale
def test_upscale_into_an_existing_folder_is_refused_and_keeps_its_files(model, tmp_path, errors):
    frames = _frames_folder(tmp_path / "frames")
    video = write_video(tmp_path / "in.mp4", smooth_frames(3, 16, 16), fps=5)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("do not delete")
    (keep / "holiday.png").write_bytes(b"not even a png")
    before = _snapshot(keep)
    for inp in (frames, video):
        assert _upscale(inp, keep, model) == USAGE_ERROR
        assert "non-empty folder" in errors() and "--overwrite" in errors()
        assert _snapshot(keep) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "in.mp4", "mine"]


@pytest.mark.parametrize("case", ["frames_onto_itself", "video_onto_itself", "video_into_its_folder",
                                  "frames_into_their_parent", "inside_the_input_folder",
                                  "videos_folder_onto_itself"])
def test_upscale_never_writes_over_or_into_its_input(model, tmp_path, errors, case):
    frames = _frames_folder(tmp_path / "src" / "frames")
    video = write_video(tmp_path / "src" / "in.mp4", smooth_frames(3, 16, 16), fps=5)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", smooth_frames(2, 16, 16), fps=5)
    inp, out = {
        "frames_onto_itself": (frames, frames),
        "video_onto_itself": (video, video),
        "video_into_its_folder": (video, video.parent),
        "frames_into_their_parent": (frames, frames.parent),
        "inside_the_input_folder": (frames, frames / "up"),
        "videos_folder_onto_itself": (videos, videos),
    }[case]
    before = _snapshot(tmp_path)
    # --overwrite does not change it: the input is never an output.
    assert _upscale(inp, out, model, "--overwrite") == USAGE_ERROR
    assert "input" in errors() and "choose" in errors()
    assert _snapshot(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_overwrite_replaces_only_upscales_own_frames(model, tmp_path):
    frames = _frames_folder(tmp_path / "frames", n=3)
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):  # an older, longer run's frames
        (out / f"frame_{i:06d}.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    (out / "frame_1.png").write_bytes(b"mine too: not named like upscale's frames")
    assert _upscale(frames, out, model, "--overwrite") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["frame_000000.png", "frame_000001.png", "frame_000002.png", "frame_1.png", "notes.txt"]
    assert all(cv2.imread(str(out / f"frame_{i:06d}.png")).shape == (64, 64, 3) for i in range(3))
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob("*.tmp-*"))


def test_existing_video_needs_overwrite_and_is_replaced_whole(model, tmp_path, errors):
    video = write_video(tmp_path / "in.mp4", smooth_frames(3, 16, 16), fps=5)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an older result")
    assert _upscale(video, out, model) == USAGE_ERROR
    assert "exists" in errors() and "--overwrite" in errors()
    assert out.read_bytes() == b"an older result"
    assert _upscale(video, out, model, "--overwrite") == 0
    from dlightning.inference.video_io import read_video_info

    assert read_video_info(out)[:4] == (3, 5, 64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_folder_of_videos_gives_a_folder_and_refuses_clashing_stems(model, tmp_path, errors):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", smooth_frames(2, 16, 16), fps=5)
    write_video(videos / "b.mkv", smooth_frames(2, 16, 16), fps=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "readme.txt").write_text("mine")
    assert _upscale(videos, out, model) == 0  # a folder with other files: only <stem>.mp4 is written
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4", "readme.txt"]
    assert _upscale(videos, out, model) == USAGE_ERROR  # a.mp4 exists now
    assert "a.mp4 exists" in errors()
    write_video(videos / "a.mkv", smooth_frames(2, 16, 16), fps=5)
    assert _upscale(videos, tmp_path / "other", model) == USAGE_ERROR
    assert "would both be written to" in errors()
    assert _upscale(videos, tmp_path / "one.mp4", model) == USAGE_ERROR
    assert "folder of videos" in errors()
    assert not (tmp_path / "other").exists() and not (tmp_path / "one.mp4").exists()


def test_frame_folder_to_a_video_name_is_refused_before_the_model_loads(model, tmp_path, errors, monkeypatch):
    monkeypatch.setattr("dlightning.inference.exported.load_exported", _no_model)
    frames = _frames_folder(tmp_path / "frames")
    assert _upscale(frames, tmp_path / "out.mp4", model) == USAGE_ERROR
    assert "no frame rate" in errors()


@pytest.mark.parametrize("output", ["video", "frames"])
def test_ctrl_c_leaves_no_partial_output(model, tmp_path, monkeypatch, errors, output):
    from dlightning.inference import pipeline

    real = pipeline.Upscaler.upscale_frames

    def interrupted_after_one_frame(self, frames):
        yield next(iter(real(self, frames)))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Upscaler, "upscale_frames", interrupted_after_one_frame)
    video = write_video(tmp_path / "in.mp4", smooth_frames(3, 16, 16), fps=5)
    out = tmp_path / ("out.mp4" if output == "video" else "out")
    argv = ["upscale", str(video), "-o", str(out), "--model", str(model), *FAST]
    assert _interrupted(argv) == 130
    assert "interrupted" in errors()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


_SLOW_UPSCALE = textwrap.dedent("""
    import sys, time
    from dlightning.inference import pipeline

    real = pipeline.Upscaler.upscale_frames

    def slow(self, frames):
        for i, frame in enumerate(real(self, frames)):
            yield frame
            if i == 0:  # the first frame is in the temporary output: now is the time to be stopped
                print("FIRST FRAME WRITTEN", flush=True)
                time.sleep(120)

    pipeline.Upscaler.upscale_frames = slow
    from dlightning.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_leaves_no_partial_output_and_exits_cleanly(model, tmp_path):
    """A real SIGTERM to a real process (both writers' clean-up paths are covered by the Ctrl-C test)."""
    video = write_video(tmp_path / "in.mp4", smooth_frames(3, 16, 16), fps=5)
    out = tmp_path / "out.mp4"
    driver = tmp_path.parent / f"{tmp_path.name}_driver.py"
    driver.write_text(_SLOW_UPSCALE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(driver), "upscale", str(video), "-o", str(out), "--model",
                             str(model), *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if "FIRST FRAME WRITTEN" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_min_short_side_and_huge_frames_are_refused_before_the_model_loads(model, tmp_path, errors, monkeypatch):
    monkeypatch.setattr("dlightning.inference.exported.load_exported", _no_model)
    video = write_video(tmp_path / "in.mp4", smooth_frames(2, 16, 16), fps=5)
    base = ["upscale", str(video), "-o", str(tmp_path / "o.mp4"), "--model", str(model)]
    assert main([*base, "--min-short-side", "200000"]) == USAGE_ERROR
    assert "min_short_side" in errors()
    # Allowed by the config, but 16x16 enlarged to 4096x4096 and x4 is a 16384x16384 frame.
    assert main([*base, "--min-short-side", "4096"]) == USAGE_ERROR
    assert "16384x16384" in errors() and "lower --min-short-side" in errors()
    # A thin strip: short side 128 -> a 25600-pixel long side at x4.
    strip = write_video(tmp_path / "strip.mp4", smooth_frames(2, 8, 400), fps=5)
    assert main(["upscale", str(strip), "-o", str(tmp_path / "s.mp4"), "--model", str(model)]) == USAGE_ERROR
    assert "25600x512" in errors()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "strip.mp4"]


# ------------------------------------------------------------------------------------------ export
def _checkpoint(gen, path: Path) -> Path:
    from dlightning.config import RootConfig, to_container

    trainable = {f"generator.{n}": p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}
    torch.save({"state_dict": trainable,
                "dlightning": {"config": to_container(RootConfig(model=tiny_model_config())),
                               "optimizer_step": 3}}, path)
    return path


class _Refused:
    """Not a tensor or plain type: ``torch.load(weights_only=True)`` refuses to unpickle it."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("damage", ["truncated", "empty", "refused_pickle", "not_a_checkpoint"])
def test_export_of_a_damaged_checkpoint_is_one_line_exit_2(gen, tmp_path, errors, damage):
    ckpt = tmp_path / "bad.ckpt"
    if damage == "truncated":
        data = _checkpoint(gen, tmp_path / "good.ckpt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "refused_pickle":
        torch.save({"state_dict": {}, "payload": _Refused()}, ckpt)
    else:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]) == USAGE_ERROR
    assert str(ckpt) in errors() and "\n" not in errors()
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob("e.tmp*"))


def test_export_target_is_checked_before_the_model_is_built(gen, tmp_path, errors, monkeypatch):
    ckpt = _checkpoint(gen, tmp_path / "step.ckpt")
    out = tmp_path / "e"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    before = _snapshot(out)
    monkeypatch.setattr("dlightning.export.restore_generator", _no_model)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == USAGE_ERROR
    assert "already holds an export" in errors() and "--overwrite" in errors()
    assert _snapshot(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):  # a folder that is not an export is never replaced
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(mine), *extra]) == USAGE_ERROR
        assert "thesis.tex" in errors() and "not a dlightning export" in errors()
    (out / "notes.txt").write_text("added by the user")  # an export with a user's file in it: kept too
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == USAGE_ERROR
    assert (out / "notes.txt").read_text() == "added by the user"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt)]) == USAGE_ERROR
    assert "is a file" in errors()
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "mine", "step.ckpt"]


def test_export_overwrite_replaces_an_export_and_ctrl_c_leaves_nothing(gen, tmp_path, monkeypatch):
    ckpt = _checkpoint(gen, tmp_path / "step.ckpt")
    out = tmp_path / "e"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--overwrite", "--consistency-only"]) == 0
    assert json.loads((out / "dlightning_export.json").read_text())["fused_families"]["detail"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "step.ckpt"]  # no .tmp-/.old- siblings

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dlightning.export.fuse_families", interrupted)
    assert _interrupted([*argv, "--overwrite"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "step.ckpt"]
    assert json.loads((out / "dlightning_export.json").read_text())["fused_families"]["detail"] == 0


# ------------------------------------------------------------------------------------------ shards
SHARDS_DEMO = [f"--config={CONFIGS / 'data_prep' / 'demo.yaml'}", "num_frames=2", "hr_size=[32,32]",
               "progress=false", "sources.0.images=[astronaut]"]


def test_shards_build_into_a_file_or_a_foreign_manifest_is_exit_2(tmp_path, errors):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert main(["shards", "build", *SHARDS_DEMO, f"output_dir={target}"]) == USAGE_ERROR
    assert "is a file" in errors() and "output_dir=" in errors()
    assert target.read_text() == "mine"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"my": "project manifest"}')
    assert main(["shards", "build", *SHARDS_DEMO, f"output_dir={folder}"]) == USAGE_ERROR
    assert "not a shard set" in errors()
    assert (folder / "manifest.json").read_text() == '{"my": "project manifest"}'


def test_shards_build_keeps_other_files_and_survives_a_damaged_done_record(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "other.tar").write_bytes(b"mine too")
    assert main(["shards", "build", *SHARDS_DEMO, f"output_dir={out}"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "other.tar").read_bytes() == b"mine too"
    record = next((out / ".progress").glob("*.json"))
    record.write_text("{truncated")
    assert main(["shards", "build", *SHARDS_DEMO, f"output_dir={out}"]) == 0  # that shard is rebuilt
    assert json.loads(record.read_text())["file"] == record.stem
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("manifest", ["{not json", '{"version": 1, "shards": [{"file": "../x.tar", '
                                      '"samples": 1, "bytes": 1, "sha256": "0"}]}', "[]"])
def test_shards_verify_of_a_corrupt_manifest_is_exit_2(tmp_path, errors, manifest):
    (tmp_path / "x.tar").write_bytes(b"outside the set")
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "manifest.json").write_text(manifest)
    assert main(["shards", "verify", str(folder)]) == USAGE_ERROR
    assert "manifest.json" in errors() and "rebuild the shard set" in errors()


def test_unwritable_output_folders_are_refused_up_front(model, tmp_path, errors):
    video = write_video(tmp_path / "in.mp4", smooth_frames(2, 16, 16), fps=5)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    assert _upscale(video, blocker / "out.mp4", model) == USAGE_ERROR
    assert "is a file, not a folder" in errors()
    assert main(["shards", "build", *SHARDS_DEMO, f"output_dir={blocker / 'set'}"]) == USAGE_ERROR
    assert blocker.read_text() == "a file where a folder is needed"


def test_frames_of_the_output_are_named_like_overwrite_expects(model, tmp_path):
    """The names ``--overwrite`` replaces are the names upscale writes (one definition)."""
    from dlightning.inference.video_io import FRAME_NAME, is_frame_name

    frames = _frames_folder(tmp_path / "frames", n=2)
    assert _upscale(frames, tmp_path / "out", model) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [FRAME_NAME.format(0), FRAME_NAME.format(1)] and all(map(is_frame_name, names))
    assert not is_frame_name("frame_1.png") and not is_frame_name("frame_000001.png.bak")
    assert cv2.imread(str(tmp_path / "out" / names[0])).shape == (64, 64, 3)

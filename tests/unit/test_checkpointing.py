"""Atomic checkpoint writes, the resume-path resolver, StepCheckpoint and the stable W&B run id."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.paths import HELPERS

from dlightning.contracts import checkpoint_format as fmt
from dlightning.contracts.checkpoint_format import list_valid_checkpoints, resolve_resume_checkpoint
from dlightning.errors import ConfigError
from dlightning.tracking.loggers import stable_run_id
from dlightning.training import checkpointing as ck
from dlightning.training.checkpointing import AtomicCheckpointIO, StepCheckpoint


def _ckpt(step: int, **extra: object) -> dict:
    """A minimal checkpoint with the keys the resolver requires."""
    return {
        "state_dict": {"w": torch.full((3,), float(step))},
        "optimizer_states": [{"state": {}}],
        "dlightning": {"optimizer_step": step},
        **extra,
    }


def _write(folder: Path, name: str, ckpt: dict, mtime: float | None = None) -> Path:
    path = folder / name
    torch.save(ckpt, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    return folder


# Each case: files to create (name, step or a corruption kind, mtime offset) -> expected winner.
RESOLVER_CASES = {
    "step_wins_by_counter": (
        [("hpc_ckpt_1.ckpt", 10, 5), ("step-00000020.ckpt", 20, 0), ("last.ckpt", 15, 9)],
        "step-00000020.ckpt",
    ),
    "hpc_newer_than_last": ([("hpc_ckpt_3.ckpt", 40, 1), ("last.ckpt", 30, 2)], "hpc_ckpt_3.ckpt"),
    "preempt_beats_last": (
        [("preempt-00000033.ckpt", 33, 0), ("last.ckpt", 30, 5), ("on_exception.ckpt", 31, 6)],
        "preempt-00000033.ckpt",
    ),
    "tie_broken_by_mtime": ([("step-00000030.ckpt", 30, 0), ("last.ckpt", 30, 1)], "last.ckpt"),
    "exception_newest": ([("on_exception.ckpt", 50, 0), ("step-00000040.ckpt", 40, 3)], "on_exception.ckpt"),
    "truncated_newest_skipped": (
        [("step-00000060.ckpt", "truncated", 9), ("step-00000050.ckpt", 50, 0)],
        "step-00000050.ckpt",
    ),
    "tmp_ignored": (
        [("last.ckpt.tmp", 99, 9), ("step-00000099.ckpt.tmp", 99, 9), ("last.ckpt", 10, 0)],
        "last.ckpt",
    ),
    "missing_block_skipped": (
        [("last.ckpt", "no_block", 9), ("step-00000005.ckpt", 5, 0)],
        "step-00000005.ckpt",
    ),
    "pickled_object_rejected": ([("last.ckpt", "unsafe", 9), ("hpc_ckpt_1.ckpt", 1, 0)], "hpc_ckpt_1.ckpt"),
    "empty_file_skipped": ([("last.ckpt", "empty", 9)], None),
    "unrelated_names_ignored": (
        [("epoch=3-step=99.ckpt", 99, 9), ("step-00000002.ckpt", 2, 0)],
        "step-00000002.ckpt",
    ),
}


class _NotAllowed:
    """Not on torch's weights_only allow-list."""


@pytest.mark.parametrize("files,expected", list(RESOLVER_CASES.values()), ids=list(RESOLVER_CASES))
def test_resolver_picks_newest_valid(
    ckpt_dir: Path, files: list, expected: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    base = time.time() - 1000
    for name, kind, offset in files:
        if kind == "truncated":
            path = _write(ckpt_dir, name, _ckpt(60))
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            os.utime(path, (base + offset, base + offset))
        elif kind == "no_block":
            _write(ckpt_dir, name, {"state_dict": {}, "optimizer_states": []}, base + offset)
        elif kind == "unsafe":
            _write(ckpt_dir, name, _ckpt(90, extra=_NotAllowed()), base + offset)
        elif kind == "empty":
            (ckpt_dir / name).write_bytes(b"")
        else:
            _write(ckpt_dir, name, _ckpt(kind), base + offset)
    got = resolve_resume_checkpoint(ckpt_dir.parent)
    assert (Path(got).name if got else None) == expected


def test_resolver_without_folder_returns_none(tmp_path: Path) -> None:
    assert resolve_resume_checkpoint(tmp_path / "never_ran") is None


def test_resolver_warns_about_corrupt_file(ckpt_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (ckpt_dir / "last.ckpt").write_bytes(b"not a zip archive")
    fmt.log.propagate = True  # let caplog see the rank-zero logger's records
    try:
        with caplog.at_level("WARNING"):
            assert resolve_resume_checkpoint(ckpt_dir.parent) is None
    finally:
        fmt.log.propagate = False
    assert "last.ckpt" in caplog.text and "unreadable" in caplog.text


def test_atomic_io_roundtrip_and_no_leftovers(ckpt_dir: Path) -> None:
    io = AtomicCheckpointIO()
    path = ckpt_dir / "sub" / "last.ckpt"
    io.save_checkpoint(_ckpt(3), path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["dlightning"]["optimizer_step"] == 3
    assert torch.equal(loaded["state_dict"]["w"], torch.full((3,), 3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_atomic_io_fsyncs_file_and_folder(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    AtomicCheckpointIO().save_checkpoint(_ckpt(1), ckpt_dir / "last.ckpt")
    if Path("/proc/self/fd").exists():
        assert synced == [str(ckpt_dir / "last.ckpt.tmp"), str(ckpt_dir)]
    else:
        assert len(synced) == 2


@pytest.mark.parametrize("failure", ["replace", "enospc"])
def test_failed_write_keeps_previous_checkpoint(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(5), ckpt_dir / "last.ckpt")
    if failure == "replace":

        def broken_replace(src: object, dst: object) -> None:
            raise OSError(errno.EIO, "simulated rename failure")

        monkeypatch.setattr(os, "replace", broken_replace)
    else:
        real_save = torch.save

        def full_disk(obj: object, f: object, *args: object, **kwargs: object) -> None:
            real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the tmp file first
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        io.save_checkpoint(_ckpt(6), ckpt_dir / "last.ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # tmp cleaned up
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["dlightning"]["optimizer_step"] == 5
    assert resolve_resume_checkpoint(ckpt_dir.parent) == str(ckpt_dir / "last.ckpt")


_KILL_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from dlightning.training.checkpointing import AtomicCheckpointIO
    folder, stage = Path(sys.argv[1]), sys.argv[2]
    io = AtomicCheckpointIO()
    base = {"optimizer_states": [], "dlightning": {"optimizer_step": 1}}
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, **base}, folder / "last.ckpt")

    class Stall:
        # pickled after part of the checkpoint is written: announce, then wait to be killed
        def __reduce__(self):
            (folder / "stalled").write_text("1")
            time.sleep(60)
            return (int, (0,))

    if stage == "fsync":
        real = os.fsync
        def slow_fsync(fd):
            real(fd)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
                (folder / "stalled").write_text("1")
                time.sleep(60)
        os.fsync = slow_fsync
        payload = {"state_dict": {"w": torch.zeros(4), "big": torch.randn(1 << 20)}}
    else:
        payload = {"state_dict": {"big": torch.randn(1 << 20), "z": Stall()}}
    io.save_checkpoint({**payload, "optimizer_states": [], "dlightning": {"optimizer_step": 2}},
                       folder / "last.ckpt")
""")


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to find the file being synced")
@pytest.mark.parametrize("stage", ["pickling", "fsync"])
def test_kill9_during_write_keeps_previous(ckpt_dir: Path, stage: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(ckpt_dir), stage])
    try:
        deadline = time.time() + 60
        while not (ckpt_dir / "stalled").exists():
            assert proc.poll() is None, "writer exited before reaching the kill point"
            assert time.time() < deadline, "writer never reached the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpt_dir / "last.ckpt.tmp").exists()  # the interrupted write is there, but only as .tmp
    got = resolve_resume_checkpoint(ckpt_dir.parent)
    assert got == str(ckpt_dir / "last.ckpt")
    loaded = torch.load(got, weights_only=True)
    assert loaded["dlightning"]["optimizer_step"] == 1 and torch.equal(
        loaded["state_dict"]["w"], torch.ones(4)
    )


def test_step_checkpoint_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="interval"):
        StepCheckpoint(tmp_path, every=0)
    with pytest.raises(ConfigError, match="keep"):
        StepCheckpoint(tmp_path, every=1, keep=0)


def test_step_checkpoint_schedule_pruning_and_last(tmp_path: Path) -> None:
    sys.path.insert(0, str(HELPERS))
    try:
        import toy_train
    finally:
        sys.path.remove(str(HELPERS))
    folder = fmt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    torch.save(_ckpt(1), folder / "preempt-00000001.ckpt")  # superseded by later step checkpoints
    module = toy_train.train(tmp_path, max_steps=10, every=3, keep=2)
    assert module.optimizer_step == 10
    # saves at 3, 6, 9 and the final step 10; keep=2 leaves the two newest; old preempt pruned
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "step-00000009.ckpt",
        "step-00000010.ckpt",
    ]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["dlightning"]["optimizer_step"] == 10
    assert torch.equal(last["state_dict"]["layer.weight"], module.layer.weight.detach())
    assert [step for _, step in list_valid_checkpoints(tmp_path)] == [9, 10, 10]


def test_read_optimizer_step_requires_int() -> None:
    class NoCounter(torch.nn.Module):
        optimizer_step = None

    with pytest.raises(TypeError, match="optimizer_step must be an int"):
        ck.read_optimizer_step(NoCounter())  # type: ignore[arg-type]


def test_stable_run_id_survives_requeue(tmp_path: Path) -> None:
    first = stable_run_id(tmp_path / "run")
    assert first == stable_run_id(tmp_path / "run")  # a requeued job reads the same id
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == first
    assert stable_run_id(tmp_path / "other") != first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["wandb_run_id"]


def test_checkpoint_argument_file_run_folder_or_error(tmp_path):
    from dlightning.contracts.checkpoint_format import resolve_checkpoint_argument
    from dlightning.errors import MissingWeightsError

    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="without a valid checkpoint"):
        resolve_checkpoint_argument(run)
    ck.atomic_torch_save(_ckpt(3), folder / "step-00000003.ckpt")
    ck.atomic_torch_save(_ckpt(7), folder / "step-00000007.ckpt")
    assert resolve_checkpoint_argument(run) == folder / "step-00000007.ckpt"
    assert resolve_checkpoint_argument(folder / "step-00000003.ckpt") == folder / "step-00000003.ckpt"
    with pytest.raises(MissingWeightsError, match="not found"):
        resolve_checkpoint_argument(tmp_path / "nowhere")

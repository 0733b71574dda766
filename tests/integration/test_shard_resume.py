"""Exact resume on real shards (``data.access=indexed``), docs/DATA.md 2.6.

- kill -9 at a random step and a rerun give the uninterrupted run's final checkpoint bit for bit
  (trainable tensors, Adam state, counters, private RNG), with 0 and with 2 loader workers, and when
  the rerun uses another ``data.num_workers``;
- a 2-process run resumed as a 1-process run (the global batch shrinks from 2 to 1 clip), and a
  1-process run resumed as a 2-process run with the global batch kept, read every sample of the epoch
  exactly once (keys recorded by ``train_probe.StepDump``).

Tiny model, 32x32 clips from a 12-clip shard set, accumulation 2, a schedule whose phase boundaries fall
on both sides of the interruption. The runs are subprocesses (gloo DDP on CPU for two processes); the
independent ones run at the same time, because starting a run (imports, model) costs more than its steps.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import train_probe
from helpers.paths import HELPERS
from helpers.shard_sets import write_good_set
from helpers.state_compare import assert_same_training_state, load_checkpoint

from dlightning.contracts.checkpoint_format import step_checkpoint_name, step_from_name

# Multi-process runs of minutes: in the `slow` group, which `.ci/run` runs by file after the default suite.
pytestmark = pytest.mark.slow

N = 8
C_END, D_END = 1, 4
"""Consistency steps 0-1, detail 2-4, consistency 5-7."""
CLIPS = 12
WORKERS = [(0, 0), (2, 2), (2, 0)]
"""(num_workers before the kill, num_workers of the rerun)."""


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> tuple[Path, set[str]]:
    folder = tmp_path_factory.mktemp("shards") / "video"
    clips = write_good_set(folder, name="v", kind="video", num_shards=4, per_shard=3, seed=21)
    return folder, set(clips)


def shard_overrides(run_dir: Path, shards: Path, steps: int, *, workers: int, c_end: int = C_END,
                    d_end: int = D_END, extra: tuple[str, ...] = ()) -> list[str]:
    """``train_probe.tiny_overrides`` reading the shard set through the indexed loader."""
    data = ["data.backend=shards", "data.access=indexed",
            f"data.sources=[{{path: {shards}, weight_consistency: 1.0, weight_detail: 1.0}}]",
            f"data.num_workers={workers}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3", *extra]
    return train_probe.tiny_overrides(run_dir, steps, c_end=c_end, d_end=d_end, extra=data)


def fit_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dlightning.cli", "fit", "--config", train_probe.DEMO_CONFIG, *overrides]


def probe_command(dump: Path, overrides: list[str], *, ranks: int, resume: bool) -> list[str]:
    """``train_probe.py`` (StepDump on every rank); Lightning starts the second rank itself. DDP with one
    process too: a resume must keep ``trainer.strategy`` (the checkpoint's format)."""
    ddp = ["trainer.strategy=ddp", f"trainer.devices={ranks}"]
    return [sys.executable, str(HELPERS / "train_probe.py"), "--dump", str(dump),
            *(["--resume"] if resume else []), *overrides, *ddp]


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 420) -> None:
    """Wait for every process; fail with the stderr of the first that did not succeed."""
    errors = [proc.communicate(timeout=timeout)[1] for proc in procs]
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err[-4000:]


def newest_step(folder: Path) -> int:
    steps = [step_from_name(p) for p in folder.glob("*.ckpt")] if folder.is_dir() else []
    return max((s for s in steps if s is not None), default=-1)


def kill_after_steps(victims: list[tuple[subprocess.Popen, Path, int]], timeout: float = 300) -> None:
    """SIGKILL each process once its run folder holds a checkpoint of its step or a later one."""
    deadline, pending = time.monotonic() + timeout, list(victims)
    while pending:
        for item in list(pending):
            proc, run_dir, step = item
            if newest_step(run_dir / "checkpoints") >= step:
                os.kill(proc.pid, signal.SIGKILL)
                # wait, not communicate: orphaned loader workers keep the stderr pipe open for a while
                proc.wait()
                pending.remove(item)
            elif proc.poll() is not None:
                pytest.fail(f"training exited with {proc.returncode} before step {step}:\n"
                            f"{proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            for proc, _, _ in pending:
                proc.kill()
            pytest.fail(f"no checkpoint of the kill step within {timeout} s")
        time.sleep(0.02)


def test_kill_9_and_rerun_on_shards_is_bit_identical(tmp_path, shard_set):
    folder, _ = shard_set
    straight_dir = tmp_path / "straight"
    straight = start(fit_command(shard_overrides(straight_dir, folder, N, workers=0)))
    runs = [(tmp_path / f"w{a}_then_w{b}", a, b, random.randint(2, N - 3)) for a, b in WORKERS]
    victims = [(start(fit_command(shard_overrides(run_dir, folder, N, workers=a))), run_dir, step)
               for run_dir, a, _, step in runs]
    try:
        kill_after_steps(victims)
    finally:
        for proc, _, _ in victims:
            if proc.poll() is None:
                proc.kill()
    for proc, run_dir, step in victims:
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert newest_step(run_dir / "checkpoints") < N, f"{run_dir.name} ended before the kill at {step}; raise N"
    finish([start(fit_command(shard_overrides(run_dir, folder, N, workers=b))) for run_dir, _, b, _ in runs])
    finish([straight])
    expected = load_checkpoint(straight_dir / "checkpoints" / step_checkpoint_name(N))
    for run_dir, a, b, step in runs:
        resumed = load_checkpoint(run_dir / "checkpoints" / step_checkpoint_name(N))
        assert resumed["VSRDataModule"]["resume_count"] == 1, (a, b, step)
        assert resumed["VSRDataModule"]["order"]["slots"] == [CLIPS]
        try:
            assert_same_training_state(expected, resumed)
        except AssertionError as err:
            raise AssertionError(f"num_workers {a} killed after step {step}, rerun with {b}: {err}") from err


def consumed_keys(dump: Path) -> list[str]:
    """Keys of every micro-batch a run's ranks consumed (StepDump files of steps >= 1)."""
    keys = []
    for path in sorted(dump.glob("rank*_step*.pt")):
        state = torch.load(path, weights_only=True)
        if state["optimizer_step"] > 0:
            keys += state["keys"]
    return keys


CHAINS = {
    # (ranks, data.batch_size, trainer.max_steps) of the first run and of the resumed one
    "2_ranks_then_1": ((2, 1, 2), (1, 1, 4)),  # 4 micro-batches x 2 clips, then 4 x 1 clip
    "1_rank_then_2": ((1, 2, 2), (2, 1, 3)),   # 4 micro-batches x 2 clips, then 2 x (2 ranks x 1 clip)
}


def test_world_size_change_reads_each_sample_of_the_epoch_once(tmp_path, shard_set):
    folder, clips = shard_set
    keys: dict[str, list[str]] = {name: [] for name in CHAINS}
    for segment in (0, 1):
        procs = []
        for name, chain in CHAINS.items():
            ranks, batch, steps = chain[segment]
            overrides = shard_overrides(tmp_path / name / "run", folder, steps, workers=0, c_end=0, d_end=2,
                                        extra=(f"data.batch_size={batch}",))
            dump = tmp_path / name / f"dump{segment}"
            procs.append(start(probe_command(dump, overrides, ranks=ranks, resume=segment > 0)))
        finish(procs)
        for name in CHAINS:
            keys[name] += consumed_keys(tmp_path / name / f"dump{segment}")
    for name, chain in CHAINS.items():
        assert len(keys[name]) == CLIPS and set(keys[name]) == clips, (name, sorted(keys[name]))
        final = load_checkpoint(tmp_path / name / "run" / "checkpoints" / step_checkpoint_name(chain[1][2]))
        assert final["VSRDataModule"]["micro_batch"] == 2 * chain[1][2], name

"""Exact resume on CPU: N steps straight == N/2 steps, kill -9, resume, the rest.

Tiny model, synthetic data (a pure function of seed, rank and micro-batch), accumulation 2, a schedule whose
phase boundaries fall in both halves (consistency 0-2, detail 3-5, consistency 6-). The final
checkpoints of both runs must agree bit for bit: trainable tensors, Adam state (exp_avg, exp_avg_sq, step
per parameter) and the module's counters and private RNG.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import train_probe
from helpers.state_compare import assert_same_training_state
from helpers.state_compare import load_checkpoint as _load

N = 8
C_END, D_END = 2, 5



def _ckpt_name(step: int) -> str:
    from dlightning.contracts.checkpoint_format import step_checkpoint_name

    return step_checkpoint_name(step)


def _fit_command(run_dir: Path, max_steps: int, every: int) -> list[str]:
    probe = train_probe
    extra = [f"trainer.checkpoint_every={every}", "trainer.keep_checkpoints=3"]
    overrides = probe.tiny_overrides(run_dir, max_steps, c_end=C_END, d_end=D_END, extra=extra)
    return [sys.executable, "-m", "dlightning.cli", "fit", "--config", probe.DEMO_CONFIG, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited with {proc.returncode} before writing {path.name}:\n{err[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    half = N // 2
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted baseline runs alongside the run that gets killed (two cores, one thread each).
    straight = subprocess.Popen(_fit_command(straight_dir, N, half), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_fit_command(killed_dir, N, half), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(killed_dir / "checkpoints" / _ckpt_name(half), victim, timeout=240)
        assert victim.poll() is None, "the run finished before it could be killed; raise N"
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "checkpoints" / _ckpt_name(N)).exists(), "killed run reached the end; raise N"

    resumed = subprocess.run(_fit_command(killed_dir, N, half), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr, "the second run did not resume from a checkpoint"
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-4000:]

    final_straight = _load(straight_dir / "checkpoints" / _ckpt_name(N))
    final_resumed = _load(killed_dir / "checkpoints" / _ckpt_name(N))
    assert final_straight["dlightning"]["optimizer_step"] == N
    assert final_resumed["VSRDataModule"]["resume_count"] == 1
    assert_same_training_state(final_straight, final_resumed)


def test_in_process_resume_is_bit_identical(tmp_path):
    """Faster variant in one process: N/2 steps, a new Trainer resumes to N, compared with N straight."""
    from dlightning.config import load_config
    from dlightning.train import fit

    probe = train_probe
    n, half = 6, 3

    def cfg(run_dir: Path, steps: int):
        return load_config([probe.DEMO_CONFIG], probe.tiny_overrides(
            run_dir, steps, c_end=1, d_end=3, extra=[f"trainer.checkpoint_every={half}"]))

    fit(cfg(tmp_path / "straight", n), fresh=True)
    fit(cfg(tmp_path / "resumed", half), fresh=True)
    module = fit(cfg(tmp_path / "resumed", n))
    assert module.optimizer_step == n and module.micro_step == 2 * n
    a = _load(tmp_path / "straight" / "checkpoints" / _ckpt_name(n))
    b = _load(tmp_path / "resumed" / "checkpoints" / _ckpt_name(n))
    assert b["VSRDataModule"]["resume_count"] == 1
    assert_same_training_state(a, b)

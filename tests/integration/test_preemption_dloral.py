"""SLURM pre-emption of a real (tiny) DLoRAL training through the CLI, under a simulated SLURM job.

SIGUSR1 mid-run -> a ``preempt-*.ckpt`` at an optimizer-step boundary, ``scontrol requeue 4242``, exit 0;
the same command again (no signal) resumes through the resolver and ends bit-identical to an
uninterrupted run, which runs alongside to save time. The array-job id and SIGTERM cases are covered
with a toy module in test_preemption.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.state_compare import assert_same_training_state, load_checkpoint
from helpers.train_probe import DEMO_CONFIG, tiny_overrides

MAX_STEPS = 4
ACCUMULATE = 2  # what tiny_overrides sets
SIGNAL_AFTER = 1  # optimizer steps done before the signal is sent
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def _command(run_dir: Path) -> list[str]:
    # checkpoint_every=SIGNAL_AFTER gives a file whose appearance says "SIGNAL_AFTER steps are done"
    overrides = tiny_overrides(run_dir, MAX_STEPS, c_end=1, d_end=2,
                               extra=[f"trainer.checkpoint_every={SIGNAL_AFTER}", "validation.every_n_steps=0"])
    return [sys.executable, "-m", "dlightning.cli", "fit", "--config", DEMO_CONFIG, *overrides]


def _env(bin_dir: Path | None = None, slurm: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if slurm:
        env.update(SLURM_ENV)
    return env



def test_simulated_slurm_environment_is_detected(monkeypatch) -> None:
    """The variables below are what Lightning and our launch check need to treat the run as a SLURM job."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from dlightning.training.strategy import build_cluster_plugins, check_launch_environment

    env = _env()
    check_launch_environment(1, 1, env=env)  # raises on a mismatch
    [cluster] = [p for p in build_cluster_plugins(env=env) if isinstance(p, SLURMEnvironment)]
    assert cluster.auto_requeue is False  # our callback requeues, not Lightning's in-handler code
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    assert (cluster.global_rank(), cluster.local_rank(), cluster.world_size()) == (0, 0, 1)


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training exited with {proc.returncode} before writing {path.name}:\n{err[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def test_sigusr1_preempts_requeues_and_resumes_bit_identically(tmp_path, stub_scontrol):
    bin_dir, scontrol_log = stub_scontrol
    victim_dir, straight_dir = tmp_path / "preempted", tmp_path / "straight"
    straight = subprocess.Popen(_command(straight_dir), env=_env(slurm=False), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_command(victim_dir), env=_env(bin_dir), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        # step checkpoints are written atomically (tmp + rename), so existence means "step done"
        _wait_for_file(victim_dir / "checkpoints" / f"step-{SIGNAL_AFTER:08d}.ckpt", victim, timeout=240)
        victim.send_signal(signal.SIGUSR1)
        _, err = victim.communicate(timeout=60)  # one more step, a checkpoint and teardown: seconds
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if straight.poll() is None and victim.returncode != 0:
            straight.kill()
    assert victim.returncode == 0, err[-4000:]

    [preempt] = sorted((victim_dir / "checkpoints").glob("preempt-*.ckpt"))
    block = load_checkpoint(preempt)["dlightning"]
    step = block["optimizer_step"]
    assert preempt.name == f"preempt-{step:08d}.ckpt"
    assert SIGNAL_AFTER <= step < MAX_STEPS, "the signal must stop the run before the end; raise MAX_STEPS"
    assert block["micro_step"] == step * ACCUMULATE  # at an optimizer-step boundary, not mid-accumulation
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]
    assert not (victim_dir / "checkpoints" / f"step-{MAX_STEPS:08d}.ckpt").exists()

    resumed = subprocess.run(_command(victim_dir), env=_env(bin_dir), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {preempt}" in resumed.stderr
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]  # no signal, no second requeue
    _, err = straight.communicate(timeout=240)
    assert straight.returncode == 0, err[-4000:]

    final_straight = load_checkpoint(straight_dir / "checkpoints" / f"step-{MAX_STEPS:08d}.ckpt")
    final_resumed = load_checkpoint(victim_dir / "checkpoints" / f"step-{MAX_STEPS:08d}.ckpt")
    assert final_resumed["dlightning"]["optimizer_step"] == MAX_STEPS
    assert final_resumed["VSRDataModule"]["resume_count"] == 1
    assert_same_training_state(final_straight, final_resumed)

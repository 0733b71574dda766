"""A W&B offline segment cut by SIGTERM keeps what was logged before the signal.

SLURM sends SIGTERM to every process of a job, W&B's service (wandb-core) included, and wandb-core
handles it itself with a forced shutdown that drops the records it has not written to the run's
``.wandb`` file yet (by default it writes every 15 s, so a young segment lost everything, even its run
record). dlightning makes it write every ``FLUSH_INTERVAL_S``. Each step's log time is recorded by a
second logger (``helpers.step_clock.StepClock``, listed after W&B) so the test knows what came before the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.step_clock import read_clock
from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from helpers.wandb_offline import offline_runs, read_offline_run

from dlightning.tracking.wandb_run import FLUSH_INTERVAL_S

pytestmark = pytest.mark.timeout(400)

TESTS = Path(__file__).resolve().parents[1]
MARGIN_S = 1.0
"""Extra time, beyond the flush interval, for a logged row to reach wandb-core on a busy machine."""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts"), ("XDG_CACHE_HOME", "xdg"), ("HOME", "home")):
        env[var] = str(home / sub)
    env.update(WANDB_SILENT="true", WANDB_ERROR_REPORTING="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    return env


def _start_fit(run_dir: Path, clock: Path, env: dict[str, str]) -> subprocess.Popen:
    backend = f"logging.backend=[wandb, {{class_path: helpers.step_clock.StepClock, init_args: {{path: '{clock}'}}}}]"
    overrides = tiny_overrides(run_dir, 200, c_end=2, d_end=4, extra=[
        "optim.accumulate=1", "trainer.checkpoint_every=50", backend, "logging.wandb_mode=offline"])
    # its own process group, so that a group-wide signal reaches the trainer and not pytest
    return subprocess.Popen([sys.executable, "-m", "dlightning.cli", "fit", "--config", DEMO_CONFIG, *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(clock: Path, proc: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(read_clock(clock)) < steps:
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode}:\n{proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{steps} steps were not logged within {timeout} s")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def _logged_steps(run_dir: Path):
    [segment] = [read_offline_run(folder) for folder in offline_runs(run_dir)]
    return segment, [row["trainer/global_step"] for row in segment.history if "train/loss" in row]


def _preempt_step(run_dir: Path) -> int:
    [preempt] = sorted((run_dir / "checkpoints").glob("preempt-*.ckpt"))
    return int(preempt.stem.split("-")[1])


def test_sigterm_to_every_process_keeps_every_step_logged_before_it(tmp_path: Path) -> None:
    """As SLURM does: SIGTERM to the trainer and everything below it, wandb-core included. The trainer
    checkpoints and exits 0; the offline run has every step logged more than the flush interval before
    the signal, in order, without gaps (the steps after it, until the checkpoint, are W&B's loss)."""
    run_dir, clock = tmp_path / "run", tmp_path / "clock.txt"
    proc = _start_fit(run_dir, clock, _env(tmp_path))
    _wait_for_steps(clock, proc, 3)
    time.sleep(FLUSH_INTERVAL_S + MARGIN_S)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert any(p.name() == "wandb-core" for p in tree), [p.name() for p in tree]
    signalled_at = time.time()
    for target in tree:
        target.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    before = [step for step, when in read_clock(clock) if when < signalled_at - FLUSH_INTERVAL_S - MARGIN_S]
    assert len(before) >= 3
    segment, steps = _logged_steps(run_dir)
    assert set(before) <= set(steps), f"logged before the signal: {before}; in the offline run: {steps}"
    assert steps == list(range(1, len(steps) + 1))
    assert segment.exit_code is None  # cut off: wandb-core never wrote an exit record
    assert _preempt_step(run_dir) >= max(before)


def test_sigterm_to_the_process_group_leaves_a_complete_run(tmp_path: Path) -> None:
    """``kill -TERM -<pgid>`` (a shell's job control, SLURM's pgid process tracking): wandb-core runs in
    a session of its own and does not get it, so the trainer checkpoints and closes the run normally:
    every step up to the checkpoint is in the offline run, which ends with exit code 0."""
    run_dir, clock = tmp_path / "run", tmp_path / "clock.txt"
    proc = _start_fit(run_dir, clock, _env(tmp_path))
    _wait_for_steps(clock, proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 0, err[-4000:]
    segment, steps = _logged_steps(run_dir)
    assert segment.exit_code == 0
    assert steps == list(range(1, _preempt_step(run_dir) + 1))
    assert [step for step, _ in read_clock(clock)] == steps

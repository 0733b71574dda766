"""Pre-emption signals as SLURM sends them, on a plain ``dlightning fit`` of the tiny config (no SLURM).

SLURM signals every process of a task, not just the trainer: DataLoader workers and the W&B service
get the same SIGTERM or SIGUSR1. These tests send the signals that way (to the trainer's whole process
tree, found through /proc) and check that the run still ends the way the signal asks for: a checkpoint
at a step boundary and exit 0, no traceback; a late or early signal is harmless; a requeue comes last,
after W&B closed its segment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from helpers.wandb_offline import offline_runs, read_offline_run

pytestmark = pytest.mark.timeout(300)

SLURM_JOB = {"SLURM_JOB_ID": "4242"}  # only the requeue target: Lightning still sees a plain local run
WANDB_OFFLINE = ["logging.backend=wandb", "logging.wandb_mode=offline", "logging.project=dlightning-test"]


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (through the parent ids in /proc, as SLURM's linuxproc does)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_tree(pid: int, sig: signal.Signals) -> int:
    """Send ``sig`` to ``pid`` and every process below it, as SLURM does to a task; returns how many got it."""
    sent = 0
    for target in [pid, *_descendants(pid)]:
        try:
            os.kill(target, sig)
            sent += 1
        except ProcessLookupError:
            continue
    return sent


SLURM_LIKE_SCONTROL = f"""#!{sys.executable}
# Stand-in for `scontrol requeue`: logs its arguments and, like SLURM, sends SIGCONT+SIGTERM at once to
# every process of the job (here: the trainer that called it and everything below it).
import os, signal, sys
from pathlib import Path
with open(os.environ["SCONTROL_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
trainer = os.getppid()
children = {{}}
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
tree, queue = [trainer], [trainer]
while queue:
    for child in children.get(queue.pop(), []):
        tree.append(child)
        queue.append(child)
for sig in (signal.SIGCONT, signal.SIGTERM):
    for pid in tree:
        if pid != os.getpid():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
"""


def _env(tmp_path: Path, bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    home = tmp_path / "wandb-home"
    # no WANDB_DIR: it would win over the run folder's logs/wandb, where the tests read the offline runs
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts"), ("XDG_CACHE_HOME", "xdg")):
        env[var] = str(home / sub)
    env.update(WANDB_SILENT="true", WANDB_ERROR_REPORTING="false", WANDB_MODE="offline", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **extra)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start_fit(run_dir: Path, env: dict[str, str], max_steps: int, *extra: str) -> subprocess.Popen:
    overrides = tiny_overrides(run_dir, max_steps, c_end=2, d_end=4,
                               extra=["trainer.checkpoint_every=1", "optim.accumulate=1", *extra])
    return subprocess.Popen([sys.executable, "-m", "dlightning.cli", "fit", "--config", DEMO_CONFIG, *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} before {path.name}:\n{proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def _step_file(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}.ckpt"


def _preempt_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("preempt-*.ckpt"))


@pytest.fixture
def slurm_like_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    """(bin_dir, log) of a ``scontrol`` that signals the caller's tree like a real requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(SLURM_LIKE_SCONTROL)
    script.chmod(0o755)
    return bin_dir, tmp_path / "scontrol.log"


def test_sigterm_to_every_process_with_workers_and_wandb_still_checkpoints(tmp_path: Path) -> None:
    """Failure (1): SIGTERM to the trainer, its 2 DataLoader workers and the W&B service (what ``scancel``
    does). The workers ignore it, the trainer saves at the next step boundary and exits 0; the W&B service
    exits on SIGTERM (wandb-core catches it itself), which stops the logging, not the training."""
    run_dir = tmp_path / "run"
    proc = _start_fit(run_dir, _env(tmp_path), 40, "data.num_workers=2", *WANDB_OFFLINE)
    _wait_for(_step_file(run_dir, 1), proc)
    assert len(_descendants(proc.pid)) >= 3, "expected 2 DataLoader workers and the W&B service"
    _signal_tree(proc.pid, signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 0, err[-4000:]
    [preempt] = _preempt_files(run_dir)
    assert int(preempt.stem.split("-")[1]) < 40
    assert "Traceback" not in err, err[-4000:]
    assert "killed by signal" not in err


def test_sigusr1_after_the_last_step_is_a_no_op(tmp_path: Path, stub_scontrol: tuple[Path, Path]) -> None:
    """Failure (2): SLURM's time-limit warning may come up to a minute early, after training ended. USR1
    (repeatedly, to every process) from the last step until the process is gone must not kill it."""
    bin_dir, scontrol_log = stub_scontrol
    run_dir = tmp_path / "run"
    proc = _start_fit(run_dir, _env(tmp_path, bin_dir, **SLURM_JOB), 3, "data.num_workers=1")
    _wait_for(_step_file(run_dir, 3), proc)
    while proc.poll() is None:
        _signal_tree(proc.pid, signal.SIGUSR1)
        time.sleep(0.02)
    err = _finish(proc)
    assert proc.returncode == 0, f"exit {proc.returncode} (-10: killed by SIGUSR1)\n{err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]


def test_sigusr1_during_start_up_is_acted_on_at_the_first_step(tmp_path: Path,
                                                               stub_scontrol: tuple[Path, Path]) -> None:
    """Failure (2), start-up: USR1 before the model is built (``config.yaml`` is written just before) is
    recorded, and the first step boundary checkpoints and requeues instead of the signal killing the job."""
    bin_dir, scontrol_log = stub_scontrol
    run_dir = tmp_path / "run"
    proc = _start_fit(run_dir, _env(tmp_path, bin_dir, **SLURM_JOB), 20)
    _wait_for(run_dir / "config.yaml", proc)
    proc.send_signal(signal.SIGUSR1)
    err = _finish(proc)
    assert proc.returncode == 0, f"exit {proc.returncode} (-10: killed by SIGUSR1)\n{err[-4000:]}"
    assert [p.name for p in _preempt_files(run_dir)] == ["preempt-00000001.ckpt"]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]


def test_requeue_comes_last_after_wandb_closed_its_segment(tmp_path: Path,
                                                           slurm_like_scontrol: tuple[Path, Path]) -> None:
    """Failure (3): ``scontrol requeue`` SIGTERMs every process of the job at once. The segment requeues
    only after the checkpoint and W&B's ``finish`` (the offline run is closed with exit code 0), and the
    requeue's own SIGTERM, to the trainer and everything below it, ends nothing early: exit 0, no traceback."""
    bin_dir, scontrol_log = slurm_like_scontrol
    run_dir = tmp_path / "run"
    env = _env(tmp_path, bin_dir, SCONTROL_LOG=str(scontrol_log), **SLURM_JOB)
    proc = _start_fit(run_dir, env, 40, "data.num_workers=2", *WANDB_OFFLINE)
    _wait_for(_step_file(run_dir, 1), proc)
    _signal_tree(proc.pid, signal.SIGUSR1)  # as `scancel --signal=USR1 JOB`: workers and W&B get it too
    err = _finish(proc)
    assert proc.returncode == 0, err[-4000:]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]
    assert len(_preempt_files(run_dir)) == 1
    assert "Traceback" not in err, err[-4000:]
    [segment] = [read_offline_run(folder) for folder in offline_runs(run_dir)]
    assert segment.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert segment.exit_code == 0  # finished before the requeue, not cut off by it
    assert segment.history, "the segment's metrics are in the offline run"


def test_sigusr1_during_the_imports_does_not_kill_the_job(tmp_path: Path,
                                                          stub_scontrol: tuple[Path, Path]) -> None:
    """The command line arms the latch before importing torch and Lightning (seconds of start-up), so a
    USR1 that arrives then is kept for the run: a checkpoint at the first step and one requeue."""
    bin_dir, scontrol_log = stub_scontrol
    run_dir = tmp_path / "run"
    proc = _start_fit(run_dir, _env(tmp_path, bin_dir, **SLURM_JOB), 20)
    time.sleep(1.0)  # torch and Lightning are still being imported: nothing of the run exists yet
    assert not (run_dir / "config.yaml").exists()
    proc.send_signal(signal.SIGUSR1)
    err = _finish(proc)
    assert proc.returncode == 0, f"exit {proc.returncode} (-10: killed by SIGUSR1)\n{err[-4000:]}"
    assert [p.name for p in _preempt_files(run_dir)] == ["preempt-00000001.ckpt"]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]

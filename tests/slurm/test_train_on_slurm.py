"""The project's own sbatch script on the real local SLURM cluster: pre-emption, requeue and resume.

Every job here is what ``dlightning submit --dry-run`` renders (through :func:`dlightning.train.submit`)
for 1 node x 2 CPU tasks (``launch.gpus_per_node=0``, ``trainer.devices=2``: DDP over gloo) on the tiny
config with synthetic data (the shards test reads a shard set through the indexed loader); only
``launch.env_setup`` is set here, to this virtual environment and a private W&B folder. Then SLURM does
to it what it does on a real cluster: signals, requeues, time limits, a rank killed.

    .venv/bin/pytest -m slurm tests/slurm
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO
from helpers.shard_sets import write_good_set
from helpers.state_compare import assert_same_training_state, load_checkpoint
from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from helpers.wandb_offline import offline_runs, read_offline_run

pytestmark = pytest.mark.slurm

CLUSTER_SETUP_S = 600
"""Room for the session fixture to start (or apt-get install) the cluster inside the first test's timeout
and to stop it inside the last one's."""
WANDB_OFFLINE = ["logging.backend=wandb", "logging.wandb_mode=offline", "logging.project=dlightning-slurm-test"]


def _submit_script(run_dir: Path, max_steps: int, *overrides: str, step_delay: float = 0.0) -> Path:
    """Render the run's sbatch script the way ``dlightning submit --dry-run`` does; returns its path.

    ``step_delay``: seconds every training batch waits (``step_delay.StepDelay``, from this folder).
    """
    from dlightning.config import load_config
    from dlightning.train import submit

    cfg = load_config([DEMO_CONFIG], tiny_overrides(run_dir, max_steps, c_end=2, d_end=4, extra=[
        "launch.gpus_per_node=0", "trainer.devices=2", "launch.cpus_per_task=1", "launch.time=10",
        "launch.signal_seconds=10", "trainer.checkpoint_every=1", *overrides]))
    wandb_home = run_dir.parent / "wandb-home"
    cfg.launch.env_setup = [
        f"source {shlex.quote(str(Path(sys.executable).parent / 'activate'))}",
        f"cd {shlex.quote(str(REPO))}",
        # W&B offline, with its folders in the test's tmp folder
        f"export WANDB_CONFIG_DIR={wandb_home}/config WANDB_CACHE_DIR={wandb_home}/cache"
        f" WANDB_DATA_DIR={wandb_home}/data XDG_CACHE_HOME={wandb_home}/xdg WANDB_SILENT=true"
        " WANDB_ERROR_REPORTING=false WANDB_MODE=offline",
        "unset WANDB_API_KEY WANDB_DIR",  # WANDB_DIR would win over the run folder's logs/wandb
        f"export PYTHONPATH={shlex.quote(str(Path(__file__).parent))}",  # step_delay.StepDelay
    ]
    if step_delay:
        cfg.trainer.callbacks = [{"class_path": "step_delay.StepDelay", "init_args": {"seconds": step_delay}}]
    script = submit(cfg, dry_run=True)
    assert "#SBATCH --gpus" not in script.read_text()
    return script


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm-*.out")))


def _wait_for(path: Path, cluster, job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.state(job)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", ""):
            pytest.fail(f"job {job} is {state} before {path.name} appeared:\n{_log(path.parents[1])[-6000:]}")
        if time.monotonic() > deadline:
            cluster.cancel(job)
            pytest.fail(f"{path.name} did not appear within {timeout:.0f}s:\n{_log(path.parents[1])[-6000:]}")
        time.sleep(0.2)


def _step_file(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}.ckpt"


def _preempt_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("preempt-*.ckpt"))


def _keep_preempt_checkpoint(run_dir: Path, cluster, job: str, timeout: float = 60) -> Path:
    """Copy the pre-emption checkpoint as soon as it is there: the resumed segment prunes it once it has
    newer step checkpoints. It is written under a temporary name and renamed, so it is complete."""
    deadline = time.monotonic() + timeout
    while not _preempt_files(run_dir):
        assert time.monotonic() < deadline, (cluster.job_info(job), _log(run_dir)[-6000:])
        time.sleep(0.1)
    [preempt] = _preempt_files(run_dir)
    kept = run_dir.parent / preempt.name
    kept.write_bytes(preempt.read_bytes())
    return kept


def _segment_ends(log: str) -> list[int]:
    """The optimizer steps of the pre-emption checkpoints the log reports, in order."""
    return [int(step) for step in re.findall(r"preempt-\d+\.ckpt at optimizer step (\d+)", log)]


def _assert_clean_log(log: str) -> None:
    assert "Traceback" not in log, log[-8000:]
    assert "killed by signal" not in log and "Error" not in log.replace("ErrorReporting", ""), log[-8000:]


def _assert_both_ranks_in_slurm(log: str, segments: int) -> None:
    """Each segment: the batch shell saw the job, and both srun tasks joined one 2-rank DDP group through
    SLURM's variables (``check_launch_environment`` refuses a mismatch; without SLURM Lightning would start
    its own second process in each task)."""
    assert len(re.findall(r"^\[dlightning\] job \d+ restart \d+ on ", log, flags=re.MULTILINE)) == segments, log
    for rank in (0, 1):
        assert log.count(f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2") == segments, log[-8000:]


@pytest.mark.timeout(CLUSTER_SETUP_S + 300)
def test_usr1_checkpoints_requeues_once_and_resumes_to_completion(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 8
    job = slurm_cluster.submit(_submit_script(run_dir, max_steps, "optim.accumulate=2", *WANDB_OFFLINE))
    _wait_for(_step_file(run_dir, 2), slurm_cluster, job, timeout=180)
    slurm_cluster.signal(job, "USR1")  # every process of the step: both ranks, W&B's service
    kept = _keep_preempt_checkpoint(run_dir, slurm_cluster, job)
    state = slurm_cluster.wait(job, timeout=240)
    info, log = slurm_cluster.job_info(job), _log(run_dir)
    assert state == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-8000:])
    assert info["Restarts"] == "1", info  # exactly one requeue
    assert "restart 0 on" in log and "restart 1 on" in log
    assert log.count("Requeued SLURM job") == 1
    _assert_both_ranks_in_slurm(log, segments=2)
    _assert_clean_log(log)

    block = torch.load(kept, map_location="cpu", weights_only=False)["dlightning"]
    step = block["optimizer_step"]
    assert _segment_ends(log) == [step]
    assert 2 <= step < max_steps and block["micro_step"] == 2 * step  # at an optimizer-step boundary
    assert f"resuming from {run_dir / 'checkpoints' / kept.name}" in log
    final = torch.load(_step_file(run_dir, max_steps), map_location="cpu", weights_only=False)
    assert final["dlightning"]["optimizer_step"] == max_steps

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    segments = [read_offline_run(folder) for folder in offline_runs(run_dir)]
    assert [s.run_id for s in segments] == [run_id, run_id]
    assert [s.exit_code for s in segments] == [0, 0]  # the requeued segment was closed before the requeue
    steps = [row["trainer/global_step"] for s in segments for row in s.history]
    assert steps[-1] == max_steps and steps[0] == 1


@pytest.mark.timeout(CLUSTER_SETUP_S + 240)
def test_sigterm_with_workers_and_wandb_still_checkpoints(slurm_cluster, tmp_path):
    """``scancel JOB``: SIGTERM to the batch shell and every process of the step (2 DataLoader workers per
    rank, W&B's service); the ranks save at the next step boundary within KillWait, nobody requeues."""
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit(_submit_script(run_dir, 200, "data.num_workers=2", *WANDB_OFFLINE))
    _wait_for(_step_file(run_dir, 1), slurm_cluster, job, timeout=180)
    slurm_cluster.cancel(job)
    state = slurm_cluster.wait(job, timeout=90)
    log = _log(run_dir)
    assert state == "CANCELLED", (slurm_cluster.job_info(job), log[-8000:])
    [preempt] = _preempt_files(run_dir)
    assert _segment_ends(log) == [int(preempt.stem.split("-")[1])]
    assert "Requeued SLURM job" not in log
    assert "Traceback" not in log and "killed by signal" not in log, log[-8000:]
    assert "batch shell got TERM" in log


@pytest.mark.timeout(CLUSTER_SETUP_S + 330)
def test_time_limit_warning_requeues_until_the_run_completes(slurm_cluster, tmp_path):
    """``--time=1`` with ``--signal=SIGUSR1@10``: slurmctld checks every 30 s and signals once fewer than
    N + 30 s are left, so the warning comes 20-50 s after the start (10-40 s before the limit; a larger N
    would send it at the first check, often during start-up). Each segment checkpoints, requeues, and the
    next one resumes, until the run is done. 34 steps of at least 1.3 s take longer than one segment can
    train (50 s minus the start-up), so at least one requeue is needed; usually one or two."""
    run_dir = tmp_path / "run"
    max_steps = 34
    script = _submit_script(run_dir, max_steps, "optim.accumulate=1", "launch.time=1", "launch.signal_seconds=10",
                            "trainer.checkpoint_every=10", step_delay=1.0)
    assert "#SBATCH --time=1\n" in script.read_text() and "#SBATCH --signal=SIGUSR1@10\n" in script.read_text()
    job = slurm_cluster.submit(script)
    state = slurm_cluster.wait(job, timeout=300)
    info, log = slurm_cluster.job_info(job), _log(run_dir)
    assert state == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-8000:])
    restarts = int(info["Restarts"])
    assert restarts >= 1, info
    assert log.count("Requeued SLURM job") == restarts
    ends = _segment_ends(log)
    assert len(ends) == restarts and ends == sorted(ends) and ends[-1] < max_steps, ends
    assert log.count("resuming from") == restarts
    _assert_both_ranks_in_slurm(log, segments=restarts + 1)
    _assert_clean_log(log)
    final = torch.load(_step_file(run_dir, max_steps), map_location="cpu", weights_only=False)
    assert final["dlightning"]["optimizer_step"] == max_steps


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of the training process of ``rank`` in ``job`` (its environment names both)."""
    wanted = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if b"dlightning.cli" in cmdline and wanted <= environ:
            return int(proc.name)
    return None


@pytest.mark.timeout(CLUSTER_SETUP_S + 200)
def test_a_rank_killed_with_sigkill_fails_the_job_at_once(slurm_cluster, tmp_path):
    """srun's ``--kill-on-bad-exit=1``: the other rank does not wait in a collective until the time limit."""
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit(_submit_script(run_dir, 500))
    _wait_for(_step_file(run_dir, 1), slurm_cluster, job, timeout=180)
    pid = _rank_pid(job, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, 9)
    killed_at = time.monotonic()
    state = slurm_cluster.wait(job, timeout=90)
    assert state == "FAILED", (slurm_cluster.job_info(job), _log(run_dir)[-6000:])
    assert time.monotonic() - killed_at < 60
    assert slurm_cluster.job_info(job)["ExitCode"] != "0:0"


@pytest.mark.timeout(CLUSTER_SETUP_S + 240)
def test_usr1_with_full_reaches_the_tasks_through_the_batch_shell(slurm_cluster, tmp_path):
    """``scancel --signal=USR1 --full``: the batch shell gets USR1 too; it must not die of it (that would end
    the job before any checkpoint). The segment checkpoints and requeues; the test cancels the requeued job."""
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit(_submit_script(run_dir, 500))
    _wait_for(_step_file(run_dir, 1), slurm_cluster, job, timeout=180)
    slurm_cluster.signal(job, "USR1", full=True)
    deadline = time.monotonic() + 90
    while "Requeued SLURM job" not in _log(run_dir) or slurm_cluster.state(job) == "RUNNING":
        assert time.monotonic() < deadline, (slurm_cluster.job_info(job), _log(run_dir)[-6000:])
        time.sleep(0.5)
    info = slurm_cluster.job_info(job)
    slurm_cluster.cancel(job)
    log = _log(run_dir)
    assert info["Restarts"] == "1", info
    assert len(_preempt_files(run_dir)) == 1 and len(_segment_ends(log)) == 1
    assert "batch shell got USR1" in log
    _assert_clean_log(log)


def _shard_overrides(shards: Path, *, workers: int) -> list[str]:
    """The indexed loader on a shard set (every rank reads it; ``data.num_workers`` loader workers)."""
    return ["data.backend=shards", "data.access=indexed", f"data.num_workers={workers}",
            f"data.sources=[{{path: {shards}, weight_consistency: 1.0, weight_detail: 1.0}}]"]


@pytest.mark.timeout(CLUSTER_SETUP_S + 420)
def test_usr1_preemption_on_shards_resumes_bit_identically(slurm_cluster, tmp_path):
    """The pre-emption of the first test, on real shards (``data.access=indexed``, 2 loader workers per
    rank): the requeued, resumed job ends with the same trainable tensors, optimizer state, counters and
    private RNG as the same job left alone (0 differing tensors)."""
    shards = tmp_path / "shards"
    write_good_set(shards, name="v", kind="video", num_shards=4, per_shard=3, seed=5)
    max_steps, data = 8, _shard_overrides(shards, workers=2)
    runs = {name: tmp_path / name for name in ("preempted", "straight")}
    jobs = {name: slurm_cluster.submit(_submit_script(run_dir, max_steps, "optim.accumulate=2", *data))
            for name, run_dir in runs.items()}
    _wait_for(_step_file(runs["preempted"], 2), slurm_cluster, jobs["preempted"], timeout=240)
    slurm_cluster.signal(jobs["preempted"], "USR1")
    kept = _keep_preempt_checkpoint(runs["preempted"], slurm_cluster, jobs["preempted"])
    for name, job in jobs.items():
        state = slurm_cluster.wait(job, timeout=300)
        info, log = slurm_cluster.job_info(job), _log(runs[name])
        assert state == "COMPLETED" and info["ExitCode"] == "0:0", (name, info, log[-8000:])
        _assert_clean_log(log)
    assert slurm_cluster.job_info(jobs["preempted"])["Restarts"] == "1"
    assert "Requeued SLURM job" not in _log(runs["straight"])
    step = torch.load(kept, map_location="cpu", weights_only=False)["dlightning"]["optimizer_step"]
    assert 2 <= step < max_steps, step
    expected = load_checkpoint(_step_file(runs["straight"], max_steps))
    resumed = load_checkpoint(_step_file(runs["preempted"], max_steps))
    assert resumed["VSRDataModule"]["resume_count"] == 1 and expected["VSRDataModule"]["resume_count"] == 0
    assert resumed["VSRDataModule"]["order"]["slots"] == [12]
    assert_same_training_state(expected, resumed)

"""The local SLURM cluster behaves like the real ones the sbatch script is written for.

Tiny bash/python jobs, no dlightning code: ranks and their environment, where step signals go,
requeue from inside a job, and the time-limit warning signal (``--signal=SIGUSR1@N``).

    .venv/bin/pytest -p no:cacheprovider tests/slurm -m slurm -x -q -o addopts=""
"""

from __future__ import annotations

import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

# The session fixture starts the cluster inside the first test's timeout and stops it inside the
# last one's, so every bound below has room for both (a cold start may apt-get install the packages).
CLUSTER_SETUP_S = 600

# Each srun task: installs handlers, then writes ready_<restart>_<rank> ("PROCID LOCALID NTASKS JOB_ID";
# <restart> is SLURM_RESTART_COUNT or "unset"); on a handled signal writes <SIGNAME>_<restart>_<rank>
# (seconds since the task started) and, for the signals named in --exit-on, exits 0; otherwise it ends
# when <out>/release appears, or exits 3 after --max seconds. --requeue-once: on the first run rank 0
# requeues the job once every task is ready; on a later run every task exits 0 at once.
TASK_PY = textwrap.dedent(
    """
    import argparse, os, signal, subprocess, sys, time

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--exit-on", default="")
    p.add_argument("--max", type=float, default=120)
    p.add_argument("--requeue-once", action="store_true")
    a = p.parse_args()
    rank = os.environ["SLURM_PROCID"]
    restart = os.environ.get("SLURM_RESTART_COUNT", "unset")
    t0 = time.time()
    exit_on = {s for s in a.exit_on.split(",") if s}
    hit = []

    def write(name, text=""):
        with open(os.path.join(a.out, name), "w") as f:
            f.write(text)

    def handler(sig, frame):
        name = signal.Signals(sig).name
        write(f"{name}_{restart}_{rank}", f"{time.time() - t0:.2f}")
        if name in exit_on:
            hit.append(name)

    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(s, handler)
    write(f"ready_{restart}_{rank}", " ".join(
        os.environ.get(k, "") for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID")))
    if a.requeue_once and rank == "0" and restart in ("unset", "0"):
        # requeue kills every task at once: let all of them start first
        ntasks = int(os.environ["SLURM_NTASKS"])
        while not all(os.path.exists(os.path.join(a.out, f"ready_{restart}_{r}")) for r in range(ntasks)):
            if time.time() - t0 > a.max:
                sys.exit(3)
            time.sleep(0.1)
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
    elif a.requeue_once and restart not in ("unset", "0"):
        sys.exit(0)
    while not hit and not os.path.exists(os.path.join(a.out, "release")):
        if time.time() - t0 > a.max:
            sys.exit(3)
        time.sleep(0.1)
    sys.exit(0)
    """
)


def _job(tmp_path: Path, directives: list[str], body: str) -> Path:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (tmp_path / "task.py").write_text(TASK_PY)
    lines = ["#!/bin/bash", *[f"#SBATCH {d}" for d in directives], f"#SBATCH --output={out}/slurm-%j.out"]
    script = tmp_path / "job.sh"
    task = f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'task.py'))}"
    body = textwrap.dedent(body).format(out=shlex.quote(str(out)), task=task)
    script.write_text("\n".join(lines) + "\n" + body)
    script.chmod(0o755)
    return script


def _markers(out: Path, prefix: str) -> set[str]:
    return {p.name for p in out.glob(f"{prefix}*")}


def _wait_files(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()]
            raise TimeoutError(f"still missing after {timeout:.0f}s: {missing}")
        time.sleep(0.1)


def _job_log(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.glob("slurm-*.out")))


@pytest.mark.timeout(CLUSTER_SETUP_S + 120)
def test_one_node_two_tasks(slurm_cluster, tmp_path):
    script = _job(
        tmp_path,
        ["--nodes=1 --ntasks-per-node=2 --cpus-per-task=1", "--job-name=smoke-ranks"],
        """
        set -euo pipefail
        srun bash -c 'echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS $SLURM_JOB_ID" > {out}/rank_$SLURM_PROCID.txt'
        """,
    )
    job = slurm_cluster.submit(script)
    state = slurm_cluster.wait(job, timeout=90)
    info = slurm_cluster.job_info(job)
    out = tmp_path / "out"
    assert state == "COMPLETED", (info, _job_log(out))
    assert info["ExitCode"] == "0:0"
    assert info["NumNodes"] == "1" and info["NumTasks"] == "2", info
    ranks = {}
    for rank in (0, 1):
        procid, localid, ntasks, job_id = (out / f"rank_{rank}.txt").read_text().split()
        ranks[rank] = (procid, localid, ntasks, job_id)
    assert ranks == {0: ("0", "0", "2", job), 1: ("1", "1", "2", job)}


@pytest.mark.timeout(CLUSTER_SETUP_S + 150)
@pytest.mark.parametrize(
    ("flags", "tasks_get_it", "batch_gets_it"),
    [
        pytest.param({}, True, False, id="steps-only"),
        pytest.param({"batch": True}, False, True, id="batch-only"),
        pytest.param({"full": True}, True, True, id="full"),
    ],
)
def test_scancel_signal_targets(slurm_cluster, tmp_path, flags, tasks_get_it, batch_gets_it):
    """``scancel --signal=USR1 JOB`` reaches every srun task and not the batch shell (which would die of
    an untrapped USR1); ``--batch`` reaches the batch shell only; ``--full`` both."""
    # Only the --batch/--full variants trap USR1 in the batch shell: in the plain one an untrapped
    # USR1 would kill it, so batch_done proves it never got the signal.
    trap = 'trap "touch {out}/batch_USR1" USR1' if batch_gets_it else "# no trap: USR1 would kill this shell"
    script = _job(
        tmp_path,
        ["--nodes=1 --ntasks-per-node=2 --cpus-per-task=1", "--job-name=smoke-signal"],
        f"""
        {trap}
        srun {{task}} {{out}} --exit-on=SIGUSR1
        echo "srun exit $?" > {{out}}/batch_done
        """,
    )
    out = tmp_path / "out"
    job = slurm_cluster.submit(script)
    _wait_files([out / "ready_unset_0", out / "ready_unset_1"], timeout=90)
    slurm_cluster.signal(job, "USR1", **flags)
    task_markers = {"SIGUSR1_unset_0", "SIGUSR1_unset_1"}
    if tasks_get_it:
        _wait_files([out / m for m in task_markers], timeout=30)
    else:
        time.sleep(3)
    (out / "release").touch()
    state = slurm_cluster.wait(job, timeout=60)
    info = slurm_cluster.job_info(job)
    assert state == "COMPLETED", (info, _job_log(out))
    assert info["ExitCode"] == "0:0"
    assert _markers(out, "SIGUSR1_") == (task_markers if tasks_get_it else set())
    assert (out / "batch_USR1").exists() == batch_gets_it
    assert (out / "batch_done").read_text().strip() == "srun exit 0"


@pytest.mark.timeout(CLUSTER_SETUP_S + 180)
def test_requeue_from_inside_the_job(slurm_cluster, tmp_path):
    """Rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` on the first run: every task (and the batch
    shell) gets SIGTERM, the job pends for cred_expire and runs again with SLURM_RESTART_COUNT=1 under
    the same id, appending to the same log."""
    script = _job(
        tmp_path,
        [
            "--nodes=1 --ntasks-per-node=2 --cpus-per-task=1",
            "--job-name=smoke-requeue",
            "--requeue",
            "--open-mode=append",
        ],
        """
        trap 'echo "batch got TERM"' TERM
        echo "batch start restart=${{SLURM_RESTART_COUNT:-unset}}"
        srun {task} {out} --requeue-once --exit-on=SIGTERM
        """,
    )
    out = tmp_path / "out"
    job = slurm_cluster.submit(script)
    _wait_files([out / "ready_1_0", out / "ready_1_1"], timeout=150)
    state = slurm_cluster.wait(job, timeout=60)
    info = slurm_cluster.job_info(job)
    log = _job_log(out)
    assert state == "COMPLETED", (info, log)
    assert info["Restarts"] == "1", info
    assert info["ExitCode"] == "0:0"
    # the first run: SLURM_RESTART_COUNT is not set at all; both tasks got SIGTERM from the requeue
    assert _markers(out, "ready_") == {"ready_unset_0", "ready_unset_1", "ready_1_0", "ready_1_1"}
    assert _markers(out, "SIGTERM_") == {"SIGTERM_unset_0", "SIGTERM_unset_1"}
    assert (out / "ready_1_1").read_text().split()[3] == job
    assert log.count("batch start restart=") == 2, log
    assert "batch start restart=unset" in log and "batch start restart=1" in log
    assert "DUE TO JOB REQUEUE" in log


@pytest.mark.timeout(CLUSTER_SETUP_S + 180)
def test_time_limit_warning_signal(slurm_cluster, tmp_path):
    """``--time=1 --signal=SIGUSR1@30`` (the form the project renders): the srun tasks get SIGUSR1
    before the limit, the batch shell does not. SLURM checks limits every 30 s and may send the
    signal up to 60 s early, so with a 1-minute limit it comes within the first check (~0-30 s)."""
    script = _job(
        tmp_path,
        [
            "--nodes=1 --ntasks-per-node=2 --cpus-per-task=1",
            "--job-name=smoke-timelimit",
            "--time=1",
            "--signal=SIGUSR1@30",
        ],
        """
        srun {task} {out} --exit-on=SIGUSR1 --max=150
        echo "srun exit $?" > {out}/batch_done
        """,
    )
    out = tmp_path / "out"
    job = slurm_cluster.submit(script)
    state = slurm_cluster.wait(job, timeout=150)
    info = slurm_cluster.job_info(job)
    assert state == "COMPLETED", (info, _job_log(out))
    assert info["TimeLimit"] == "00:01:00", info
    for rank in (0, 1):
        seconds_after_start = float((out / f"SIGUSR1_unset_{rank}").read_text())
        assert seconds_after_start < 60, seconds_after_start
    assert (out / "batch_done").read_text().strip() == "srun exit 0"


@pytest.mark.timeout(CLUSTER_SETUP_S + 60)
def test_gpu_directive_needs_gres(slurm_cluster, tmp_path):
    """This cluster has no GPUs (no GresTypes): sbatch rejects ``--gpus-per-node=1`` at submit time,
    so a CPU-only run of the project's script must drop that directive; ``--gpus-per-node=0`` passes."""
    script = _job(tmp_path, ["--ntasks=1"], "true\n")
    with pytest.raises(RuntimeError, match="Invalid generic resource"):
        slurm_cluster.submit(script, "--gpus-per-node=1")
    job = slurm_cluster.submit(script, "--gpus-per-node=0")
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

"""The local one-node SLURM cluster (``tests/slurm/cluster.sh``) as a session fixture.

Tests marked ``slurm`` start real daemons (munged, slurmctld, slurmd) and, as root on a machine without
the Debian packages, ``apt-get install`` them. So the default suite leaves them out (``pyproject.toml``
``addopts``) and ``.ci/run`` runs them on their own:

    .venv/bin/pytest -m slurm tests/slurm

Environment: ``SLURM_CLUSTER_SKIP=1`` skips them; ``SLURM_CLUSTER_STATE_DIR`` picks the state folder
(default ``/tmp/dlightning-slurm``, the script's). A cluster already running there is reused and left
running; one the fixture started is stopped at the end of the session.
"""

from __future__ import annotations

import os
import re
import signal as _signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
DEFAULT_STATE_DIR = Path("/tmp/dlightning-slurm")
EXIT_NO_PACKAGES = 3
"""cluster.sh's exit status when the packages are missing and cannot be installed (not root, no apt)."""
START_TIMEOUT_S = 600
"""cluster.sh start: apt-get update + install on a slow mirror, then up to 60 s for the node to come up."""
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")

_KEY = re.compile(r"\s+(?=[A-Za-z][\w:/]*=)")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces ...`` (one ``scontrol show ... -o`` record) -> dict."""
    info: dict[str, str] = {}
    for token in _KEY.split(line.strip()):
        key, sep, value = token.partition("=")
        if sep:
            info[key] = value.strip()
    return info


def _signal_arg(sig: int | str | _signal.Signals) -> str:
    if isinstance(sig, int):  # also signal.Signals
        return str(int(sig))
    return str(sig)


@dataclass
class SlurmCluster:
    """Handle on the running cluster; every command runs with ``env`` (``SLURM_CONF`` set)."""

    state_dir: Path
    slurm_conf: Path
    env: dict[str, str] = field(repr=False)
    started_here: bool = False

    @property
    def SLURM_CONF(self) -> str:  # noqa: N802 - the variable's name
        return str(self.slurm_conf)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        result = subprocess.run(
            [str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def submit(self, script_path: str | os.PathLike[str], *sbatch_args: str) -> str:
        """``sbatch --parsable [sbatch_args] script`` from the script's folder -> the job id."""
        script = Path(script_path).resolve()
        result = subprocess.run(
            ["sbatch", "--parsable", *map(str, sbatch_args), str(script)],
            env=self.env,
            cwd=script.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout.strip().splitlines()[-1].split(";")[0]

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, StartTime, ...).

        A job slurmctld has forgotten (MinJobAge after it ended) comes from the job-completion log
        instead (``_source`` = ``jobcomp``, fewer fields, no Restarts); an unknown id gives ``{}``.
        """
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith("JobId=")]
        if result.returncode == 0 and lines:
            return parse_scontrol_line(lines[0])
        jobcomp = self.state_dir / "log" / "jobcomp.log"
        if jobcomp.is_file():
            records = [
                parse_scontrol_line(line)
                for line in jobcomp.read_text(errors="replace").splitlines()
                if line.startswith(f"JobId={job_id} ")
            ]
            if records:
                return {**records[-1], "_source": "jobcomp"}
        return {}

    def state(self, job_id: str | int) -> str:
        """The job's JobState (``""`` when unknown)."""
        return self.job_info(job_id).get("JobState", "")

    def wait(
        self,
        job_id: str | int,
        states: tuple[str, ...] = FINAL_STATES,
        timeout: float = 300,
        poll: float = 0.5,
    ) -> str:
        """Poll until the job's state is one of ``states``; return it. TimeoutError (with the daemon
        logs) when it is not there after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} is {state or 'unknown'} after {timeout:.0f}s, waited for {states}: {info}\n"
                    f"{self.logs()}"
                )
            time.sleep(poll)

    def signal(self, job_id: str | int, sig: int | str | _signal.Signals, full: bool = False, batch: bool = False):
        """``scancel --signal=SIG``: plain -> every process of the job's steps (srun tasks), not the batch
        shell; ``batch`` -> the batch shell only; ``full`` -> the batch shell, its children and the steps."""
        flags = ["--full"] if full else (["--batch"] if batch else [])
        self.run("scancel", f"--signal={_signal_arg(sig)}", *flags, str(job_id))

    def requeue(self, job_id: str | int) -> None:
        """``scontrol requeue``: the running job gets SIGCONT+SIGTERM (SIGKILL after KillWait), then pends."""
        self.run("scontrol", "requeue", str(job_id))

    def cancel(self, job_id: str | int) -> None:
        """``scancel``: SIGCONT+SIGTERM to the batch shell and the steps, SIGKILL after KillWait."""
        self.run("scancel", str(job_id), check=False)

    def logs(self, lines: int = 40) -> str:
        """The tails of the daemon logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.state_dir / "log" / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"===== {path} =====\n" + "\n".join(tail))
        return "\n".join(parts)


def _cluster_sh(*args: str | os.PathLike[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running cluster (started here, and then stopped at the end of the session, unless it ran)."""
    if os.environ.get("SLURM_CLUSTER_SKIP") == "1":
        pytest.skip("SLURM_CLUSTER_SKIP=1")
    state_dir = Path(os.environ.get("SLURM_CLUSTER_STATE_DIR") or DEFAULT_STATE_DIR).resolve()
    was_running = _cluster_sh("status", state_dir, timeout=60).returncode == 0
    start = _cluster_sh("start", state_dir, timeout=START_TIMEOUT_S)
    if start.returncode == EXIT_NO_PACKAGES:
        reason = (start.stderr.strip().splitlines() or ["packages missing"])[-1]
        pytest.skip(f"cannot set up the SLURM cluster: {reason}")
    if start.returncode != 0:
        pytest.fail(f"cluster.sh start {state_dir} failed (exit {start.returncode}):\n{start.stdout}{start.stderr}")
    match = re.search(r"^export SLURM_CONF=(\S+)$", start.stdout, flags=re.MULTILINE)
    slurm_conf = Path(match.group(1)) if match else state_dir / "slurm.conf"
    cluster = SlurmCluster(
        state_dir=state_dir,
        slurm_conf=slurm_conf,
        env={**os.environ, "SLURM_CONF": str(slurm_conf)},
        started_here=not was_running,
    )
    try:
        yield cluster
    finally:
        if cluster.started_here:
            stop = _cluster_sh("stop", state_dir, timeout=180)
            if stop.returncode != 0:
                pytest.fail(f"cluster.sh stop {state_dir} failed (exit {stop.returncode}):\n{stop.stderr}")

"""One ``fit`` per run folder: an exclusive lock on ``<run_dir>/run.lock``, taken by global rank 0.

Two trainings writing into the same folder would interleave checkpoints and prune each other's. The
lock is an ``fcntl.flock`` on the file, held for the life of the process: the kernel releases it when
the process dies, however it dies, so a lock left by a dead process (a crash, ``kill -9``, a
pre-empted SLURM job on another node) is simply taken over. The file records the holder's host, PID
and SLURM job for the message a second ``fit`` prints. On network filesystems ``flock`` is as good as
the filesystem's lock support (NFSv4 and Lustre with ``flock`` mount option honour it across nodes).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from dlightning.errors import ConfigError

LOCK_NAME = "run.lock"


class RunLock:
    """The lock of one run folder; :meth:`acquire` raises ConfigError while another live process holds it."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the run folder) or raise ConfigError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the process's life
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            handle.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another training: host {holder.get('host', '?')}, PID "
                f"{holder.get('pid', '?')}{_job(holder)}, since {holder.get('since', '?')}; wait for it to end "
                "or choose another trainer.run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Release the lock (the file stays, with the last holder's details)."""
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _read_holder(handle: IO[str]) -> dict[str, Any]:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _job(holder: dict[str, Any]) -> str:
    return f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""

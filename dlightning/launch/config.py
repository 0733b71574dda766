"""The ``launch`` config section: how a run is submitted to SLURM (see :mod:`dlightning.launch.sbatch`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dlightning.errors import ConfigError

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class LaunchConfig:
    """Cluster knobs for ``dlightning submit``; explicit values, nothing is probed from the cluster."""

    nodes: int = 1
    """Nodes to allocate (becomes ``trainer.num_nodes``)."""
    gpus_per_node: int = 1
    """GPUs per node = tasks per node = ``trainer.devices`` (one srun task per GPU). 0 makes a CPU-only
    job: no GPU directive (a cluster without GPUs rejects even ``--gpus-per-node=1`` at submit time),
    ``trainer.devices`` tasks per node and ``trainer.accelerator=cpu``."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Wall-clock limit in SLURM syntax, e.g. ``2-00:00:00`` or ``24:00:00``."""
    constraint: str | None = None
    qos: str | None = None
    job_name: str = "dlightning"
    """Not ``bash``/``interactive``: Lightning would then ignore the SLURM environment."""
    cpus_per_task: int = 8
    """CPU cores per GPU task (data-loader workers + main process)."""
    mem: str | None = None
    """Memory per node, e.g. ``480G``; None uses the partition's default."""
    env_setup: list[str] = field(default_factory=list)
    """Shell lines run before srun, e.g. ``module load cuda`` or ``source .venv/bin/activate``."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Extra directives, with or without the ``#SBATCH`` prefix, e.g. ``--exclusive``."""
    signal_seconds: int = 90
    """SIGUSR1 is sent this many seconds before the time limit, or up to 30 s earlier (slurmctld checks every
    30 s; SLURM documents up to 60 s); keep it >= 2x the checkpoint save time."""
    requeue: bool = True
    """``#SBATCH --requeue``: the pre-emption callback requeues the job, which resumes from run_dir."""
    use_torchrun: bool = False
    """One srun task per node running ``torchrun_multinode.sh`` (next to this file) instead of one task per GPU."""

    def __post_init__(self) -> None:
        problems = []
        if self.nodes < 1:
            problems.append(f"launch.nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            problems.append(f"launch.gpus_per_node must be >= 0 (0: a CPU-only job), got {self.gpus_per_node}")
        if self.gpus_per_node == 0 and self.use_torchrun:
            problems.append("launch.use_torchrun needs GPUs (launch.gpus_per_node >= 1); a CPU-only job runs "
                            "one srun task per rank")
        if self.cpus_per_task < 1:
            problems.append(f"launch.cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if not 10 <= self.signal_seconds <= 65535:
            problems.append(
                f"launch.signal_seconds must be in [10, 65535] (SLURM's limit), got {self.signal_seconds}"
            )
        if self.time is not None and not _TIME.match(self.time):
            problems.append(
                f"launch.time={self.time!r} is not SLURM time syntax; use e.g. '24:00:00' or '2-00:00:00'"
            )
        if self.job_name in ("bash", "interactive") or not self.job_name.strip():
            problems.append(
                f"launch.job_name={self.job_name!r}: Lightning treats 'bash'/'interactive' as an "
                "interactive session and ignores SLURM; choose another name"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def cpu_only(self) -> bool:
        """True for a job without GPUs (``gpus_per_node=0``)."""
        return self.gpus_per_node == 0

    def tasks_per_node(self, cpu_tasks: int) -> int:
        """srun tasks (ranks) per node: one per GPU, or ``cpu_tasks`` (``trainer.devices``) on a CPU-only job."""
        return cpu_tasks if self.cpu_only else self.gpus_per_node

"""SLURM submission: render the sbatch script from a LaunchConfig and snapshot the run.

``dlightning submit --config configs/sd21.yaml --config configs/launch/2x8.yaml [key=value ...]``
resolves the config, writes into ``trainer.run_dir``: ``config.yaml`` (the resolved config the job
reads), ``code_version.txt`` (+ ``code.patch`` for uncommitted changes) and ``train.sbatch``, then
calls ``sbatch``. A requeued job runs the same script and resumes from the newest valid checkpoint
in the run folder.

Why the directives are what they are (Lightning docs and docs/INTEGRATION.md D7):

* one srun task per GPU (``--ntasks-per-node == gpus_per_node == trainer.devices``), else ranks hang;
  a CPU-only job (``gpus_per_node=0``) has no GPU directive and ``trainer.devices`` tasks per node;
* ``--signal=SIGUSR1@N`` without ``B:``, so the signal reaches the srun tasks (the trainers), not
  only the batch shell;
* ``--requeue`` + ``--open-mode=append``: the requeued job keeps its id and appends to its log.

The batch shell runs srun in the background and waits for it, trapping USR1 and TERM: bash dies of
an untrapped USR1 (``scancel --signal=USR1 --full``, ``--signal=B:USR1@N``) and of TERM, and when
the batch shell ends the job ends, killing the tasks before they save. A USR1 that reaches the shell
is passed on to srun, which forwards it to every task of the step; a TERM is not (SLURM sends it to
the tasks itself), the shell just goes on waiting.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from string import Template

from dlightning.errors import ConfigError
from dlightning.launch.config import LaunchConfig
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
"""The checkout holding the package (a git work tree for editable installs)."""
TEMPLATE = PACKAGE_DIR / "train.sbatch.tmpl"
TORCHRUN_SCRIPT = PACKAGE_DIR / "torchrun_multinode.sh"
DEFAULT_COMMAND = "python -m dlightning.cli fit"


def _directives(cfg: LaunchConfig, run_dir: str, cpu_tasks_per_node: int) -> list[str]:
    tasks_per_node = 1 if cfg.use_torchrun else cfg.tasks_per_node(cpu_tasks_per_node)
    lines = [f"--job-name={cfg.job_name}", f"--nodes={cfg.nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if not cfg.cpu_only:
        lines.append(f"--gpus-per-node={cfg.gpus_per_node}")
    lines.append(f"--cpus-per-task={cfg.cpus_per_task * (cfg.gpus_per_node if cfg.use_torchrun else 1)}")
    optional = {
        "mem": cfg.mem,
        "partition": cfg.partition,
        "account": cfg.account,
        "time": cfg.time,
        "constraint": cfg.constraint,
        "qos": cfg.qos,
    }
    lines += [f"--{key}={value}" for key, value in optional.items() if value]
    if not cfg.use_torchrun:
        # torchrun's agent does not handle SIGUSR1 (it would die); in that mode pre-emption relies on
        # the SIGTERM that torchrun forwards to its workers (checkpoint, no requeue).
        lines.append(f"--signal=SIGUSR1@{cfg.signal_seconds}")
    if cfg.requeue:
        lines.append("--requeue")
    lines += ["--open-mode=append", f"--output={run_dir}/slurm-%j.out", f"--error={run_dir}/slurm-%j.out"]
    lines += [extra.removeprefix("#SBATCH").strip() for extra in cfg.extra_sbatch]
    return [f"#SBATCH {line}" for line in lines]


def _launch_line(cfg: LaunchConfig, *, config_path: str, command: str, cpu_tasks_per_node: int) -> str:
    overrides = f"trainer.num_nodes={cfg.nodes} trainer.devices={cfg.tasks_per_node(cpu_tasks_per_node)}"
    if cfg.cpu_only:
        overrides += " trainer.accelerator=cpu"
    args = f"--config {shlex.quote(config_path)} {overrides}"
    if cfg.use_torchrun:
        # one task per node; the script reads the node rank from SLURM_NODEID
        return (
            f'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            f"export MASTER_PORT=${{MASTER_PORT:-29500}} NNODES={cfg.nodes}\n"
            f"export NPROC_PER_NODE={cfg.gpus_per_node}\n"
            f"srun --kill-on-bad-exit=1 {shlex.quote(str(TORCHRUN_SCRIPT))} {args}"
        )
    return f"srun --kill-on-bad-exit=1 {command} {args}"


def render_sbatch(
    cfg: LaunchConfig,
    *,
    run_dir: str | Path,
    config_path: str | Path,
    command: str = DEFAULT_COMMAND,
    template: str | Path | None = None,
    cpu_tasks_per_node: int = 1,
) -> str:
    """Render the sbatch script for ``cfg`` (pure: touches no files except reading the template).

    Args:
        cfg: the launch section.
        run_dir: the run folder (SLURM log files go there).
        config_path: the resolved config the job trains from (normally ``<run_dir>/config.yaml``).
        command: the program srun starts on each task; it receives ``--config FILE`` and the
            ``trainer.num_nodes``/``trainer.devices`` overrides that match the allocation (and
            ``trainer.accelerator=cpu`` on a CPU-only job).
        template: a ``string.Template`` file (the package's ``train.sbatch.tmpl`` by default).
        cpu_tasks_per_node: tasks per node of a CPU-only job (``launch.gpus_per_node=0``), normally
            ``trainer.devices``; unused when the job has GPUs.
    """
    template_path = Path(template) if template is not None else TEMPLATE
    if not template_path.is_file():
        raise ConfigError(f"sbatch template {template_path} not found; pass an existing template file")
    env_setup = "\n".join(cfg.env_setup) if cfg.env_setup else "# (none)"
    return Template(template_path.read_text(encoding="utf-8")).substitute(
        run_dir=str(run_dir),
        directives="\n".join(_directives(cfg, str(run_dir), cpu_tasks_per_node)),
        env_setup=env_setup,
        # torchrun's agent dies of USR1; its workers take TERM as the pre-emption signal (no requeue)
        forward_signal="TERM" if cfg.use_torchrun else "USR1",
        launch_line=_launch_line(cfg, config_path=str(config_path), command=command,
                                 cpu_tasks_per_node=cpu_tasks_per_node),
    )


def _git(args: list[str], cwd: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None


def snapshot_code_version(run_dir: str | Path, *, repo: str | Path = REPO_ROOT) -> str:
    """Write ``code_version.txt`` (commit or ``unknown``) and ``code.patch`` when the tree is dirty.

    Returns:
        The commit hash, or ``"unknown"`` outside a git checkout (or before the first commit).
    """
    run_dir = Path(run_dir)
    head = _git(["rev-parse", "HEAD"], Path(repo))
    commit = head.strip() if head else "unknown"
    lines = [f"commit: {commit}"]
    patch = _git(["diff", "HEAD", "--binary"], Path(repo)) if head else None
    if patch:
        (run_dir / "code.patch").write_text(patch, encoding="utf-8")
        lines.append(
            "dirty: yes (uncommitted changes to tracked files in code.patch; untracked files not saved)"
        )
    else:
        lines.append("dirty: no" if head else "dirty: unknown")
    (run_dir / "code_version.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return commit


def submit(
    cfg: LaunchConfig,
    *,
    run_dir: str | Path,
    config_path: str | Path,
    dry_run: bool = False,
    command: str = DEFAULT_COMMAND,
    cpu_tasks_per_node: int = 1,
) -> Path:
    """Snapshot the run into ``run_dir``, write ``train.sbatch`` and submit it with ``sbatch``.

    Args:
        cfg: the launch section.
        run_dir: the run folder; created if needed.
        config_path: the resolved config YAML; copied to ``<run_dir>/config.yaml`` unless it is that file.
        dry_run: only write the files and log the script's path.
        command: see :func:`render_sbatch`.
        cpu_tasks_per_node: see :func:`render_sbatch`.

    Returns:
        The path of the rendered script.

    Raises:
        ConfigError: the config file is missing, ``sbatch`` is not on PATH, or it refused the script
            (one line naming sbatch's own message).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    snapshot = run_dir / "config.yaml"
    source = Path(config_path).resolve()
    if not source.is_file():
        raise ConfigError(f"config file {source} does not exist")
    if source != snapshot:
        shutil.copyfile(source, snapshot)
    snapshot_code_version(run_dir)
    script = run_dir / "train.sbatch"
    script.write_text(
        render_sbatch(cfg, run_dir=run_dir, config_path=snapshot, command=command,
                      cpu_tasks_per_node=cpu_tasks_per_node),
        encoding="utf-8",
    )
    if dry_run:
        log.info("Dry run: wrote %s (submit with: sbatch %s)", script, script)
        return script
    log.info("%s", run_sbatch(script))
    return script


def run_sbatch(script: Path, *, timeout_s: float = 120.0) -> str:
    """``sbatch SCRIPT``; returns its answer ("Submitted batch job N").

    Raises:
        ConfigError: sbatch is missing, does not answer, or refuses the script; one line with its reason.
    """
    if shutil.which("sbatch") is None:
        raise ConfigError(
            f"sbatch is not on PATH; run on a SLURM login node or use --dry-run (script: {script})"
        )
    try:
        result = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, check=False,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"sbatch {script} did not answer within {timeout_s:.0f} s; is slurmctld up? "
                          "(retry, or submit the script by hand)") from None
    if result.returncode != 0:
        reason = _one_line(result.stderr) or _one_line(result.stdout) or "no message"
        raise ConfigError(f"sbatch refused {script} (exit {result.returncode}): {reason}; "
                          "fix the launch section of the config and submit again")
    return result.stdout.strip()


def _one_line(text: str) -> str:
    """sbatch's message on one line (its lines joined by '; ')."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())

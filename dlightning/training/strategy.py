"""The one place where the distributed strategy, the cluster plugins and launch sanity checks are built.

``trainer.strategy`` is a config string:

* ``auto``: one process -> Lightning's single-device strategy; more -> ``ddp`` below.
* ``ddp``: :class:`DDPStrategy` (registering its communication hook on CPU too) with
  ``find_unused_parameters=False``. This is correct because the trainable set is fixed when DDP
  wraps the model and every trainable tensor is in the graph in every phase (docs/DESIGN.md decision 2);
  a phase only decides which parameter groups step. With ``trainer.grad_sync`` (default auto) only
  the active phase's gradients are all-reduced (:mod:`dlightning.training.grad_sync`).
* ``deepspeed_stage_2``: :class:`dlightning.training.deepspeed_zero.DLoRALDeepSpeedStrategy` (ZeRO-2)
  on CUDA, or on CPU for tests and debugging. Limits: exactly one optimizer (parameter groups;
  inactive groups are held still with lr 0, never by toggling ``requires_grad``, which DeepSpeed
  fixes at init), ``optim.accumulate=1``, one global clipping norm, ``bf16-mixed`` or ``32-true``,
  and checkpoints are directories (saved atomically and resolved like files, see
  :mod:`dlightning.training.checkpointing`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import Strategy

from dlightning.errors import ConfigError
from dlightning.training.checkpointing import AtomicCheckpointIO
from dlightning.training.config import TrainerConfig, check_deepspeed_precision, global_clip_norm
from dlightning.training.grad_sync import HookedDDPStrategy, PhaseGradSync, active_allreduce_hook
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

STRATEGIES = ("auto", "ddp", "deepspeed_stage_2")


def build_strategy(
    cfg: TrainerConfig, *, batch_size: int = 1, clip_norm: dict[str, float] | None = None,
    grad_sync: PhaseGradSync | None = None,
) -> Strategy | str:
    """Build the Lightning strategy named by ``cfg.strategy``.

    Args:
        cfg: the trainer section (``strategy``, ``accelerator``, ``devices``, ``num_nodes``, ``precision``).
        batch_size: clips per micro-batch per process (DeepSpeed only).
        clip_norm: ``optim.clip_norm`` (DeepSpeed only: mapped onto one global limit).
        grad_sync: state of the phase-aware DDP all-reduce hook (DDP only; None: DDP's default).

    Returns:
        A strategy object, or the string ``"auto"`` for a single process.

    Raises:
        ConfigError: unknown strategy name; DeepSpeed not installed, or with settings it cannot honour.
    """
    name = cfg.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={name!r} is not supported; use one of {STRATEGIES}")
    if name == "deepspeed_stage_2":
        return _build_deepspeed(cfg, batch_size=batch_size, clip_norm=clip_norm or {})
    if name == "auto" and cfg.devices * cfg.num_nodes == 1:
        return "auto"
    return _build_ddp(grad_sync)


def _build_ddp(grad_sync: PhaseGradSync | None) -> Strategy:
    ddp_kwargs: dict[str, Any] = {"find_unused_parameters": False}
    if grad_sync is not None:
        ddp_kwargs.update(ddp_comm_state=grad_sync, ddp_comm_hook=active_allreduce_hook)
    return HookedDDPStrategy(**ddp_kwargs)


def _build_deepspeed(cfg: TrainerConfig, *, batch_size: int, clip_norm: dict[str, float]) -> Strategy:
    from dlightning.training.deepspeed_zero import DLoRALDeepSpeedStrategy, select_deepspeed_accelerator

    if cfg.accelerator not in ("cuda", "gpu", "auto", "cpu"):
        raise ConfigError(f"trainer.strategy=deepspeed_stage_2 runs on cuda (or cpu for tests), not "
                          f"trainer.accelerator={cfg.accelerator!r}")
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
    check_deepspeed_precision(cfg.precision)
    clip = global_clip_norm(clip_norm)
    select_deepspeed_accelerator("cpu" if on_cpu else "cuda")
    try:
        import deepspeed  # noqa: F401  (only to give a clear error; Lightning imports it itself)
    except ImportError as err:
        raise ConfigError(
            "trainer.strategy=deepspeed_stage_2 needs the deepspeed package: "
            "pip install 'dlightning[deepspeed]' "
            "(or use trainer.strategy=ddp)"
        ) from err
    return DLoRALDeepSpeedStrategy(batch_size=batch_size, clip_norm=clip, precision=cfg.precision,
                                   device_type="cpu" if on_cpu else "cuda")


def build_cluster_plugins(*, env: Mapping[str, str] | None = None) -> list[Any]:
    """Plugins for ``Trainer(plugins=...)``: the cluster environment and :class:`AtomicCheckpointIO`.

    Under SLURM (``srun`` launched, job name not ``bash``/``interactive``) this returns
    ``SLURMEnvironment(auto_requeue=False)``: Lightning's own requeue handler writes the checkpoint
    inside the signal handler, so :class:`dlightning.training.preemption.PreemptionCallback` does it
    instead. Under torchrun (``TORCHELASTIC_RUN_ID`` set) it returns ``TorchElasticEnvironment``,
    which wins over SLURM's variables when one ``srun`` task per node starts ``torchrun``.

    Args:
        env: environment to inspect (``os.environ`` when None).
    """
    env = os.environ if env is None else env
    plugins: list[Any] = []
    if "TORCHELASTIC_RUN_ID" in env:
        plugins.append(TorchElasticEnvironment())
    elif _is_slurm_launch(env):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    plugins.append(AtomicCheckpointIO())
    return plugins


def _is_slurm_launch(env: Mapping[str, str]) -> bool:
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _parse_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compact per-node counts, e.g. ``"8(x2),4"`` -> ``[8, 8, 4]``."""
    counts: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ConfigError(f"cannot parse SLURM tasks-per-node value {value!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def check_launch_environment(devices: int, num_nodes: int, *, env: Mapping[str, str] | None = None) -> None:
    """Fail fast when the SLURM allocation and ``trainer.devices``/``trainer.num_nodes`` disagree.

    A mismatch makes the ranks wait for processes that never start (a hang, not an error; Lightning
    #19883). Checked: ``SLURM_NTASKS_PER_NODE`` (or ``SLURM_TASKS_PER_NODE``) == devices,
    ``SLURM_NNODES``/``SLURM_JOB_NUM_NODES`` == num_nodes, ``SLURM_NTASKS`` == devices * num_nodes.
    Does nothing outside an ``srun`` launch.

    Raises:
        ConfigError: naming every mismatch and the fix.
    """
    env = os.environ if env is None else env
    if not _is_slurm_launch(env) or "TORCHELASTIC_RUN_ID" in env:
        # torchrun inside srun (one task per node) starts the per-GPU workers itself
        return
    problems: list[str] = []
    per_node_raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node_raw:
        per_node = set(_parse_tasks_per_node(per_node_raw))
        if per_node != {devices}:
            problems.append(
                f"SLURM starts {per_node_raw} tasks per node but trainer.devices={devices}: "
                f"set #SBATCH --ntasks-per-node={devices} (one task per GPU) or trainer.devices"
            )
    nodes_raw = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nodes_raw and int(nodes_raw) != num_nodes:
        problems.append(
            f"SLURM allocated {nodes_raw} nodes but trainer.num_nodes={num_nodes}: "
            f"set #SBATCH --nodes={num_nodes} or trainer.num_nodes={nodes_raw}"
        )
    ntasks = int(env["SLURM_NTASKS"])
    if ntasks != devices * num_nodes:
        problems.append(
            f"SLURM_NTASKS={ntasks} but trainer.devices x trainer.num_nodes = {devices * num_nodes}: "
            "launch with srun and --ntasks-per-node equal to the GPUs per node"
        )
    if problems:
        raise ConfigError(
            "The SLURM allocation does not match the trainer (this would hang at start-up):\n  - "
            + "\n  - ".join(problems)
        )

"""Composition root of training: assemble the Trainer, the module and the data from a RootConfig, then
run (or resume) ``fit``, or submit the same run to SLURM.

This is the only place that knows every section of the config; each component receives only its own.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from dlightning.config import RootConfig, check_local_paths, to_container, to_yaml
from dlightning.contracts.checkpoint_format import checkpoint_dir, list_valid_checkpoints, read_training_checkpoint
from dlightning.contracts.config_io import import_class_path
from dlightning.data.datamodule import VSRDataModule
from dlightning.errors import ConfigError
from dlightning.launch.sbatch import submit as submit_sbatch
from dlightning.resume_check import check_resume
from dlightning.tracking.loggers import LogResolvedConfig, build_logger, finish_tracking
from dlightning.training.checkpointing import StepCheckpoint
from dlightning.training.grad_sync import PhaseGradSync, build_grad_sync
from dlightning.training.module import DLoRALModule
from dlightning.training.preemption import (
    PreemptionCallback,
    find_preemption_callback,
    install_preemption_handlers,
)
from dlightning.training.progress import StepProgress
from dlightning.training.run_lock import RunLock
from dlightning.training.schedule import SchedulePhase
from dlightning.training.strategy import build_cluster_plugins, build_strategy, check_launch_environment
from dlightning.utils.logging import get_logger, global_rank

log = get_logger(__name__)

_EXPECTED_WARNINGS = (
    # The frozen VAE, text encoder, SPyNet and LPIPS are kept in eval mode on purpose.
    r".*module\(s\) in eval mode at the start of training.*",
    # The loader's __len__ is exact per rank: every worker yields its share of batches_per_epoch.
    r".*IterableDataset. has .__len__. defined.*",
    # The data module restores its own position (micro-batch index) from the checkpoint.
    r".*your dataloader is not resumable.*",
)


def build_module(cfg: RootConfig, grad_sync: PhaseGradSync | None = None) -> DLoRALModule:
    """The LightningModule, given only the sections it consumes (and the DDP gradient-sync state, if any)."""
    return DLoRALModule(model=cfg.model, loss=cfg.loss, schedule=cfg.schedule, optim=cfg.optim,
                        trainer=cfg.trainer, config_container=to_container(cfg), grad_sync=grad_sync)


def build_datamodule(cfg: RootConfig) -> VSRDataModule:
    """The data module; its phase of micro-batch m follows the same schedule as the module."""
    return VSRDataModule(cfg.data, phase_fn=SchedulePhase(cfg.schedule, cfg.optim.accumulate))


def instantiate_callbacks(specs: list[dict[str, Any]]) -> list[L.Callback]:
    """Lightning callbacks from ``trainer.callbacks`` entries ``{class_path, init_args}`` (LightningCLI's form).

    Raises:
        ConfigError: A class that cannot be imported, is not a Lightning callback, or refuses its arguments.
    """
    built = []
    for i, spec in enumerate(specs):
        cls = import_class_path(spec, f"trainer.callbacks.{i}", L.Callback, "Lightning Callback",
                                "lightning.pytorch.callbacks.EarlyStopping")
        try:
            built.append(cls(**dict(spec.get("init_args") or {})))
        except TypeError as err:
            raise ConfigError(f"trainer.callbacks.{i}: {spec['class_path']} refuses its init_args ({err})") from err
    return built


def build_trainer(cfg: RootConfig, *, callbacks: list[L.Callback] | None = None, run_id: str | None = None,
                  grad_sync: PhaseGradSync | None = None) -> L.Trainer:
    """Lightning Trainer with our strategy, checkpoint I/O, preemption handling and logger."""
    tcfg = cfg.trainer
    run_dir = Path(tcfg.run_dir)
    plugins: list[Any] = build_cluster_plugins()
    all_callbacks: list[L.Callback] = [
        StepCheckpoint(checkpoint_dir(run_dir), every=tcfg.checkpoint_every, keep=tcfg.keep_checkpoints),
        # fit requeues after it has closed the loggers: the requeue's SIGTERM reaches every process at once
        PreemptionCallback(checkpoint_dir(run_dir), requeue_in_teardown=False),
        LogResolvedConfig(to_container(cfg)),
        *([StepProgress(tcfg.max_steps)] if tcfg.lightning.get("enable_progress_bar", True) else []),
        *instantiate_callbacks(tcfg.callbacks),
        *(callbacks or []),
    ]
    if cfg.validation.every_n_steps > 0:
        from dlightning.training.validation import VideoValidation  # imports the inference stack

        all_callbacks.append(VideoValidation(cfg.validation, run_dir))
    arguments: dict[str, Any] = dict(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=build_strategy(tcfg, batch_size=cfg.data.batch_size, clip_norm=cfg.optim.clip_norm,
                                grad_sync=grad_sync),
        precision=tcfg.precision,
        max_steps=-1,
        max_epochs=-1,
        logger=build_logger(cfg.logging, run_dir, run_id=run_id),
        callbacks=all_callbacks,
        plugins=plugins,
        default_root_dir=str(run_dir),
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        deterministic=tcfg.deterministic,
        enable_model_summary=False,
    )
    # Any other Trainer argument from the config (trainer.<name>) wins over these defaults.
    arguments.update({k: v for k, v in tcfg.lightning.items() if k != "enable_progress_bar"})
    # Lightning refuses a ModelCheckpoint from the config while its own checkpointing is off.
    arguments["enable_checkpointing"] = any(isinstance(cb, ModelCheckpoint) for cb in all_callbacks)
    # StepProgress shows optimizer steps; Lightning's bar would count batches of a virtual epoch.
    arguments["enable_progress_bar"] = False
    return L.Trainer(**arguments)


def fit(cfg: RootConfig, *, fresh: bool = False, callbacks: list[L.Callback] | None = None) -> DLoRALModule:
    """Train from scratch, or resume from the newest valid checkpoint in ``trainer.run_dir``.

    Args:
        cfg: the resolved configuration.
        fresh: start from scratch; refused while the run folder holds checkpoints (the new run's
            checkpoints would be pruned in favour of the old run's higher step numbers).
        callbacks: extra Lightning callbacks (tests use them to observe training).

    Returns:
        The trained module.

    Raises:
        ConfigError: before anything heavy, for a SLURM allocation that does not match, a run folder
            whose checkpoints cannot be used, or data sources that cannot be read.
    """
    # Before anything slow: a SLURM signal during start-up must be recorded, not kill the process.
    install_preemption_handlers()
    tcfg = cfg.trainer
    check_local_paths(cfg)
    instantiate_callbacks(tcfg.callbacks)  # a bad class_path fails before anything is built
    check_launch_environment(tcfg.devices, tcfg.num_nodes)
    run_dir = Path(tcfg.run_dir)
    datamodule = build_datamodule(cfg)
    datamodule.check_sources(world_size=tcfg.devices * tcfg.num_nodes)  # before the model is built
    rank_zero = global_rank() == 0
    lock = RunLock(run_dir).acquire() if rank_zero else None  # one fit per run folder
    try:
        return _fit_in_locked_folder(cfg, datamodule, fresh=fresh, callbacks=callbacks, rank_zero=rank_zero)
    finally:
        if lock is not None:
            lock.release()


def _fit_in_locked_folder(cfg: RootConfig, datamodule: VSRDataModule, *, fresh: bool,
                          callbacks: list[L.Callback] | None, rank_zero: bool) -> DLoRALModule:
    """The part of :func:`fit` that runs while this process holds the run folder's lock."""
    tcfg = cfg.trainer
    run_dir = Path(tcfg.run_dir)
    ckpt = _checkpoint_to_resume(run_dir, fresh)
    if ckpt:
        stored = read_training_checkpoint(ckpt).config
        check_resume(stored, to_container(cfg), checkpoint=ckpt, run_dir=run_dir, record=rank_zero)
        log.info("resuming from %s", ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(tcfg.seed, workers=True, verbose=False)
    # One state: the strategy's DDP hook reads it, the module sets its phase at every step.
    grad_sync = build_grad_sync(tcfg, cfg.optim)
    module = build_module(cfg, grad_sync)
    trainer = build_trainer(cfg, callbacks=callbacks, grad_sync=grad_sync)
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except BaseException:
        finish_tracking(trainer, exit_code=1)
        raise
    _end_segment(trainer)
    return module


def _end_segment(trainer: L.Trainer) -> None:
    """Close the loggers, then (after a pre-emption) requeue: the requeue must be the segment's last act."""
    preemption = find_preemption_callback(trainer.callbacks)
    preempted = preemption is not None and preemption.preempted
    finish_tracking(trainer, shutdown=preempted)
    if preemption is None:
        return
    preemption.end_segment()
    if preemption.requeue_failed:
        raise RuntimeError("training stopped for a pre-emption but the SLURM requeue failed (see the log); "
                           f"resubmit the job to resume from {preemption.checkpoint_path}")


def _checkpoint_to_resume(run_dir: Path, fresh: bool) -> str | None:
    """The checkpoint to resume from, None for a fresh start, or an error when the folder is unusable."""
    folder = checkpoint_dir(run_dir)
    named = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    if fresh and named:
        raise ConfigError(f"--fresh, but {folder} already holds checkpoints ({', '.join(named[:3])}...): "
                          "move or delete that folder, or choose another trainer.run_dir")
    if not named:
        return None
    found = list_valid_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{folder} holds checkpoints but none is readable ({', '.join(named[:3])}): "
                          "move them away to start from scratch, or restore a good one")
    return found[-1][0]


def submit(cfg: RootConfig, *, dry_run: bool = False) -> Path:
    """Write the resolved config into ``<trainer.run_dir>/config.yaml`` and submit the run to SLURM.

    ``trainer.num_nodes``/``trainer.devices`` in the snapshot are set from the launch section, so the
    config and the allocation cannot disagree (a CPU-only job, ``launch.gpus_per_node=0``, keeps
    ``trainer.devices`` as its tasks per node and trains on ``cpu``); the run folder is made absolute
    because the job may start in another directory.

    Returns:
        The rendered ``train.sbatch``.

    Raises:
        ConfigError: a missing local path, a CPU-only job with a GPU accelerator, or sbatch refusing the job.
    """
    check_local_paths(cfg)  # a job must not wait in the queue only to fail on a missing file
    launch = cfg.launch
    if launch.cpu_only:
        if cfg.trainer.accelerator not in ("auto", "cpu"):
            raise ConfigError(f"launch.gpus_per_node=0 is a CPU-only job but trainer.accelerator="
                              f"{cfg.trainer.accelerator!r}; set trainer.accelerator=cpu or give the job GPUs")
        cfg.trainer.accelerator = "cpu"
    cfg.trainer.num_nodes = launch.nodes
    cfg.trainer.devices = launch.tasks_per_node(cfg.trainer.devices)
    run_dir = Path(cfg.trainer.run_dir).resolve()
    cfg.trainer.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(to_yaml(cfg), encoding="utf-8")
    return submit_sbatch(launch, run_dir=run_dir, config_path=config_path, dry_run=dry_run,
                         cpu_tasks_per_node=cfg.trainer.devices)

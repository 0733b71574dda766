"""Experiment tracking: W&B (online, offline, disabled), TensorBoard or CSV through Lightning's loggers."""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from dlightning.errors import ConfigError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

WANDB_ID_FILE = "wandb_run_id"
"""File in the run folder holding the W&B run id, so requeued jobs log into the same run."""


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` is online when an API key is configured and offline otherwise."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def build_logger(cfg: Any, run_dir: str | Path, *, run_id: str | None = None) -> Logger | bool:
    """The Lightning logger chosen by ``logging.backend`` (a LoggingConfig section)."""
    run_dir = Path(run_dir)
    if cfg.backend == "none":
        return False
    if cfg.backend == "csv":
        return CSVLogger(str(run_dir), name="logs")  # version_N per (re)start: a resume never overwrites
    if cfg.backend == "tensorboard":
        return TensorBoardLogger(str(run_dir), name="tb")
    mode = resolve_wandb_mode(cfg.wandb_mode)
    run_id = run_id or stable_run_id(run_dir)
    os.environ["WANDB_MODE"] = mode
    log.info("W&B run %s in %s mode", run_id, mode)
    return _wandb_logger_class()(project=cfg.project, entity=cfg.entity, name=cfg.run_name, id=run_id,
                                 resume="allow", save_dir=str(run_dir), offline=(mode == "offline"), mode=mode)


@functools.cache
def _wandb_logger_class() -> type[Logger]:
    """:class:`WandbLogger` that outlives its W&B service (built on first use: wandb imports slowly)."""
    from lightning.pytorch.loggers import WandbLogger

    class ServiceTolerantWandbLogger(WandbLogger):
        """A WandbLogger whose lost service stops the logging, not the training.

        SLURM sends SIGTERM to every process of a job (scancel, pre-emption, the time limit), and the
        W&B service (``wandb-core``) exits on it whatever disposition it inherits, because it catches
        SIGTERM itself; SIGUSR1 it ignores. The trainer then still has to reach its step boundary and
        save the checkpoint, so a lost connection is reported once and later calls are dropped.
        """

        service_lost = False

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            """Log unless the service is gone."""
            if not self.service_lost:
                try:
                    super().log_metrics(metrics, step)
                except ConnectionError as err:
                    self._lose_service(err)

        def log_hyperparams(self, params: Any) -> None:
            """Update the run config unless the service is gone."""
            if not self.service_lost:
                try:
                    super().log_hyperparams(params)
                except ConnectionError as err:
                    self._lose_service(err)

        def _lose_service(self, err: ConnectionError) -> None:
            self.service_lost = True
            log.warning("The W&B service is gone (%s: %s; it exits on SIGTERM): W&B logging stops here, "
                        "training goes on", type(err).__name__, err)

    return ServiceTolerantWandbLogger


class LogResolvedConfig(Callback):
    """Log the resolved configuration to every logger of the trainer, on global rank 0, when ``fit`` starts.

    It runs after the strategy has set up the process group, so the rank is known on every launcher.
    W&B shows it as the run config (updated in place on a resume), CSV writes ``hparams.yaml`` next to
    ``metrics.csv``, TensorBoard its hparams table.

    Args:
        config: the resolved config as plain containers (``dlightning.config.to_container``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Send the config to each logger once per ``fit``."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)


def finish_tracking(trainer: Trainer, *, exit_code: int = 0, shutdown: bool = False) -> None:
    """Close the W&B run that this trainer's W&B logger opened (rank 0; no-op for other backends).

    Lightning's ``WandbLogger`` never finishes its run, and a later ``WandbLogger`` in the same process
    silently logs into the run still in progress, whatever its id. Closing it at the end of ``fit``
    lets back-to-back fits (and tests) each log into their own run; a process exit still closes it too.

    Args:
        trainer: the trainer whose loggers to close.
        exit_code: recorded as the run's exit code.
        shutdown: also stop the W&B service and wait for it (``wandb.teardown``), so that nothing of
            W&B is left running for a following ``scontrol requeue`` to cut off.
    """
    from lightning.pytorch.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers or not trainer.is_global_zero:
        return
    import wandb

    lost = any(getattr(lg, "service_lost", False) for lg in loggers)
    run = wandb.run
    if not lost and run is not None and run.id in {lg.version for lg in loggers}:
        try:
            run.finish(exit_code=exit_code)
        except ConnectionError as err:
            log.warning("The W&B service is gone (%s); the run's last records may be missing", err)
            lost = True
    if shutdown or lost:
        _teardown_service(wandb, exit_code)


def _teardown_service(wandb: Any, exit_code: int) -> None:
    """Stop the W&B service and wait for it; one that has died is forgotten without a traceback."""
    try:
        # teardown unregisters W&B's exit hook before it talks to the service, so a dead service
        # no longer makes the interpreter print a traceback at exit
        wandb.teardown(exit_code)
    except ConnectionError as err:
        log.debug("W&B teardown without its service: %s", err)
    except SystemExit as exn:  # wandb.teardown exits with the service's own exit code when it is not 0
        log.warning("The W&B service ended with exit code %s", exn.code)


def stable_run_id(run_dir: str | os.PathLike[str]) -> str:
    """Return the W&B run id of this run folder, creating ``<run_dir>/wandb_run_id`` on first use.

    Requeued SLURM jobs and manual restarts reuse the folder, so they log into the same W&B run
    (pass it as ``WandbLogger(id=..., resume="allow")``). Call it on rank 0 before the logger starts,
    or on all ranks of a shared filesystem (creation is exclusive, so racing ranks agree).
    """
    path = Path(run_dir) / WANDB_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Write the id to a private file, then hard-link it into place: the link either creates the
        # complete file or fails because another process won the race, so nobody reads a half-written id.
        tmp = path.with_name(f"{WANDB_ID_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(uuid.uuid4().hex[:12] + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.debug("%s was created concurrently; using the existing id", path)
        finally:
            tmp.unlink()
    run_id = path.read_text(encoding="utf-8").strip()
    if not run_id:
        raise ConfigError(f"{path} is empty; delete it to start a new W&B run id or write the id into it")
    return run_id

"""W&B through Lightning's ``WandbLogger``: the mode, the run folder, a stable run id, and closing the run.

wandb is imported only when a W&B logger is built (it imports slowly), so the other backends and the
rest of the package never pay for it.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger

from dlightning.contracts.run_layout import WANDB_ID_FILE, logs_dir
from dlightning.errors import ConfigError
from dlightning.tracking.credentials import find_wandb_credentials
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled", "shared": "shared"}
"""The values of WANDB_MODE that wandb accepts, and the mode each one means."""

FLUSH_INTERVAL_S = 0.5
"""How often wandb-core writes buffered records to the run's ``.wandb`` file (wandb's default is 15 s).

wandb-core handles SIGTERM itself with a forced shutdown that drops what it has not written yet, and
SLURM sends SIGTERM to every process of a job (``scancel``, pre-emption, the time limit): with the
default, a segment cut that way lost its last 15 s of records, or the whole run when it was younger.
The Go runtime installs its own handler whatever disposition the service inherits, so ignoring the
signal in the parent does not reach it; flushing often bounds the loss to the last half second.
``WANDB__TRANSACTION_LOG_FLUSH_INTERVAL`` in the environment wins over this."""
_FLUSH_ENV = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"


def wandb_mode_decision(mode: str) -> tuple[str, str]:
    """The W&B mode to run in and why: ``(mode, reason)``; the reason names a source, never a key.

    A ``WANDB_MODE`` environment variable wins over ``logging.wandb_mode``; ``auto`` is online when W&B
    would find credentials (:func:`~dlightning.tracking.credentials.find_wandb_credentials`), else offline.

    Raises:
        ConfigError: ``WANDB_MODE`` holds a value wandb does not accept.
    """
    env = os.environ.get("WANDB_MODE")
    if env:
        if env.lower() not in _ENV_MODES:
            raise ConfigError(f"WANDB_MODE={env!r} is not a W&B mode; use one of {sorted(_ENV_MODES)} or unset it")
        return _ENV_MODES[env.lower()], f"WANDB_MODE={env} in the environment (it wins over logging.wandb_mode)"
    if mode != "auto":
        return mode, f"logging.wandb_mode={mode}"
    source = find_wandb_credentials()
    if source is not None:
        return "online", f"logging.wandb_mode=auto and W&B credentials in {source}"
    return "offline", ("logging.wandb_mode=auto and no W&B credentials (no WANDB_API_KEY, netrc entry or "
                       "settings file); sync later with `wandb sync`")


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode :func:`wandb_mode_decision` picks for ``logging.wandb_mode=mode``."""
    return wandb_mode_decision(mode)[0]


def build_wandb_logger(cfg: Any, run_dir: str | os.PathLike[str], *, run_id: str | None = None) -> Logger:
    """A ``WandbLogger`` for the ``logging`` section ``cfg``, logging into the run id of ``run_dir``.

    It writes under ``<run_dir>/logs/wandb`` unless ``WANDB_DIR`` is set (then W&B's own folder wins).
    """
    mode, reason = wandb_mode_decision(cfg.wandb_mode)
    run_id = run_id or stable_run_id(run_dir)
    user_dir = os.environ.get("WANDB_DIR")
    # passed on explicitly: wandb reads WANDB_DIR only once per process, when it first sets up
    save_dir = Path(user_dir) if user_dir else logs_dir(run_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    where = f"WANDB_DIR={user_dir}" if user_dir else str(save_dir)
    log.info("W&B run %s in %s mode (%s), writing under %s", run_id, mode, reason, where)
    extra: dict[str, Any] = {}
    if mode != "disabled" and not os.environ.get(_FLUSH_ENV):
        import wandb

        extra["settings"] = wandb.Settings(x_transaction_log_flush_interval=FLUSH_INTERVAL_S)
    # offline=False: Lightning's offline flag only refuses log_model and rewrites WANDB_MODE; the mode
    # itself reaches wandb.init, which keeps offline artifacts for `wandb sync`.
    return _wandb_logger_class()(
        project=cfg.project, entity=cfg.entity, name=cfg.run_name, id=run_id, resume="allow",
        save_dir=str(save_dir), offline=False, mode=mode,
        tags=list(cfg.wandb_tags) or None, group=cfg.wandb_group, notes=cfg.wandb_notes,
        job_type=cfg.wandb_job_type, log_model=cfg.wandb_log_model, **extra,
    )


@functools.cache
def _wandb_logger_class() -> type[Logger]:
    """:class:`WandbLogger` that outlives its W&B service (built on first use: wandb imports slowly)."""
    from lightning.pytorch.loggers import WandbLogger

    class ServiceTolerantWandbLogger(WandbLogger):
        """A WandbLogger whose lost service stops the logging, not the training.

        SLURM sends SIGTERM to every process of a job (scancel, pre-emption, the time limit), and the
        W&B service (``wandb-core``) shuts down on it whatever disposition it inherits, because it
        handles SIGTERM itself; SIGUSR1 it ignores. The trainer then still has to reach its step
        boundary and save the checkpoint, so a lost connection is reported once and later calls are
        dropped. Everything logged goes through :meth:`log_metrics` (media too), so this one guard covers it.
        """

        service_lost = False

        def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
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

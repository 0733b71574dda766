"""SLURM pre-emption: note the signal, checkpoint at the next optimizer-step boundary, requeue, stop.

Lightning's own SLURM handler saves the checkpoint *inside* the signal handler (possibly mid-backward;
Lightning #21406) and its SIGTERM handler runs a collective inside the handler. This callback instead
only sets a flag in the handler; all the work happens in ``on_train_batch_end``. Use it together with
``SLURMEnvironment(auto_requeue=False)`` (see :func:`dlightning.training.strategy.build_cluster_plugins`).

Contract with the LightningModule: ``pl_module.optimizer_step`` is an int counting completed optimizer
steps. A batch end is a step boundary when ``pl_module.at_step_boundary`` is True if the module defines
that bool attribute (set it True right after an optimizer step, False after a micro-batch that only
accumulated), otherwise when ``optimizer_step`` changed since the previous batch end. Every rank reaches
the same boundaries (they step in lockstep), which is where the collective agreement runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dlightning.contracts.checkpoint_format import step_checkpoint_name
from dlightning.errors import ConfigError
from dlightning.training.checkpointing import ensure_dlightning_block, read_optimizer_step, save_checkpoint_atomically
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

_Handler = Any  # what signal.getsignal returns: a callable, an int or None


def slurm_requeue_target(env: dict[str, str] | None = None) -> str | None:
    """The id for ``scontrol requeue``: ``ARRAYJOBID_TASKID`` for array jobs, else ``SLURM_JOB_ID``."""
    env = dict(os.environ) if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str, *, scontrol: str = "scontrol", timeout_s: float = 30.0) -> bool:
    """Run ``scontrol requeue <job_id>`` (found on PATH); log and return whether it succeeded."""
    executable = shutil.which(scontrol)
    if executable is None:
        log.error(
            "Cannot requeue SLURM job %s: %r is not on PATH; resubmit the job by hand", job_id, scontrol
        )
        return False
    try:
        result = subprocess.run(
            [executable, "requeue", job_id], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        log.error(
            "scontrol requeue %s did not answer within %.0f s; resubmit the job by hand", job_id, timeout_s
        )
        return False
    if result.returncode != 0:
        log.error(
            "scontrol requeue %s failed (exit %d): %s", job_id, result.returncode, result.stderr.strip()
        )
        return False
    log.info("Requeued SLURM job %s", job_id)
    return True


def _signal_from_name(name: str | int | signal.Signals) -> signal.Signals:
    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int):
        return signal.Signals(name)
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return signal.Signals[key]
    except KeyError:
        raise ConfigError(f"unknown signal {name!r}; use a name such as 'SIGUSR1' or 'SIGTERM'") from None


class PreemptionCallback(Callback):
    """Checkpoint at the next optimizer-step boundary after a signal, then requeue (SLURM) and stop.

    On any rank's signal, all ranks agree (``reduce_boolean_decision(..., all=False)``), save
    ``<dirpath>/preempt-{step:08d}.ckpt`` collectively, rank 0 runs ``scontrol requeue`` when the
    signal is one of ``requeue_signals`` and a SLURM job id is known, and ``trainer.should_stop`` is
    set on every rank so ``fit`` returns normally (exit status 0).

    Args:
        dirpath: folder for the preemption checkpoint, normally ``checkpoint_dir(run_dir)``.
        signals: signals to catch. SIGUSR1 is what ``#SBATCH --signal=SIGUSR1@90`` sends before the
            time limit; SIGTERM is what SLURM sends on pre-emption and ``scancel``.
        requeue_signals: subset of ``signals`` after which the job is requeued. SIGTERM is not in it
            by default because ``scancel`` also sends it (a pre-emption with ``PreemptMode=REQUEUE``
            is requeued by SLURM itself).
        scontrol: the scontrol executable, looked up on PATH.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        signals: Sequence[str | int] = ("SIGUSR1", "SIGTERM"),
        requeue_signals: Sequence[str | int] = ("SIGUSR1",),
        scontrol: str = "scontrol",
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signals = tuple(dict.fromkeys(_signal_from_name(s) for s in signals))
        self.requeue_signals = {_signal_from_name(s) for s in requeue_signals}
        if not self.requeue_signals <= set(self.signals):
            raise ConfigError("requeue_signals must be a subset of signals")
        self.scontrol = scontrol
        self.preempted = False
        """True once this callback saved a preemption checkpoint and asked the trainer to stop."""
        self.checkpoint_path: Path | None = None
        self.requeue_failed = False
        """True when the requeue was asked for and ``scontrol`` failed (``fit`` then raises)."""
        self._received: signal.Signals | None = None
        self._requeue_requested = False
        self._last_step: int | None = None
        self._previous_handlers: dict[signal.Signals, _Handler] = {}

    # -- signal handling: flag only, no I/O, no collectives --------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self._received = sig
        if sig in self.requeue_signals:
            self._requeue_requested = True

    @property
    def signal_received(self) -> bool:
        """Whether this process got one of the signals since training started."""
        return self._received is not None

    def install_handlers(self) -> None:
        """Install the flag-setting handlers (main thread only), replacing Lightning's for these signals."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("Not in the main thread: pre-emption signals will not be caught")
            return
        for sig in self.signals:
            # keep the handler from before our first install (a re-install must not record our own)
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)

    def restore_handlers(self) -> None:
        """Put back the handlers that were active before :meth:`install_handlers`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Catch signals from the start of ``fit`` (SIGUSR1's default action would kill the process)."""
        if stage == "fit":
            self.install_handlers()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install again: Lightning adds its SIGTERM handler (which runs a collective) after ``setup``."""
        self._last_step = read_optimizer_step(pl_module)
        self.install_handlers()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Restore the previous signal handlers."""
        self.restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Restore the previous signal handlers when training fails."""
        self.restore_handlers()

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Make sure every checkpoint has the dlightning block."""
        ensure_dlightning_block(checkpoint, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """At a step boundary: agree across ranks; checkpoint, requeue and stop if any rank was signalled."""
        if self.preempted or not self._at_step_boundary(pl_module):
            return
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        requeue = strategy.reduce_boolean_decision(self._requeue_requested, all=False)
        step = read_optimizer_step(pl_module)
        self.checkpoint_path = self.dirpath / step_checkpoint_name(step, prefix="preempt")
        log.info("Pre-emption signal received: saving %s at optimizer step %d", self.checkpoint_path, step)
        save_checkpoint_atomically(trainer, self.checkpoint_path)
        if trainer.is_global_zero and requeue:
            job_id = slurm_requeue_target()
            if job_id is None:
                log.warning("Signal asks for a requeue but no SLURM job id is set; not requeueing")
            else:
                self.requeue_failed = not requeue_slurm_job(job_id, scontrol=self.scontrol)
        self.preempted = True
        trainer.should_stop = True

    def _at_step_boundary(self, pl_module: LightningModule) -> bool:
        flag = getattr(pl_module, "at_step_boundary", None)
        step = read_optimizer_step(pl_module)
        changed = step != self._last_step
        self._last_step = step
        if isinstance(flag, bool):
            return flag
        return changed

"""SLURM pre-emption: note the signal, checkpoint at the next optimizer-step boundary, end the segment, requeue.

Lightning's own SLURM handler saves the checkpoint *inside* the signal handler (possibly mid-backward;
Lightning #21406) and its SIGTERM handler runs a collective inside the handler. Here the handler only
records the signal (:class:`SignalLatch`); all the work happens in ``on_train_batch_end``. Use it
together with ``SLURMEnvironment(auto_requeue=False)`` (see
:func:`dlightning.training.strategy.build_cluster_plugins`).

Lifetime of the handler: :func:`install_preemption_handlers` runs first thing in ``dlightning fit``,
before the model is built, and the signals are never put back to their default action: SLURM may send
its time-limit warning up to a minute early, after training ended, and SIGUSR1's default action
would turn a finished run into a FAILED job. A signal nobody acts on any more is a no-op, also while
the interpreter shuts down: Python puts its handlers back to the default action then, so an exit hook
sets the signals to ``SIG_IGN`` first (only at exit: children started later would inherit it).

End of a pre-empted segment (:meth:`PreemptionCallback.end_segment`), in this order: the checkpoint
is already written, the caller has closed its loggers, the pre-emption signals are set to ``SIG_IGN``
and then rank 0 runs ``scontrol requeue``. The requeue sends SIGTERM to every process of the job at
once, so it must be the last thing the segment does, and the ignored signals keep that SIGTERM from
cutting the exit short.

Contract with the LightningModule: ``pl_module.optimizer_step`` is an int counting completed optimizer
steps. A batch end is a step boundary when ``pl_module.at_step_boundary`` is True if the module defines
that bool attribute (set it True right after an optimizer step, False after a micro-batch that only
accumulated), otherwise when ``optimizer_step`` changed since the previous batch end. Every rank reaches
the same boundaries (they step in lockstep), which is where the collective agreement runs.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dlightning.contracts.checkpoint_format import step_checkpoint_name
from dlightning.errors import ConfigError
from dlightning.training.checkpointing import ensure_dlightning_block, read_optimizer_step, save_checkpoint_atomically
from dlightning.utils.logging import get_logger
from dlightning.utils.signals import LATCH, PREEMPTION_SIGNALS, SignalLatch, in_main_thread

log = get_logger(__name__)



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


def install_preemption_handlers(signals: Sequence[str | int] = PREEMPTION_SIGNALS) -> SignalLatch:
    """Catch the pre-emption signals from now until the process exits; forget earlier runs' signals.

    Call it first thing when a run starts (``fit`` does), so a signal during start-up is recorded,
    acted on at the first step boundary, and never kills the process. Signals caught since the
    command line armed the latch (:func:`dlightning.utils.signals.arm_preemption_signals`, before the
    heavy imports) belong to this run and are kept.
    """
    if not LATCH.armed:
        LATCH.clear()
    LATCH.armed = False
    if LATCH.install(_signal_from_name(s) for s in signals):
        _ignore_at_exit()
    return LATCH


@functools.cache
def _ignore_at_exit() -> None:
    """Register, once, the exit hook that ignores the signals before Python resets its handlers."""
    atexit.register(ignore_preemption_signals)


def ignore_preemption_signals(signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS) -> None:
    """Set ``signals`` to ``SIG_IGN`` for the rest of the process: it is exiting, or its segment is over.

    Ignored dispositions survive the interpreter's shutdown (which resets Python-level handlers to the
    default action) and are inherited by children, such as ``scontrol``.
    """
    if not in_main_thread():
        return
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionCallback(Callback):
    """Checkpoint at the next optimizer-step boundary after a signal, stop, then requeue (SLURM).

    On any rank's signal, all ranks agree (``reduce_boolean_decision(..., all=False)``), save
    ``<dirpath>/preempt-{step:08d}.ckpt`` collectively and set ``trainer.should_stop``, so ``fit``
    returns normally (exit status 0). The requeue happens in :meth:`end_segment`: in the ``teardown``
    hook by default, or called by the owner of the run after it closed its loggers
    (``requeue_in_teardown=False``, what ``dlightning fit`` does). Rank 0 requeues when the signal was
    one of ``requeue_signals`` and a SLURM job id is known.

    Args:
        dirpath: folder for the preemption checkpoint, normally ``checkpoint_dir(run_dir)``.
        signals: signals to act on. SIGUSR1 is what ``#SBATCH --signal=SIGUSR1@90`` sends before the
            time limit; SIGTERM is what SLURM sends on pre-emption and ``scancel``.
        requeue_signals: subset of ``signals`` after which the job is requeued. SIGTERM is not in it
            by default because ``scancel`` also sends it (a pre-emption with ``PreemptMode=REQUEUE``
            is requeued by SLURM itself).
        scontrol: the scontrol executable, looked up on PATH.
        requeue_in_teardown: run :meth:`end_segment` from the ``teardown`` hook.
        latch: where the signals are recorded (the process-wide :data:`LATCH` by default, so signals
            caught before the callback existed count).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        signals: Sequence[str | int] = PREEMPTION_SIGNALS,
        requeue_signals: Sequence[str | int] = ("SIGUSR1",),
        scontrol: str = "scontrol",
        requeue_in_teardown: bool = True,
        latch: SignalLatch | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signals = tuple(dict.fromkeys(_signal_from_name(s) for s in signals))
        self.requeue_signals = {_signal_from_name(s) for s in requeue_signals}
        if not self.requeue_signals <= set(self.signals):
            raise ConfigError("requeue_signals must be a subset of signals")
        self.scontrol = scontrol
        self.requeue_in_teardown = requeue_in_teardown
        self.latch = LATCH if latch is None else latch
        self.preempted = False
        """True once this callback saved a preemption checkpoint and asked the trainer to stop."""
        self.checkpoint_path: Path | None = None
        self.requeue_failed = False
        """True when the requeue was asked for and ``scontrol`` failed (``fit`` then raises)."""
        self._requeue_pending = False
        self._last_step: int | None = None

    @property
    def signal_received(self) -> bool:
        """Whether this process got one of the signals since the run started."""
        return self.latch.got_any(self.signals)

    @property
    def requeue_requested(self) -> bool:
        """Whether this process got one of the requeue signals since the run started."""
        return self.latch.got_any(self.requeue_signals)

    def install_handlers(self) -> None:
        """Make the latch the handler of the signals again (main thread only), replacing Lightning's."""
        if self.latch.install(self.signals):
            _ignore_at_exit()

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Catch the signals from the start of ``fit`` when nobody installed the latch earlier."""
        if stage == "fit":
            self.install_handlers()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install again: Lightning puts its own SIGTERM handler (which runs a collective) in place after ``setup``."""
        self._last_step = read_optimizer_step(pl_module)
        self.install_handlers()
        # Lightning's handler also called ours (it chains the previous one), so a SIGTERM that came in
        # between is recorded here; its own flag would end the run with SIGTERMException, no checkpoint.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """End a pre-empted segment here unless the owner of the run does it after closing its loggers."""
        if stage == "fit" and self.requeue_in_teardown:
            self.end_segment()

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Make sure every checkpoint has the dlightning block."""
        ensure_dlightning_block(checkpoint, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """At a step boundary: agree across ranks; checkpoint and stop if any rank was signalled."""
        if self.preempted or not self._at_step_boundary(pl_module):
            return
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        requeue = strategy.reduce_boolean_decision(self.requeue_requested, all=False)
        step = read_optimizer_step(pl_module)
        self.checkpoint_path = self.dirpath / step_checkpoint_name(step, prefix="preempt")
        log.info("Pre-emption signal received: saving %s at optimizer step %d", self.checkpoint_path, step)
        save_checkpoint_atomically(trainer, self.checkpoint_path)
        self._requeue_pending = requeue and trainer.is_global_zero
        self.preempted = True
        trainer.should_stop = True

    # -- the end of a pre-empted segment -----------------------------------------------------------------
    def end_segment(self) -> None:
        """After a pre-emption stop: ignore the signals from now on, then requeue (rank 0, once).

        Call it after everything else the segment does (loggers closed): ``scontrol requeue`` sends
        SIGTERM to every process of the job. Does nothing when training was not pre-empted.
        """
        if not self.preempted:
            return
        ignore_preemption_signals(self.signals)
        if not self._requeue_pending:
            return
        self._requeue_pending = False
        job_id = slurm_requeue_target()
        if job_id is None:
            log.warning("Signal asks for a requeue but no SLURM job id is set; not requeueing")
            return
        self.requeue_failed = not requeue_slurm_job(job_id, scontrol=self.scontrol)

    def _at_step_boundary(self, pl_module: LightningModule) -> bool:
        flag = getattr(pl_module, "at_step_boundary", None)
        step = read_optimizer_step(pl_module)
        changed = step != self._last_step
        self._last_step = step
        if isinstance(flag, bool):
            return flag
        return changed


def find_preemption_callback(callbacks: Iterable[Callback]) -> PreemptionCallback | None:
    """The trainer's :class:`PreemptionCallback`, if it has one."""
    return next((cb for cb in callbacks if isinstance(cb, PreemptionCallback)), None)

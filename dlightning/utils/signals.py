"""The pre-emption signal latch: a handler that only records, installable before any heavy import.

SLURM sends SIGUSR1 (the time-limit warning) and SIGTERM to every process of a job step, at any time,
also while Python is still importing torch and Lightning for several seconds; SIGUSR1's default action
kills the process. ``dlightning fit`` therefore arms this latch as its very first step
(:func:`arm_preemption_signals`), and the training's pre-emption callback
(:mod:`dlightning.training.preemption`) acts on what it recorded at the first step boundary.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)
"""SIGUSR1: SLURM's warning before the time limit (``--signal``) or ``scancel --signal=USR1``;
SIGTERM: ``scancel``, pre-emption, the time limit itself and ``scontrol requeue``."""


def in_main_thread() -> bool:
    """Whether this is the main thread (the only one that may install signal handlers)."""
    return threading.current_thread() is threading.main_thread()


class SignalLatch:
    """Process-wide record of the pre-emption signals received since the current run began.

    The handler only records: no I/O, no collectives, nothing that could run in the middle of a
    backward pass or a checkpoint write. Whoever acts on a signal reads :attr:`received`.
    """

    def __init__(self) -> None:
        self.received: dict[signal.Signals, int] = {}
        """Signal -> how many times it arrived since :meth:`clear`."""
        self.armed = False
        """True from :func:`arm_preemption_signals` until the run's own install takes over."""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: count the signal."""
        sig = signal.Signals(signum)
        self.received[sig] = self.received.get(sig, 0) + 1

    def got_any(self, signals: Iterable[signal.Signals]) -> bool:
        """Whether one of ``signals`` arrived since the last :meth:`clear`."""
        return any(sig in self.received for sig in signals)

    def clear(self) -> None:
        """Forget the signals received so far (a new run starts)."""
        self.received = {}

    def install(self, signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS) -> bool:
        """Make :meth:`handle` the handler of ``signals``; False (and a warning) outside the main thread."""
        if not in_main_thread():
            logging.getLogger(__name__).warning("Not in the main thread: pre-emption signals will not be caught")
            return False
        for sig in signals:
            signal.signal(sig, self.handle)
        return True

    def is_installed(self, sig: signal.Signals) -> bool:
        """Whether this latch is the current handler of ``sig``."""
        return signal.getsignal(sig) == self.handle


LATCH = SignalLatch()
"""The latch of this process: armed by the command line, installed by each run, read by the callback."""


def arm_preemption_signals() -> None:
    """Record the pre-emption signals from now on, for the run this process is about to start."""
    LATCH.clear()
    LATCH.armed = LATCH.install()

"""Preemption: turn SIGTERM / SIGINT into a checkpoint at the next step boundary and a clean exit.

Clusters send SIGTERM some time before they kill a job (preemption, time limits, ``scancel``), and
``torchrun`` forwards the signal it receives to its workers. A trainer wraps its loop in ``Preemption``:

    with Preemption() as stop:
        for ...:
            ... one optimizer step ...
            if stop.should_stop(info):      # after the step, every step (a collective when distributed)
                save(); break
    if stop.stopped:
        raise SystemExit(stop.exit_code)    # 128 + signal number: 143 for SIGTERM, 130 for SIGINT

The handler only records the signal; the step in progress always finishes. ``should_stop`` all-reduces the
signal number (MAX) over the process group when there is more than one process, so all ranks stop after the
same step even when only some of them were signalled, and all exit with the same status. Further signals
while stopping are recorded and otherwise ignored (use SIGKILL to abort at once). The handlers are
installed on entry and the previous ones restored on exit; off the main thread nothing is installed (Python
only allows handlers there) and ``should_stop`` still takes part in the collective. Processes forked while
the handlers are installed (data-loader workers) ignore the signals they inherit this way, and leave the
decision to the trainer.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Dict, Optional, Sequence

from shared import collectives
from shared.runlog import get_logger

log = get_logger("shared.preemption")  # labelled with the process's rank, like every run line

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code_for(signum: int) -> int:
    """The shell's status for a process ended by ``signum`` (128 + n): 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


def worker_ignores_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: loader workers ignore SIGTERM / SIGINT and leave them to the trainer.

    PyTorch gives each worker a C handler that ends it on SIGTERM; a signal sent to the whole process group
    (what schedulers and Ctrl-C do) would then kill the workers under the trainer, which fails with "worker
    killed" before it can save. Ignored there, the trainer finishes its step, checkpoints, and shuts the
    workers down as usual.
    """
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def release_workers(loader: Any) -> None:
    """Shut down the worker processes of a loader that keeps its iterator (torchdata's StatefulDataLoader).

    Workers that ignore SIGTERM (``worker_ignores_signals``) must be shut down by their loader: at
    interpreter exit, multiprocessing would SIGTERM and then wait for them forever. A loader whose iterator
    is gone (plain DataLoader, closed generator) has already done this.
    """
    stop_workers(getattr(loader, "_iterator", None))


def stop_workers(iterator: Any, timeout: float = 5.0) -> None:
    """Shut down a DataLoader iterator's worker processes, and kill those still alive after ``timeout`` s.

    PyTorch asks its workers to finish, waits a while, then ends the stragglers with SIGTERM, which ours
    ignore (``worker_ignores_signals``): a worker stuck after a data error (a download thread that never
    ends) would then outlive the trainer, whose exit waits on it for ever. SIGKILL cannot be ignored.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    for w in getattr(iterator, "_workers", ()):
        w.join(timeout=timeout)
        if w.is_alive():
            log.warning("loader worker %s did not exit; killing it", w.pid)
            w.kill()
            w.join(timeout=timeout)


class Preemption:
    """Records SIGTERM / SIGINT while active; ``should_stop(info)`` is the step-boundary decision."""

    def __init__(self, signals: Sequence[int] = SIGNALS):
        self.signals = tuple(signals)
        self.signum = 0              # the first signal received by this process (0: none)
        self.stop_signum = 0         # the signal the stop was agreed on (this rank's or another's)
        self._pid = os.getpid()
        self._previous: Dict[int, Any] = {}

    # ---------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (loader worker): the trainer decides, not the worker
            return
        if not self.signum:
            self.signum = signum
        # nothing else here: logging or I/O inside a signal handler can deadlock

    def __enter__(self) -> "Preemption":
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGINT will not checkpoint before exiting")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    # ---------------------------------------------------------------- queries
    @property
    def requested(self) -> bool:
        """True once this process received one of the signals."""
        return bool(self.signum)

    @property
    def stopped(self) -> bool:
        """True once ``should_stop`` returned True."""
        return bool(self.stop_signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal of the agreed stop; 0 when there was none."""
        return exit_code_for(self.stop_signum) if self.stop_signum else 0

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.stop_signum or self.signum).name if (self.stop_signum or self.signum) else ""

    def should_stop(self, info: Optional[Any] = None) -> bool:
        """Whether to stop after the step just finished; the same answer on every rank.

        ``info`` is a ``shared.device.DistInfo`` (or anything with ``distributed`` and ``device``); when it is
        distributed, every rank must call this at the same steps: it is one all-reduce of a single integer.
        """
        signum = self.signum
        if info is not None and getattr(info, "distributed", False):
            signum = collectives.max_int_over_ranks(signum)
        if signum:
            self.stop_signum = signum
        return bool(signum)

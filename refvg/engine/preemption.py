"""Preemption: a cluster scheduler (SLURM, Kubernetes, a spot-instance reclaim) sends SIGTERM, then
SIGKILL after a grace period. While `train` runs, SIGTERM only records the request; the loop
finishes the step in flight, writes last.pt (the same resumable state as its periodic checkpoints)
and raises `Preempted`, which ends the process with `PREEMPTED_EXIT_CODE`. The same command again
resumes there, bitwise as after a kill -9 at that checkpoint.

The handler is installed only around a `train` call that runs in the main thread (Python delivers
signals there only), and the previous one is put back after, so SIGTERM outside training ends the
process as usual. SIGTERM after the last step (in the final validation) lets training finish, then
raises `Preempted`.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

# 128 + SIGTERM: what a shell reports for a process ended by SIGTERM, so schedulers and wrappers
# that treat "terminated" as "rerun me" do so; a Python parent sees 143 (checkpoint written) rather
# than -15 (died without one).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM

_requested = threading.Event()
F = TypeVar("F", bound=Callable)


class Preempted(SystemExit):
    """Training stopped on SIGTERM after writing a resumable last.pt. A SystemExit, so every entry
    point (the CLI, a DVC stage, the stage worker's child) exits with PREEMPTED_EXIT_CODE, no
    traceback."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def requested() -> bool:
    """Whether SIGTERM arrived since the current `train` call began."""
    return _requested.is_set()


def _on_sigterm(signum, _frame) -> None:
    if not _requested.is_set():
        log.warning("SIGTERM received: stopping after the current step with a resumable checkpoint")
    _requested.set()


def stops_on_sigterm(fn: F) -> F:
    """Decorator for the training loop: SIGTERM during the call sets `requested()`, not kills."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _requested.clear()
        if threading.current_thread() is not threading.main_thread():
            # signal.signal only works in the main thread; SIGTERM keeps its disposition
            return fn(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            result = fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if _requested.is_set():
            # SIGTERM after the last step (e.g. in the final validation): training is complete and
            # on disk, but the scheduler still wants the process gone; the rerun finds nothing left
            # to train.
            message = f"SIGTERM during {fn.__name__}'s last epoch: training is complete; stopping"
            log.warning("%s", message)
            raise Preempted(message)
        return result

    return wrapper  # type: ignore[return-value]

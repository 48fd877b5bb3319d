"""Preemption: SIGTERM / SIGUSR1 (SLURM preemption, ``scancel``, the launcher's forward) set a flag that the
long loops read at their next safe boundary, where all ranks agree to save and exit 0: the training loop
(a checkpoint) and the importance pass (its partial sums, resumed by the rerun).

Installed first thing in a job (``install``), so a signal during a long teacher load or the importance pass
is kept for the next boundary instead of killing the rank at once.
"""

from __future__ import annotations

import signal

import torch

from flexkd_ds.runtime.dist import all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):  # noqa: N818 - not an error: the job saved its state and stops on request
    """Raised by a loop that stopped on a preemption signal after saving its state; the job exits 0."""


class Preemption:
    """The process's preemption flag (one per process: ``install`` returns the same object)."""

    _current: Preemption | None = None

    def __init__(self) -> None:
        self.requested = False
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    @classmethod
    def install(cls) -> Preemption:
        if cls._current is None:
            cls._current = cls()
        return cls._current

    @classmethod
    def current(cls) -> Preemption | None:
        return cls._current

    def agreed(self, device) -> bool:
        """Collective: True on every rank when any rank got the signal."""
        flag = torch.tensor([float(self.requested)], device=device)
        return bool(all_reduce_sum(flag).item() > 0)


def stops_cleanly(job):
    """Decorate a job function: the preemption handler is installed before anything else runs, and a loop
    that stopped on a signal (``Preempted``, its state saved) ends the job normally, with its message logged."""
    import functools
    import logging

    @functools.wraps(job)
    def run(*args, **kwargs):
        Preemption.install()
        try:
            return job(*args, **kwargs)
        except Preempted as stop:
            logging.getLogger("flexkd_ds").info("%s", stop)
            return None

    return run

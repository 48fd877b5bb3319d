"""Preemption: SIGTERM / SIGUSR1 (SLURM preemption, ``scancel``, the launcher's forward) set a flag that the
long loops read at their next safe boundary, where all ranks agree to save and exit 0: the training loop
(a checkpoint) and the importance pass (its partial sums, resumed by the rerun).

Installed first thing in a job (``install``), so a signal during a long teacher load or the importance pass
is kept for the next boundary instead of killing the rank at once.

A rank started by a launcher (``LOCAL_RANK`` set) also watches it: when its parent (the per-node launcher)
or, under DeepSpeed's ``launch.py``, the ``deepspeed`` runner above it is gone (a person's ``kill`` or
Ctrl-C reached only the runner), the rank takes the same path as on SIGTERM: checkpoint and exit, instead
of training on unseen.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from flexkd_ds.runtime.dist import all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def launcher_processes() -> list:
    """The processes whose end means this rank's job was stopped: none for a process started by hand; the
    parent of a launched rank (``LOCAL_RANK`` set), and above DeepSpeed's per-node ``launch.py`` also the
    ``deepspeed`` runner that started it."""
    if "LOCAL_RANK" not in os.environ:
        return []
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        chain = [parent]
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()) and parent.ppid() > 1:
            chain.append(psutil.Process(parent.ppid()))
        return chain
    except Exception:  # noqa: BLE001 - no psutil or no access: no watch (signals still work)
        return []


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
    def install(cls, watch_interval_s: float = 2.0) -> Preemption:
        if cls._current is None:
            cls._current = cls()
            launchers = launcher_processes()
            if launchers:
                threading.Thread(
                    target=cls._current._watch, args=(launchers, watch_interval_s), daemon=True,
                    name="flexkd-launcher-watch",
                ).start()  # fmt: skip
        return cls._current

    def _watch(self, launchers, interval_s: float) -> None:
        while not self.requested:
            time.sleep(interval_s)
            gone = [p for p in launchers if not _alive(p)]
            if gone:
                logging.getLogger("flexkd_ds").warning(
                    "the launcher of this rank (pid %d) is gone: stopping as on SIGTERM (checkpoint at the next "
                    "step boundary, then exit)", gone[0].pid,
                )  # fmt: skip
                self.requested = True

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

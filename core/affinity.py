"""Pinning a whole process to CPU cores (Linux), so components that run at once never share a core.

``os.sched_setaffinity(0, ...)`` moves only the calling thread; a process already has others (Ray's core
worker, OpenMP's pool), so each thread in ``/proc/self/task`` is moved. Threads started later inherit
the mask of the thread that starts them, and child processes that of their parent.
"""

from __future__ import annotations

import os


def pin_process(cores: list[int]) -> None:
    """Move every thread of this process onto ``cores``; a no-op where the platform cannot."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile, or one not ours to move
            continue


def process_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))

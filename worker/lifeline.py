"""A process that must not outlive its parent: the local worker under ``vopd serve`` and every Celery pool process.

Killing the API (even with SIGKILL, which runs no clean-up) must not leave its worker behind, or the next
``vopd serve`` runs two; killing a worker must not leave its pool process training on alone. On Linux the kernel
does it (``prctl(PR_SET_PDEATHSIG)``: a signal when the parent exits); elsewhere a thread watches the parent's pid.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, *, whole_group: bool = False) -> str:
    """Be killed (SIGKILL) as soon as ``parent_pid`` exits; returns how ("prctl" or "watcher").

    ``whole_group``: the fallback watcher kills this process's whole process group (a worker that leads its own
    group takes its pool processes with it)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the request took effect
                    os._exit(1)
                return "prctl"
        except (OSError, AttributeError):
            log.warning("prctl is unavailable; watching the parent from a thread")

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(1.0)
        if whole_group:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="vopd-lifeline", daemon=True).start()
    return "watcher"

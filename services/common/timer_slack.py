"""Fine timer slack for threads that poll with short sleeps.

Linux lets a sleeping thread's timer fire up to its "timer slack" late (50 us by default), so
a 50 us sleep took 125 us on a 2-core VM; with 1 us of slack it took 83 us. kvd's polling
threads (CUDA events, NIXL writes, NIXL notifications) call `use_fine_timer_slack()` once:
what a poll's latency is left with is then mostly its sleep. Other threads keep the default.
"""

from __future__ import annotations

import ctypes
import sys
import threading

PR_SET_TIMERSLACK = 29  # prctl(2)
SLACK_NS = 1000

_done = threading.local()


def use_fine_timer_slack() -> None:
    """Set the calling thread's timer slack to SLACK_NS (Linux; elsewhere a no-op). Cheap to
    call again from the same thread."""
    if getattr(_done, "is_set", False) or not sys.platform.startswith("linux"):
        return
    _done.is_set = True
    try:
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        pass

"""Child processes that do not outlive their parent.

Contract: `die_with_parent(sig)` asks Linux (prctl PR_SET_PDEATHSIG) to send the calling process
`sig` when its parent dies — even a parent killed with SIGKILL that never reached its cleanup.
Call it in the child: `preexec_fn=parent_death(sig)` for subprocess, or first thing in a
multiprocessing target. Where prctl does not exist it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):  # not Linux
        pass


def parent_death(sig: int) -> Callable[[], None]:
    """A `preexec_fn` that makes the child die with `sig` when its parent does."""
    return functools.partial(die_with_parent, sig)

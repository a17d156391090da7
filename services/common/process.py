"""Process-wide settings of Tandem's long-running processes.

Contract: `die_with_parent(sig)` asks Linux (prctl PR_SET_PDEATHSIG) to send the calling process
`sig` when its parent dies — even a parent killed with SIGKILL that never reached its cleanup.
Call it in the child: `preexec_fn=parent_death(sig)` for subprocess, or first thing in a
multiprocessing target. Where prctl does not exist it does nothing.

`freeze_gc()`: call once a service has started (model loaded, graphs captured, imports done).
It collects once, then moves every object alive into the garbage collector's permanent
generation, so that later full collections walk only what was allocated while serving instead
of the whole heap (torch, the model's Python objects): those walks are pauses of tens of ms
that show up as inter-token latency spikes (vLLM and LightLLM measured the same).
"""

from __future__ import annotations

import ctypes
import functools
import gc
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


def freeze_gc() -> None:
    gc.collect()
    gc.freeze()

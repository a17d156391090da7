"""`--disaggregation-transfer-backend ascend`: accepted, but it cannot run on this build.

SGLang's Ascend backend moves KV between Huawei NPUs through `memfabric_hybrid` and a store at
`ASCEND_MF_STORE_URL`. Tandem has no NPU support, so starting it always fails, with a message
that names exactly what is missing here (and says so honestly when nothing is).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

from services.kvd.backends.base import BackendUnavailable

PACKAGE = "memfabric_hybrid"
PIP_SPEC = "memfabric-hybrid==1.0.5"
STORE_ENV = "ASCEND_MF_STORE_URL"


def missing_requirements() -> list[str]:
    """What the ascend backend needs and this environment lacks, one phrase each."""
    missing = []
    if importlib.util.find_spec(PACKAGE) is None:
        missing.append(f"the Python package `{PACKAGE}` (pip install {PIP_SPEC})")
    if not os.environ.get(STORE_ENV):
        missing.append(f"the environment variable {STORE_ENV} (the memfabric store URL)")
    return missing


def open_ascend_backend() -> NoReturn:
    missing = missing_requirements()
    if missing:
        raise BackendUnavailable(
            "transfer backend 'ascend' cannot start: missing " + " and ".join(missing)
        )
    raise BackendUnavailable(
        f"transfer backend 'ascend': {PACKAGE} and {STORE_ENV} are present, but Ascend NPUs are "
        "not supported by this build of Tandem; use --disaggregation-transfer-backend nixl "
        "or mooncake"
    )

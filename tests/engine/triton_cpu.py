"""Run Triton kernels on the CPU with Triton's interpreter (TRITON_INTERPRET=1), so the GPU
attention kernels are checked against the torch reference on machines without a GPU too.

Import this module before anything imports `triton`. Triton 3.6's interpreter turns a loop
bound loaded from memory into a Python int with `int(array)`, which NumPy >= 2.4 refuses for
1-element arrays; `enable()` makes that conversion take the element instead. Nothing else of
the interpreter changes.
"""

from __future__ import annotations

import os
import sys


def enable() -> None:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before the interpreter could be switched on")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "tandem_patched", False):
        return

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.tandem_patched = True
    interpreter._patch_lang_tensor = patch

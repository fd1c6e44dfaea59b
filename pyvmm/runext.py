# SPDX-License-Identifier: GPL-2.0-or-later
"""The compiled exit helper `pyvmm._runext`, when this install has it.

`run_exit(fd, page)` is KVM_RUN plus the decode of the hot exits' fixed fields in one C call
(the packing is described in pyvmm/_build_runext.py, which setuptools compiles at install);
`None` when the helper is absent (no C compiler at install, a source tree never installed, or
PYVMM_NO_RUNEXT=1 in the environment), and `Vcpu.run()` then takes the pure-cffi path, which
decodes every exit the same way, only slower. That case is said once, in one line on stderr
(`NOTE`), never silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["AVAILABLE", "IO", "MMIO", "NOTE", "PIO_DATA_OFFSET", "run_exit"]

#: run_exit's result & 7: a single PIO access, an MMIO access (0: decode the page).
IO = 1
MMIO = 2
#: Where a single PIO access's data is in the page (what IO promises).
PIO_DATA_OFFSET = 4096

run_exit: Callable[[int, object], int] | None
NOTE = ""


def _load() -> Callable[[int, object], int]:
    if os.environ.get("PYVMM_NO_RUNEXT", "") not in ("", "0"):
        raise ImportError("PYVMM_NO_RUNEXT is set")
    from ._runext import ffi, lib  # type: ignore[import-not-found]

    # A helper built from an older pyvmm (its page argument was a pointer) is refused here,
    # not by a TypeError on every run(): reinstall to rebuild it.
    if ffi.typeof(lib.pyvmm_run).cname != "long long(*)(int, uintptr_t)":
        raise ImportError(f"it was built by another pyvmm version "
                          f"({ffi.typeof(lib.pyvmm_run).cname})")
    return lib.pyvmm_run


try:
    run_exit = _load()
except ImportError as err:
    run_exit = None
    NOTE = (f"pyvmm: the compiled exit helper is not available ({err}); exits take the "
            "slower pure-cffi path (install pyvmm with a C compiler present to build it)")
    print(NOTE, file=sys.stderr)

AVAILABLE = run_exit is not None

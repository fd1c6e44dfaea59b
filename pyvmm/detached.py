# SPDX-License-Identifier: GPL-2.0-or-later
"""`detached_error`: an exception a result can keep without keeping what raised it alive."""

from __future__ import annotations

import copy
import traceback


def detached_error(err: BaseException) -> BaseException:
    """A copy of `err` with no traceback, context or cause, its traceback kept as text in a
    note. A result keeps this one: a traceback holds every frame it passed through, and their
    locals (a vCPU, a doorbell worker, a machine) with them, so the VM, its RAM and the worker
    thread would live as long as the result. The original is left as it was."""
    text = "".join(traceback.format_exception(err)).rstrip()
    try:
        twin = copy.copy(err)
    except Exception:  # noqa: BLE001 - an exception that cannot be rebuilt from its args
        twin = RuntimeError(f"{type(err).__name__}: {err}")
    twin.__traceback__ = twin.__context__ = twin.__cause__ = None
    twin.__suppress_context__ = err.__suppress_context__
    twin.__notes__ = [*getattr(err, "__notes__", ()), f"pyvmm: originally raised as:\n{text}"]
    return twin

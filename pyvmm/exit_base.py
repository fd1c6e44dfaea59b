# SPDX-License-Identifier: GPL-2.0-or-later
"""The base of every typed exit (`Exit`) and the KVM_EXIT_* numbers (`ExitReason`); the exit
types themselves and their decoding are in `pyvmm.exits`."""

from __future__ import annotations

from enum import IntEnum
from typing import Any, cast

from ._ffi import constants

__all__ = ["Exit", "ExitReason"]

# Named as pyvmm.exits shows it (pickles and docs refer to it there).
# Any to mypy: its members come from the headers at import time.
ExitReason: Any = cast(Any, IntEnum("ExitReason", constants("KVM_EXIT_"), module="pyvmm.exits"))
ExitReason.__doc__ = "KVM_EXIT_* numbers (kvm_run.exit_reason)."

class Exit:
    """Base of every exit. `exit_reason` is the KVM_EXIT_* number; `reason`, where an exit has
    it, is that exit's own field (FailEntryExit, MsrExit, UnknownExit)."""

    __slots__ = ()
    exit_reason: int = -1

    def _fields(self) -> dict[str, Any]:
        out = {}
        for cls in type(self).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if not name.startswith("_"):
                    value = getattr(self, name)
                    if isinstance(value, memoryview):
                        value = bytes(value)
                    out[name] = value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in self._fields().items())
        return f"{type(self).__name__}({args})"

    def detached(self) -> Exit:
        """This exit with no reference into the vCPU's kvm_run page (data copied), to keep
        after the next run() or after the vCPU is closed."""
        return self

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 9:
        return hex(value)
    return repr(value)

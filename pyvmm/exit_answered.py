# SPDX-License-Identifier: GPL-2.0-or-later
"""The exits the host answers through kvm_run (hypercalls, MSR accesses): their settable
fields write through to the vCPU's page and reach the guest on the next run(). Shown by
`pyvmm.exits` with every other exit type."""

from __future__ import annotations

from typing import Any

from ._ffi import ffi
from .exit_base import Exit, ExitReason

__all__ = ["HypercallExit", "MsrExit"]

_R = ExitReason


class _RunBacked(Exit):
    """An exit with fields the host answers through kvm_run. `_keep`, an empty view of the
    vCPU's page, keeps the mapping alive for as long as the exit exists (the vCPU's close()
    then leaves the page to the last such view), so `_run` never points at unmapped memory."""

    _run: Any
    _keep: Any

    __slots__ = ("_run", "_keep")

    def detached(self) -> Exit:
        copy = object.__new__(type(self))
        for cls in type(self).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(self, name):
                    object.__setattr__(copy, name, getattr(self, name))
        private = ffi.new("struct kvm_run *")          # its own copy of the exit's fields
        ffi.memmove(private, self._run, ffi.sizeof("struct kvm_run"))
        copy._run, copy._keep = private, None
        return copy


class HypercallExit(_RunBacked):
    """A hypercall KVM forwards to userspace (KVM_CAP_EXIT_HYPERCALL). Set `ret`; the guest
    gets it in RAX on the next run()."""

    __slots__ = ("args", "longmode", "nr")
    exit_reason = _R.HYPERCALL

    def __init__(self, run, nr: int, args: tuple[int, ...], longmode: int, keep=None):
        self._run, self.nr, self.args, self.longmode, self._keep = run, nr, args, longmode, keep

    @property
    def ret(self) -> int:
        return int(self._run.hypercall.ret)

    @ret.setter
    def ret(self, value: int) -> None:
        self._run.hypercall.ret = value & 0xFFFFFFFFFFFFFFFF


class MsrExit(_RunBacked):
    """RDMSR/WRMSR forwarded to userspace (KVM_CAP_X86_USER_SPACE_MSR). For a read set
    `data`; set `error = 1` to inject #GP instead."""

    __slots__ = ("index", "is_write", "reason")

    def __init__(self, run, index: int, is_write: bool, reason: int, keep=None):
        self._run, self.index, self.is_write, self.reason = run, index, is_write, reason
        self._keep = keep

    @property
    def exit_reason(self) -> int:  # type: ignore[override]
        return _R.X86_WRMSR if self.is_write else _R.X86_RDMSR

    @property
    def data(self) -> int:
        return int(self._run.msr.data)

    @data.setter
    def data(self, value: int) -> None:
        self._run.msr.data = value & 0xFFFFFFFFFFFFFFFF

    @property
    def error(self) -> int:
        return int(self._run.msr.error)

    @error.setter
    def error(self, value: int) -> None:
        self._run.msr.error = 1 if value else 0

    def _fields(self) -> dict[str, Any]:
        return {"index": self.index, "is_write": self.is_write, "data": self.data,
                "reason": self.reason, "error": self.error}

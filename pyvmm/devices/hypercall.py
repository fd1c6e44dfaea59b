# SPDX-License-Identifier: GPL-2.0-or-later
"""Hypercalls in the device model: a dispatcher that serves them by number.

KVM handles most hypercalls itself and sends only those enabled with
``vm.enable_hypercall_exits(nr)`` (KVM_CAP_EXIT_HYPERCALL; stock KVM offers only
KVM_HC_MAP_GPA_RANGE) to userspace as a :class:`~pyvmm.exits.HypercallExit`. The dispatcher
gives each such exit to the handler registered for its number and writes the handler's return
value back as the guest's RAX::

    dispatcher = HypercallDispatcher()
    dispatcher.register(KVM_HC_MAP_GPA_RANGE, lambda call: 0)
    machine.exit_handlers[HypercallExit] = dispatcher.handle

A handler is ``handler(call) -> int`` where ``call`` is a :class:`HypercallCall` (number,
arguments, long mode, vCPU). It never crashes the VMM: an exception becomes an error code for
the guest (see :meth:`HypercallDispatcher.call`), and is kept in ``errors``.

The same dispatcher serves hypercall-shaped requests that arrive another way (the PIO
transport of :class:`pyvmm.devices.PvDma`), through :meth:`HypercallDispatcher.call`.

Instruction and vendor: Intel's hypercall instruction is VMCALL (0f 01 c1), AMD's is VMMCALL
(0f 01 d9). A guest that uses the other vendor's instruction traps with #UD; by default KVM
then rewrites the instruction in guest memory to the native one and runs it (the
KVM_X86_QUIRK_FIX_HYPERCALL_INSN quirk). With that quirk disabled (``vm.disable_quirks(32)``)
the guest gets the #UD. :func:`native_instruction` picks the native one from the CPUID vendor.
"""

from __future__ import annotations

import errno as _errno
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._ffi import constants
from ..errors import MAX_KEPT_ERRORS, GuestError
from ..exits import HypercallExit
from .logs import log_failure


_HC = constants("KVM_HC_")
KVM_HC_MAP_GPA_RANGE = _HC["MAP_GPA_RANGE"]          # 12
KVM_ENOSYS = constants("KVM_E")["NOSYS"]              # 1000
KVM_EINVAL = _errno.EINVAL                            # 22
KVM_EFAULT = _errno.EFAULT                            # 14
KVM_ENOENT = _errno.ENOENT                            # 2
KVM_ENOMEM = _errno.ENOMEM                            # 12
KVM_EIO = _errno.EIO                                  # 5
KVM_X86_QUIRK_FIX_HYPERCALL_INSN = constants("KVM_X86_QUIRK_")["FIX_HYPERCALL_INSN"]  # 32

VMCALL = bytes((0x0F, 0x01, 0xC1))     # Intel
VMMCALL = bytes((0x0F, 0x01, 0xD9))    # AMD


_MASK64 = (1 << 64) - 1


class HypercallError(GuestError):
    """A guest's request a handler refuses: ``errno`` is the (positive) error code, the guest
    gets ``-errno`` in RAX."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


@dataclass(frozen=True)
class HypercallCall:
    """One hypercall as a handler sees it. ``args`` are RBX, RCX, RDX, RSI, RDI, R8 for an
    exit (KVM passes what it forwards; MAP_GPA_RANGE fills the first three)."""

    nr: int
    args: tuple[int, ...]
    longmode: bool = True
    vcpu: Any = None
    transport: str = "hypercall"


Handler = Callable[[HypercallCall], int]


def to_u64(value: int) -> int:
    """A signed return value as the 64 bits the guest gets in RAX."""
    return value & _MASK64


def to_signed(value: int, bits: int = 64) -> int:
    """RAX (or a narrower register) read back as a signed value."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def native_instruction(kvm) -> str:
    """"vmmcall" on an AMD host, "vmcall" otherwise, from the CPUID vendor KVM reports.

    (kvm_pvm treats VMCALL as its own and patches VMMCALL to it, on AMD too; there CPL0
    hypercalls never return anyway.)"""
    return "vmmcall" if kvm.is_amd else "vmcall"


class HypercallDispatcher:
    """Handlers by hypercall number; the return value of a handler becomes the guest's RAX.

    Result codes of :meth:`call` (negative, as KVM's own hypercalls return them):

    - the handler's return value (0 = success by convention);
    - ``-KVM_ENOSYS`` (-1000) for a number nobody registered;
    - ``-e.errno`` for a :class:`HypercallError` ``e`` (and any ``GuestError`` with an
      ``errno`` attribute); ``-EINVAL`` for another ``GuestError``, ``ValueError`` or
      ``TypeError`` (the guest's arguments were bad);
    - ``-ENOMEM`` for ``MemoryError``, ``-EIO`` for any other exception (a host-side bug:
      logged and kept in ``errors``; the VMM goes on).
    """

    def __init__(self) -> None:
        self._handlers: dict[int, Handler] = {}
        self._lock = threading.Lock()
        self.calls = 0
        self.unknown = 0
        self.errors: list[tuple[int, BaseException]] = []   # first MAX_KEPT_ERRORS
        self.error_count = 0

    def register(self, nr: int, handler: Handler) -> Handler:
        if not callable(handler):
            raise TypeError("a hypercall handler must be callable")
        nr = int(nr)
        if nr < 0:
            raise ValueError(f"hypercall number {nr} is negative")
        with self._lock:
            if nr in self._handlers:
                raise ValueError(f"hypercall {nr} already has a handler")
            self._handlers[nr] = handler
        return handler

    def unregister(self, nr: int) -> None:
        with self._lock:
            if self._handlers.pop(int(nr), None) is None:
                raise ValueError(f"hypercall {nr} has no handler")

    @property
    def numbers(self) -> list[int]:
        return sorted(self._handlers)

    def _error(self, nr: int, err: BaseException) -> None:
        with self._lock:
            self.error_count += 1
            if len(self.errors) < MAX_KEPT_ERRORS:
                self.errors.append((nr, err))

    def call(self, nr: int, args: tuple[int, ...], *, longmode: bool = True, vcpu: Any = None,
             transport: str = "hypercall") -> int:
        """Run the handler for ``nr``; return the (signed) result for the guest."""
        with self._lock:
            self.calls += 1
            handler = self._handlers.get(nr)
        if handler is None:
            with self._lock:
                self.unknown += 1
            return -KVM_ENOSYS
        request = HypercallCall(nr, tuple(args), bool(longmode), vcpu, transport)
        try:
            result = handler(request)
        except GuestError as err:
            code = getattr(err, "errno", None)
            self._error(nr, err)
            return -(code if isinstance(code, int) and code > 0 else KVM_EINVAL)
        except (ValueError, TypeError) as err:
            self._error(nr, err)
            return -KVM_EINVAL
        except MemoryError as err:
            self._error(nr, err)
            return -KVM_ENOMEM
        except Exception as err:
            self._error(nr, err)
            log_failure(f"hypercall {nr} handler {handler!r}", err)
            return -KVM_EIO
        if result is None:
            return 0
        try:
            return int(result)
        except (TypeError, ValueError) as err:
            self._error(nr, err)
            return -KVM_EIO

    def handle(self, exit, vcpu) -> None:
        """Serve a HypercallExit (use as ``machine.exit_handlers[HypercallExit]``): the
        result goes to ``exit.ret``, which the guest sees in RAX on the next run."""
        exit.ret = to_u64(self.call(exit.nr, exit.args, longmode=bool(exit.longmode & 1),
                                    vcpu=vcpu))
        return None

    def __repr__(self) -> str:
        return f"HypercallDispatcher(numbers={self.numbers}, calls={self.calls})"


def serve_hypercalls(exit_handlers: dict, dispatcher: HypercallDispatcher) -> None:
    """Route HypercallExit in the handler table `exit_handlers` (e.g. a Machine's) to
    `dispatcher`. A table that already routes them elsewhere is left alone: ValueError, so
    two devices never fight over one exit (pass the dispatcher that is there instead)."""
    current = exit_handlers.get(HypercallExit)
    if current is None:
        exit_handlers[HypercallExit] = dispatcher.handle
    elif current != dispatcher.handle:
        raise ValueError(f"HypercallExit is already handled by {current!r}; share that "
                         "handler's HypercallDispatcher instead")

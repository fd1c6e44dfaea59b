# SPDX-License-Identifier: GPL-2.0-or-later
"""pci-testdev, QEMU's PCI device for testing low-level I/O paths (docs/specs/pci-testdev.rst).

Identity 1b36:0005 (Red Hat, test device), class 00ff, no interrupt pin. BAR 0 is 4 KiB of
memory, BAR 1 is 256 I/O ports. Both start with the same header, which shows the test the
guest selected last:

    u8 test       write: select test n of this BAR's kind (n >= 3 deselects)
    u8 width      access width the test wants (always 1 here)
    u8 pad[2]
    u32 offset    where in the BAR the test's writes go
    u8 data, pad[3]  value the writes carry (0xfa; 0xce for the wildcard test)
    u32 count     writes the device saw
    char name[]   "mmio-no-eventfd", ..., "portio-datamatch-eventfd", NUL-terminated

Three tests per kind: 0 no-eventfd (the write exits to the device, which counts it if its
data matches), 1 wildcard-eventfd (an ioeventfd of any data), 2 datamatch-eventfd (an ioeventfd
matching `data`). Memory tests write at 2048 + n, I/O tests at 128 + 3 + n. For the eventfd
tests the kernel consumes the writes, so `count` stays 0 (a guest accepts either 0 or all of
its writes). Reading the header is byte-wise; bytes at or after the name's NUL read 0, as does
everything while no test is selected. With no `doorbell` factory the eventfd tests fall back
to counting in userspace like no-eventfd.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from ..ioevent import IoEventAddress
from .pci import Bar, PciFunction

VENDOR_REDHAT = 0x1B36
DEVICE_TEST = 0x0005
CLASS_OTHERS = 0x00FF00
MEM_BAR_SIZE = 4096
IO_BAR_SIZE = 256
DATAMATCH = 0xFA
NOMATCH = 0xCE
TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
KINDS = ("mmio", "portio")
_HEADER = struct.Struct("<BBxxIB3xI")

#: `doorbell(address, length, datamatch)` -> an object with `remove()`; datamatch None = any.
DoorbellFactory = Callable[[IoEventAddress, int, "int | None"], object]


class _Test:
    def __init__(self, index: int) -> None:
        kind, name = divmod(index, len(TESTS))
        self.index = index
        self.io = kind == 1
        self.name = f"{KINDS[kind]}-{TESTS[name]}"
        self.eventfd = name != 0
        self.match = TESTS[name] != "wildcard-eventfd"
        self.data = DATAMATCH if self.match else NOMATCH
        self.offset = (IO_BAR_SIZE // 2 if self.io else MEM_BAR_SIZE // 2) + index
        self.count = 0

    def header(self) -> bytes:
        return _HEADER.pack(self.index, 1, self.offset, self.data, self.count) + \
            self.name.encode() + b"\0"


class _Window:
    """What one BAR decodes: the header of the current test, and the test's write target."""

    def __init__(self, dev: PciTestdev, io: bool) -> None:
        self.dev, self.io = dev, io

    def read(self, offset: int, size: int) -> bytes:
        return self.dev.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.dev.write(self.io, offset, data)


class PciTestdev(PciFunction):
    """The device. `doorbell` makes the ioeventfds of the eventfd tests (the platform passes
    one over `Machine.doorbell`); `current` is the selected test's name or None."""

    def __init__(self, doorbell: DoorbellFactory | None = None) -> None:
        self.tests = [_Test(i) for i in range(len(TESTS) * len(KINDS))]
        self._current: _Test | None = None
        self._bell: object = None
        self._doorbell = doorbell
        self._lock = threading.RLock()
        super().__init__(vendor_id=VENDOR_REDHAT, device_id=DEVICE_TEST,
                         class_code=CLASS_OTHERS,
                         bars=[Bar(MEM_BAR_SIZE, io=False, device=_Window(self, False)),
                               Bar(IO_BAR_SIZE, io=True, device=_Window(self, True))])

    @property
    def current(self) -> str | None:
        test = self._current
        return None if test is None else test.name

    # -- the eventfd of the current test -------------------------------------------------------

    def _arm(self) -> None:
        test = self._current
        if test is None or not test.eventfd or self._doorbell is None:
            return
        bar = self.bar(1 if test.io else 0)
        if bar.mapping is None:
            return   # not decoded: nothing to attach the eventfd to
        where = bar.address + test.offset
        address = IoEventAddress.pio(where) if test.io else IoEventAddress.mmio(where)
        self._bell = self._doorbell(address, 1, test.data if test.match else None)

    def _disarm(self) -> None:
        bell, self._bell = self._bell, None
        if bell is not None:
            bell.remove()  # type: ignore[attr-defined]  # the factory's object has remove()

    def update_mappings(self) -> None:
        """Remap the BARs; the current test's ioeventfd follows its BAR."""
        with self._lock:
            self._disarm()
            super().update_mappings()
            self._arm()

    # -- guest accesses ----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Header bytes of the current test (either BAR shows it)."""
        with self._lock:
            test = self._current
            header = test.header() if test is not None else b""
        out = bytearray(size)
        for n in range(size):
            at = offset + n
            # The NUL and everything after it read 0, as does any byte of no test.
            if at < len(header) - 1:
                out[n] = header[at]
        return bytes(out)

    def write(self, io: bool, offset: int, data: bytes) -> None:
        """A write to BAR `io`: offset 0 selects a test of that BAR's kind, the test's offset
        counts a matching write (byte by byte, as the device takes bytes)."""
        with self._lock:
            for n, byte in enumerate(data):
                at = offset + n
                if at == 0:
                    self._select(io, byte)
                    continue
                test = self._current
                if test is None or at != test.offset:
                    continue
                if test.match and byte != test.data:
                    continue
                test.count = (test.count + 1) & 0xFFFFFFFF

    def _select(self, io: bool, n: int) -> None:
        self._disarm()
        self._current = None
        if n >= len(TESTS):
            return
        test = self.tests[(1 if io else 0) * len(TESTS) + n]
        test.count = 0
        self._current = test
        self._arm()

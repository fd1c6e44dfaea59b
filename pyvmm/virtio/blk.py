# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio-blk (virtio 1.x, section 5.2) backed by a host file, read-write.

A request is a chain: a 16-byte device-readable header {type u32, reserved u32, sector u64},
data buffers (readable for writes, writable for reads) and a 1-byte device-writable status.
Writes go to the file with pwrite. With VIRTIO_BLK_F_FLUSH negotiated a FLUSH request is an
fsync; without it the device is write-through (fsync after every write). `close()` fsyncs
too, so a clean shutdown never loses a write.
"""

from __future__ import annotations

import os
import struct

from .device import DEVICE_BLOCK, VirtioDevice
from .queue import Chain, Virtqueue, VirtqueueError

SECTOR = 512

# Feature bits (section 5.2.3).
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9

# Request types and status values.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20
SIZE_MAX = 1 << 20     # bytes per segment the driver may use
SEG_MAX = 126          # segments per request
_HEADER = struct.Struct("<IIQ")


class Block(VirtioDevice):
    """A disk backed by `path` (its size rounded down to whole sectors). `serial` is the
    GET_ID answer (20 bytes at most)."""

    device_id = DEVICE_BLOCK
    queue_sizes = (256,)

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 serial: str = "pyvmm-disk") -> None:
        super().__init__()
        if len(serial.encode()) > ID_BYTES:
            raise ValueError(f"a virtio-blk serial has at most {ID_BYTES} bytes: {serial!r}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.serial = serial.encode()
        self._fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        self.sectors = os.fstat(self._fd).st_size // SECTOR
        self.features = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | (F_RO if readonly else 0)
        self.counts = {"read": 0, "write": 0, "flush": 0, "get_id": 0, "error": 0, "unsupp": 0}

    def config(self) -> bytes:
        # capacity u64, size_max u32, seg_max u32, geometry (4 bytes), blk_size u32
        return struct.pack("<QIIHBBI", self.sectors, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR)

    def handle(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            if chain.read_len < _HEADER.size or not chain.writable:
                raise VirtqueueError("block request without a readable header and a "
                                     "writable status byte")
            status_buf = chain.writable[-1]
            if status_buf.length < 1:
                raise VirtqueueError("block request whose last buffer holds no status byte")
            status = self._serve(chain)
            # The status is the last byte of the last writable buffer.
            queue.ram.write(status_buf.addr + status_buf.length - 1, bytes([status]))
            queue.push(chain, chain.written + 1)

    def _serve(self, chain: Chain) -> int:
        kind, _reserved, sector = _HEADER.unpack(chain.read(_HEADER.size))
        # Data is what lies between the header and the status byte.
        in_len = chain.write_len - 1
        out_len = chain.read_len - _HEADER.size
        if kind == T_IN:
            return self._read(chain, sector, in_len)
        if kind == T_OUT:
            return self._write(chain, sector, out_len)
        if kind == T_FLUSH:
            self.counts["flush"] += 1
            return self._fsync()
        if kind == T_GET_ID:
            self.counts["get_id"] += 1
            chain.write(self.serial.ljust(ID_BYTES, b"\0")[:max(in_len, 0)])
            return S_OK
        self.counts["unsupp"] += 1
        return S_UNSUPP

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector + length // SECTOR <= self.sectors

    def _read(self, chain: Chain, sector: int, length: int) -> int:
        if not self._range_ok(sector, length):
            self.counts["error"] += 1
            return S_IOERR
        try:
            data = os.pread(self._fd, length, sector * SECTOR)
        except OSError:
            self.counts["error"] += 1
            return S_IOERR
        chain.write(data)
        self.counts["read"] += 1
        return S_OK

    def _write(self, chain: Chain, sector: int, length: int) -> int:
        if self.readonly or not self._range_ok(sector, length):
            self.counts["error"] += 1
            return S_IOERR
        data = chain.read()[_HEADER.size:]
        try:
            os.pwrite(self._fd, data, sector * SECTOR)
        except OSError:
            self.counts["error"] += 1
            return S_IOERR
        self.counts["write"] += 1
        if not self.negotiated & F_FLUSH:
            return self._fsync()  # write-through: the driver cannot ask for flushes
        return S_OK

    def _fsync(self) -> int:
        try:
            os.fsync(self._fd)
        except OSError:
            self.counts["error"] += 1
            return S_IOERR
        return S_OK

    def close(self) -> None:
        """fsync and close the file (idempotent)."""
        if self._fd >= 0:
            if not self.readonly:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio-blk and virtio-console against the fake driver (see test_virtio_transport), in the
real guest memory of a real VM, notified through the real doorbell eventfds."""

from __future__ import annotations

import os
import struct

import pytest
from test_virtio_transport import BASE, GSI, RAM, FakeDriver, machine_fixture

from pyvmm import Machine
from pyvmm.virtio import Block, Console, attach
from pyvmm.virtio import mmio as reg
from pyvmm.virtio.blk import F_FLUSH, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT
from pyvmm.virtio.console import MAX_PENDING_INPUT
from pyvmm.virtio.device import F_VERSION_1


vmachine = machine_fixture()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * 64)  # 64 sectors, each 0..255 twice
    return path


def blk_request(d: FakeDriver, kind: int, sector: int, data: bytes | int = 0,
                via: str = "doorbell") -> tuple[int, bytes, int]:
    """One request; returns (status, data read, used length)."""
    header = struct.pack("<IIQ", kind, 0, sector)
    bufs: list = [(header, False)]
    if isinstance(data, bytes) and data:
        bufs.append((data, False))
    elif isinstance(data, int) and data:
        bufs.append((data, True))
    bufs.append((1, True))
    _head, addrs = d.add(0, bufs)
    d.kick(0, via)
    [(_id, used_len)] = d.wait_used(0)
    status = d.m.memory.read(addrs[-1], 1)[0]
    got = d.m.memory.read(addrs[1], data) if isinstance(data, int) and data else b""
    return status, got, used_len


def test_block_read_write_flush_get_id(vmachine, image):
    disk = Block(image, serial="test-serial")
    t = attach(vmachine, disk, BASE, GSI)
    d = FakeDriver(vmachine)
    assert d.init() & reg.S_DRIVER_OK
    capacity, = struct.unpack("<Q", vmachine.mmio.read(BASE + reg.CONFIG, 8))
    assert capacity == 64
    status, got, used = blk_request(d, T_IN, 3, 1024)
    assert (status, got, used) == (S_OK, (bytes(range(256)) * 4), 1025)
    payload = os.urandom(1024)
    assert blk_request(d, T_OUT, 10, payload)[0] == S_OK
    assert blk_request(d, T_FLUSH, 0, via="mmio")[0] == S_OK
    with open(image, "rb") as f:  # on the host file already
        f.seek(10 * 512)
        assert f.read(1024) == payload
    status, got, used = blk_request(d, T_GET_ID, 0, 20)
    assert status == S_OK and got == b"test-serial".ljust(20, b"\0")
    assert disk.counts["flush"] == 1 and disk.counts["write"] == 1
    assert t.stats["notify_doorbell"] == 3 and t.stats["notify_mmio"] == 1
    assert vmachine.interrupts[0].count == 4


def test_block_errors(vmachine, image):
    disk = Block(image)
    attach(vmachine, disk, BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    assert blk_request(d, T_IN, 63, 1024)[0] == S_IOERR        # runs past the end
    assert blk_request(d, T_IN, 2**63, 512)[0] == S_IOERR      # absurd sector
    assert blk_request(d, T_OUT, 0, b"x" * 100)[0] == S_IOERR  # not whole sectors
    assert blk_request(d, 11, 0)[0] == S_UNSUPP                # DISCARD is not offered
    assert not d.r32(reg.STATUS) & reg.S_NEEDS_RESET         # request errors, device fine
    # No status byte: the chain is malformed, the device needs a reset.
    d.add(0, [(struct.pack("<IIQ", T_IN, 0, 0), False)])
    d.kick(0)
    d.kick(0, "mmio")
    assert d.r32(reg.STATUS) & reg.S_NEEDS_RESET


def test_block_readonly_and_write_through(vmachine, image, tmp_path):
    disk = Block(image, readonly=True)
    attach(vmachine, disk, BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    assert blk_request(d, T_OUT, 0, b"y" * 512)[0] == S_IOERR
    assert image.read_bytes()[:512] == bytes(range(256)) * 2
    # Without FLUSH negotiated every write is written through (and still lands in the file).
    other = tmp_path / "wt.img"
    other.write_bytes(bytes(4096))
    with Machine(kvm=vmachine.kvm, irqchip=True, memory_size=RAM, serial=False) as m2:
        t2 = attach(m2, Block(other), BASE, GSI)
        d2 = FakeDriver(m2)
        d2.init(features=F_VERSION_1)
        assert not t2.device.negotiated & F_FLUSH
        assert blk_request(d2, T_OUT, 1, b"z" * 512)[0] == S_OK
    assert other.read_bytes()[512:1024] == b"z" * 512


def test_block_close_fsyncs_and_is_idempotent(image):
    disk = Block(image)
    disk.close()
    disk.close()
    with pytest.raises(ValueError):
        Block(image, serial="x" * 21)


def test_console_output_input_and_bounds(vmachine):
    seen = []
    con = Console(sink=seen.append, keep=8)
    t = attach(vmachine, con, BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    d.add(1, [(b"hello, ", False), (b"world\n", False)])
    d.kick(1)
    d.wait_used(1)
    assert b"".join(seen) == b"hello, world\n"
    assert con.output == b", world\n"[-8:] and con.output_bytes == 13  # bounded
    # Input waits for receive buffers, then fills them.
    con.feed(b"ls\n")
    assert d.used_idx(0) == 0
    _head, (addr,) = d.add(0, [(16, True)])
    d.kick(0)
    [(_id, n)] = d.wait_used(0)
    assert n == 3 and vmachine.memory.read(addr, 3) == b"ls\n"
    con.feed(b"x" * (MAX_PENDING_INPUT + 10))
    assert con.dropped_input == 10
    # emerg_wr writes one character at once
    vmachine.mmio.write(BASE + reg.CONFIG + 8, b"!\0\0\0")
    assert seen[-1] == b"!"
    assert t.stats["irq_irqfd"] >= 2

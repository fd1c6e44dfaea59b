# SPDX-License-Identifier: GPL-2.0-or-later
"""Snapshots: a paused `Machine` written to one file, and a new Machine built from it that
continues where the old one stopped, in this process or another.

The file is a fixed magic line, a JSON header (what the machine was made of: vCPUs, in-kernel
devices, memory regions, every vCPU's VcpuState and the VmState, the state of each device
that keeps some) and then guest memory, page-aligned, region after region. Chunks of memory
that are all zero are left out (a fresh machine's memory is zero already), so a mostly idle
1 GiB guest makes a small file. Nothing in the file is executed: loading one trusts it only
to be a pyvmm snapshot, never to run code (no pickle).

Devices take part through a small protocol: a device on `machine.pio` or `machine.mmio` that
has `save_state()` (returning JSON-able values) and `load_state(state)` is saved, and after a
restore gets its state back, matched by bus, base, length and class name. What a snapshot
cannot rebuild by itself (devices, doorbells and interrupts, which belong to the caller's
code) the caller recreates in `setup(machine)`, which `restore()` calls after memory and
before any state is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from .errors import ClosedError
from .state.vcpu_state import VcpuState
from .state.vm_state import VmState, has_pit

if TYPE_CHECKING:
    from .kvm import Kvm
    from .machine import Machine
    from .vm import Vm

__all__ = ["FORMAT", "MAGIC", "SnapshotMethods", "Stateful", "build", "layout",
           "load_paused_state", "machine_vm", "paused_state", "read_header", "restore",
           "snapshot"]

MAGIC = b"pyvmm snapshot\n\0"
FORMAT = 1
PAGE = 4096
CHUNK = 256 << 10          # the unit of zero-chunk elision
_LEN = struct.Struct("<Q")


@runtime_checkable
class Stateful(Protocol):
    """A device whose state a snapshot keeps."""

    def save_state(self) -> Any:
        """The device's state as JSON-able values (dicts, lists, str, int, float, bool)."""

    def load_state(self, state: Any) -> None:
        """Take back what save_state() returned (on a fresh device of the same class)."""


def machine_vm(machine: Machine) -> Vm:
    """The machine's VM (ClosedError once the machine is closed)."""
    if machine.vm is None or machine.vm.closed:
        raise ClosedError("the machine is closed")
    return machine.vm


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def _nonzero_runs(view: memoryview) -> list[list[int]]:
    """[[first chunk, number of chunks], ...] of the chunks of `view` that are not all zero."""
    zero = bytes(CHUNK)
    runs: list[list[int]] = []
    for index, start in enumerate(range(0, len(view), CHUNK)):
        piece = view[start:start + CHUNK].tobytes()
        if piece == zero[:len(piece)]:
            continue
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([index, 1])
    return runs


def _device_key(bus: str, mapping) -> dict[str, Any]:
    device = mapping.device
    return {"bus": bus, "base": mapping.base, "length": mapping.length,
            "type": f"{type(device).__module__}.{type(device).__qualname__}"}


def _stateful_devices(machine: Machine):
    for bus_name, bus in (("pio", machine.pio), ("mmio", machine.mmio)):
        for mapping in bus.devices():
            if isinstance(mapping.device, Stateful):
                yield bus_name, mapping


def layout(machine: Machine) -> dict[str, Any]:
    """What a machine is made of, for building an empty one like it (see build())."""
    for region in machine_vm(machine).memory.regions(None):
        if region.alias_of is not None:
            raise ValueError(f"{region!r} is an alias (an SMRAM view): snapshots and "
                             "migrations keep plain RAM regions only")
    return {"format": FORMAT, "vcpus": [vcpu.id for vcpu in machine.vcpus],
            "irqchip": bool(machine.irqchip), "pit": has_pit(machine_vm(machine)),
            "serial": machine.serial is not None,
            "regions": [{"guest_addr": r.guest_addr, "size": r.size, "readonly": r.readonly,
                         "log_dirty": r.log_dirty, "address_space": r.address_space}
                        for r in machine_vm(machine).memory.regions(None)]}


def paused_state(machine: Machine) -> dict[str, Any]:
    """Every vCPU's state, the VM's and the devices' of a paused machine, as plain values."""
    for vcpu in machine.vcpus:
        if vcpu.running:
            raise RuntimeError(f"vCPU {vcpu.id} is running: save a machine after run() "
                               "has returned")
    vcpu_states = [vcpu.save_state().encode() for vcpu in machine.vcpus]
    return {"vcpu_states": vcpu_states, "vm_state": machine_vm(machine).save_state().encode(),
            "devices": [dict(_device_key(bus, m), state=m.device.save_state())
                        for bus, m in _stateful_devices(machine)]}


def build(description: dict[str, Any], factory: Callable[..., Machine], *,
          kvm: Kvm | None = None) -> Machine:
    """An empty machine laid out as `description` (from layout()) says: its vCPUs, in-kernel
    irqchip and PIT, serial console and memory regions (zeroed). `factory` is the Machine
    class (called as Machine(vcpus=, irqchip=, kvm=, serial=)). ValueError if malformed."""
    try:
        ids = [int(i) for i in description["vcpus"]]
        regions = [(int(r["guest_addr"]), int(r["size"]), bool(r["readonly"]),
                    bool(r["log_dirty"]), int(r["address_space"]))
                   for r in description["regions"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a machine description: {err!r}") from None
    if ids != list(range(len(ids))):
        raise ValueError(f"vCPU ids {ids} are not 0..n-1")
    machine = factory(vcpus=len(ids), irqchip=bool(description.get("irqchip")), kvm=kvm,
                      serial=bool(description.get("serial", True)))
    try:
        if description.get("pit"):
            machine_vm(machine).create_pit()
        for addr, size, readonly, log_dirty, space in regions:
            machine_vm(machine).add_memory(addr, size, readonly=readonly, log_dirty=log_dirty,
                                  address_space=space)
    except BaseException:
        machine.close()
        raise
    return machine


def load_paused_state(machine: Machine, saved: dict[str, Any], *, strict: bool = True) -> None:
    """Load what paused_state() returned into a machine from build() (after its memory and
    the caller's devices are in place)."""
    try:
        vcpu_states = [VcpuState.decode(s) for s in saved["vcpu_states"]]
        vm_state = VmState.decode(saved["vm_state"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"the saved state lacks {err}") from None
    if [s.vcpu_id for s in vcpu_states] != [v.id for v in machine.vcpus]:
        raise ValueError("the saved vCPU states do not match the machine's vCPUs")
    machine_vm(machine).load_state(vm_state)
    for vcpu, state in zip(machine.vcpus, vcpu_states, strict=True):
        vcpu.load_state(state)
        vcpu.cpuid_set = True
    _load_devices(machine, saved.get("devices", []), strict)


def snapshot(machine: Machine, path: str | os.PathLike) -> dict[str, Any]:
    """Write the paused `machine` to `path`; returns the header written. Refuses a machine
    whose vCPUs are running (call it after run() has returned)."""
    regions = machine_vm(machine).memory.regions(None)
    # vCPUs first: completing their last exits' I/O may still write guest memory (an IN's
    # string destination), and the VM devices' state is final once the vCPUs are.
    header = dict(layout(machine), **paused_state(machine))
    header["regions"] = []
    offset = 0
    views = []
    for region, entry in zip(regions, layout(machine)["regions"], strict=True):
        view = region.view()
        runs = _nonzero_runs(view)
        header["regions"].append(dict(entry, offset=offset, runs=runs))
        views.append((view, runs))
        offset += _align(sum(n for _, n in runs) * CHUNK)
    text = json.dumps(header, separators=(",", ":")).encode()
    data_start = _align(len(MAGIC) + _LEN.size + len(text))
    with open(path, "wb") as f:
        f.write(MAGIC + _LEN.pack(len(text)) + text)
        f.write(bytes(data_start - f.tell()))
        for view, runs in views:
            written = 0
            for first, count in runs:
                piece = view[first * CHUNK:(first + count) * CHUNK]
                f.write(piece)
                written += len(piece)
            f.write(bytes(_align(written) - written))
    return header


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(the JSON header, where guest memory starts) of a snapshot file; ValueError for a
    file that is not one."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + _LEN.size)
        if len(head) != len(MAGIC) + _LEN.size or head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{os.fspath(path)} is not a pyvmm snapshot")
        (length,) = _LEN.unpack(head[len(MAGIC):])
        if length > 1 << 30:
            raise ValueError(f"{os.fspath(path)}: header of {length} bytes is not plausible")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{os.fspath(path)}: the snapshot header is damaged ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)}: snapshot format {header.get('format')!r} "
                         f"is not {FORMAT}" if isinstance(header, dict) else
                         f"{os.fspath(path)}: the snapshot header is damaged")
    return header, _align(len(MAGIC) + _LEN.size + length)


def _read_into(f, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError("the snapshot file ends inside guest memory (truncated)")
        done += n


def restore(path: str | os.PathLike, factory: Callable[..., Machine], *, kvm: Kvm | None = None,
            setup: Callable[[Machine], object] | None = None, strict: bool = True) -> Machine:
    """A new machine (made by `factory`, the Machine class) that continues where the snapshot
    at `path` stopped: `run()` it.

    `setup(machine)` recreates what the caller's code owns (devices, doorbells, interrupts)
    before states are loaded. With `strict`, a saved device state that no device of the new
    machine takes is an error (ValueError)."""
    header, data_start = read_header(path)
    machine = build(header, factory, kvm=kvm)
    try:
        with open(path, "rb") as f:
            built = machine_vm(machine).memory.regions(None)
            for region, entry in zip(built, header["regions"], strict=True):
                view = region.view()
                f.seek(data_start + int(entry["offset"]))
                for first, count in entry["runs"]:
                    _read_into(f, view[first * CHUNK:(first + count) * CHUNK])
        if setup is not None:
            setup(machine)
        load_paused_state(machine, header, strict=strict)
    except BaseException:
        machine.close()
        raise
    return machine


def _load_devices(machine: Machine, saved: list, strict: bool) -> None:
    present = {tuple(sorted(_device_key(bus, m).items())): m.device
               for bus, m in _stateful_devices(machine)}
    for entry in saved:
        entry = dict(entry)
        state = entry.pop("state", None)
        device = present.get(tuple(sorted(entry.items())))
        if device is None:
            if strict:
                raise ValueError(f"no device of the restored machine takes the saved state of "
                                 f"{entry['type']} at {entry['bus']} {entry['base']:#x}+"
                                 f"{entry['length']:#x}: register it in setup()")
            continue
        device.load_state(state)


class SnapshotMethods:
    """`Machine.snapshot(path)` and `Machine.restore(path)` (Machine inherits this class)."""

    def snapshot(self, path: str | os.PathLike) -> dict[str, Any]:
        """Write this paused machine (memory, every vCPU's and the VM's state, the state of
        devices with save_state()/load_state()) to one file; returns its header."""
        return snapshot(cast("Machine", self), path)

    @classmethod
    def restore(cls, path: str | os.PathLike, *, kvm: Kvm | None = None,
                setup: Callable[[Machine], object] | None = None,
                strict: bool = True) -> Machine:
        """A new Machine continuing where the snapshot at `path` stopped. `setup(machine)`
        recreates devices, doorbells and interrupts before the states are loaded."""
        return restore(path, cast("Callable[..., Machine]", cls), kvm=kvm, setup=setup,
                       strict=strict)

# SPDX-License-Identifier: GPL-2.0-or-later
"""ABI conformance: every struct size, field offset/size, ioctl number and constant pyvmm
declares must equal what the host's <linux/kvm.h> says.

The list of checks is generated from pyvmm itself (the cffi declarations, the KVM_* ints of
pyvmm.ioctls, the #defines of kernel_headers/constants.h), written into an include file for
tests/abi_probe.c, compiled once with the host C compiler and run. Names newer than the host's
headers are reported as missing, not failed; everything the host defines must agree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm import ioctls
from pyvmm._ffi import _DEFINE, HEADER_TEXT, ffi

PROBE = Path(__file__).with_name("abi_probe.c")

# Fields that exist only in kernel headers newer than some we support, keyed by the C path
# prefix, with the macro that arrived in the same kernel release (so `#ifdef` can tell).
VERSIONED_FIELDS = {
    # 6.1 has `__u32 longmode; __u32 pad;`; later kernels `union { __u32 longmode; __u64 flags; }`
    # (with KVM_EXIT_HYPERCALL_LONG_MODE). The offsets agree either way.
    "kvm_run.hypercall.flags": "KVM_EXIT_HYPERCALL_LONG_MODE",
    "kvm_run.memory_fault": "KVM_EXIT_MEMORY_FAULT",
    # Whole structs new in 6.8 (guest_memfd), absent from 6.1's headers.
    "kvm_userspace_memory_region2": "KVM_SET_USER_MEMORY_REGION2",
    "kvm_create_guest_memfd": "KVM_CREATE_GUEST_MEMFD",
}


def _is_anonymous(ctype) -> bool:
    return "$" in ctype.cname


def _walk(ctype, c_path: str = "", base: int = 0):
    """(C member path, offset from the outermost struct, CField) for every member of `ctype`,
    recursing into anonymous nested structs/unions (cffi already flattens anonymous members
    into their parent; a nested type's offsets are relative to itself)."""
    for name, field in ctype.fields:
        path = f"{c_path}.{name}" if c_path else name
        yield path, base + field.offset, field
        if field.type.kind in ("struct", "union") and _is_anonymous(field.type):
            yield from _walk(field.type, path, base + field.offset)


def _guard(key: str) -> str | None:
    for prefix, macro in VERSIONED_FIELDS.items():
        if key == prefix or key.startswith(prefix + "."):
            return macro
    return None


def pyvmm_expectations():
    """Returns (lines of the include file, {(kind, name): expected value})."""
    lines: list[str] = []
    expected: dict[tuple[str, str], object] = {}

    def guarded(stmt: str, guard: str | None, kind: str, name: str) -> None:
        if guard:
            lines.extend([f"#ifdef {guard}", stmt + ";", "#else",
                          f'MISSING("{kind}", "{name}");', "#endif"])
        else:
            lines.append(stmt + ";")

    _typedefs, structs, unions = ffi.list_types()
    for tag, names in (("struct", structs), ("union", unions)):
        for sname in names:
            cname = f"{tag} {sname}"
            ctype = ffi.typeof(cname)
            guarded(f'SIZE({cname}, "{sname}")', _guard(sname), "size", sname)
            expected[("size", sname)] = ffi.sizeof(ctype)
            for path, offset, field in _walk(ctype):
                key = f"{sname}.{path}"
                flexible = field.type.kind == "array" and field.type.length is None
                if flexible:
                    stmt = f'FLEX({cname}, {path}, "{key}")'
                    expected[("field", key)] = (offset, None)
                else:
                    stmt = f'FIELD({cname}, {path}, "{key}")'
                    expected[("field", key)] = (offset, ffi.sizeof(field.type))
                guarded(stmt, _guard(key), "field", key)

    for name in sorted(dir(ioctls)):
        value = getattr(ioctls, name)
        if name.startswith("KVM_") and type(value) is int:
            expected[("ioctl", name)] = value
            lines.extend([f"#ifdef {name}", f'NUMBER("ioctl", {name});', "#else",
                          f'MISSING("ioctl", "{name}");', "#endif"])

    for name, value in _DEFINE.findall(HEADER_TEXT["constants.h"]):
        expected[("const", name)] = int(value)
        lines.extend([f"#ifdef {name}", f'NUMBER("const", {name});', "#else",
                      f'MISSING("const", "{name}");', "#endif"])
    return lines, expected


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"ABI conformance cannot run in CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def kernel_view(tmp_path_factory):
    """Compile and run the probe; returns (parsed output, expected values)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        _unavailable("no C compiler (apt-get install gcc)")
    lines, expected = pyvmm_expectations()
    tmp = tmp_path_factory.mktemp("abi")
    (tmp / "abi_checks.inc").write_text("\n".join(lines) + "\n")
    exe = tmp / "abi_probe"
    proc = subprocess.run([compiler, "-std=gnu11", "-O0", "-w", "-I", str(tmp), "-o", str(exe),
                           str(PROBE)], capture_output=True, text=True, check=False)
    if proc.returncode:
        if "linux/kvm.h" in proc.stderr and "No such file" in proc.stderr:
            _unavailable("no <linux/kvm.h> (apt-get install linux-libc-dev)")
        pytest.fail("the ABI probe does not compile against the host's <linux/kvm.h>: a field "
                    "pyvmm declares is missing or named differently there (add it to "
                    f"VERSIONED_FIELDS if it is new in some kernel):\n{proc.stderr[-4000:]}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen: dict[tuple[str, str], object] = {}
    missing: list[str] = []
    for line in out.splitlines():
        kind, name, *rest = line.split()
        if kind.startswith("missing-"):
            missing.append(f"{kind[8:]} {name}")
        elif kind == "field":
            seen[(kind, name)] = (int(rest[0]), None if rest[1] == "-" else int(rest[1]))
        else:
            seen[(kind, name)] = int(rest[0])
    return seen, expected, missing


def _mismatches(seen, expected, kind):
    bad = []
    for (k, name), want in sorted(expected.items()):
        if k != kind or (k, name) not in seen:
            continue
        got = seen[(k, name)]
        if got != want:
            if kind == "field":
                bad.append(f"{name}: pyvmm offset/size {want}, kernel {got}")
            elif kind == "size":
                bad.append(f"sizeof(struct {name}): pyvmm {want}, kernel {got}")
            else:
                bad.append(f"{name}: pyvmm {want:#x}, kernel {got:#x}")
    return bad


def test_struct_sizes(kernel_view):
    seen, expected, _ = kernel_view
    assert ("size", "kvm_run") in seen and ("size", "kvm_regs") in seen
    assert not (bad := _mismatches(seen, expected, "size")), "\n".join(bad)


def test_field_offsets_and_sizes(kernel_view):
    seen, expected, _ = kernel_view
    # The exit payloads pyvmm decodes are really covered (nested anonymous members included).
    for key in ("kvm_run.io.data_offset", "kvm_run.mmio.data", "kvm_run.msr.index",
                "kvm_run.hypercall.longmode", "kvm_run.s.regs", "kvm_sregs.apic_base",
                "kvm_vcpu_events.exception_payload", "kvm_dirty_log.dirty_bitmap",
                "kvm_cpuid2.entries"):
        assert ("field", key) in seen, f"{key} was not checked"
    assert not (bad := _mismatches(seen, expected, "field")), "\n".join(bad)


def test_ioctl_numbers(kernel_view):
    seen, expected, missing = kernel_view
    checked = [n for (k, n) in seen if k == "ioctl"]
    # The ioctls every VMM needs exist in any kernel pyvmm supports.
    for name in ("KVM_RUN", "KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION", "KVM_GET_REGS",
                 "KVM_SET_SREGS", "KVM_IOEVENTFD", "KVM_GET_STATS_FD"):
        assert name in checked, f"{name} missing from the host header? {missing}"
    assert not (bad := _mismatches(seen, expected, "ioctl")), "\n".join(bad)


def test_constants(kernel_view):
    seen, expected, _ = kernel_view
    checked = [n for (k, n) in seen if k == "const"]
    assert len(checked) > 100, f"only {len(checked)} constants checked"
    assert "KVM_CAP_IOEVENTFD" in checked and "KVM_EXIT_X86_RDMSR" in checked
    assert not (bad := _mismatches(seen, expected, "const")), "\n".join(bad)


def test_report_missing(kernel_view):
    """Not a failure: what the host headers are too old for (or name differently)."""
    _, expected, missing = kernel_view
    print(f"{len(expected)} items; absent from the host headers: {', '.join(missing) or 'none'}")
    # Every guarded field that is missing must have a guard; an unguarded absent field would
    # have broken the compile above.
    for item in missing:
        kind, name = item.split(" ", 1)
        if kind == "field":
            assert _guard(name), item

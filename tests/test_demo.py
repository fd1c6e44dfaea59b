"""`pyvmm demo`: each path of the doorbell harness counts every ring, and only the userspace
paths reach userspace; the hypercall path runs where hypercalls reach userspace."""

from __future__ import annotations

import pytest

from pyvmm import demo
from pyvmm.testing import hostinfo
from pyvmm.testing.plugin import CAP_SKIP_PROPERTY

RINGS = 500


@pytest.mark.parametrize("mode", ["cpl0", "cpl3"])
@pytest.mark.parametrize("path", demo.PATHS)
def test_every_path_counts_every_ring(kvm, path, mode):
    row = demo.ring(path, mode, RINGS, kvm=kvm)
    assert row.counted == RINGS
    assert row.userspace_exits == (RINGS if path.startswith("userspace") else 0)
    assert row.seconds > 0 and row.guest_cycles > 0


def test_table_and_speed_up_column(kvm):
    rows = [demo.ring(path, "cpl3", RINGS, kvm=kvm) for path in demo.PATHS]
    table = demo.format_table(rows)
    assert table.splitlines()[0].startswith("guest at CPL3")
    assert "1.00x" in table.splitlines()[2]          # userspace MMIO is the reference row
    assert all(path in table for path in demo.PATHS)


@pytest.mark.stock_kvm
def test_hypercall_path(request, kvm):
    works, why = demo.hypercalls_reach_userspace(kvm)
    if not works:
        request.node.user_properties.append((CAP_SKIP_PROPERTY, ["EXIT_HYPERCALL"]))
        pytest.skip(f"pyvmm: missing KVM capability EXIT_HYPERCALL on "
                    f"{hostinfo.kvm_module()} ({why})")
    row = demo.ring(demo.HYPERCALL_PATH, "cpl0", 200, kvm=kvm)
    assert row.counted == 200 and row.userspace_exits == 200

# SPDX-License-Identifier: GPL-2.0-or-later
"""bench/bench_kut_vmexit.py: vmexit.flat's own timings, parsed and measured for real."""

from __future__ import annotations

import os
import sys

import pytest

from pyvmm import bench as pyvmm_bench
from pyvmm.testing.plugin import require_kvm

sys.path.insert(0, str(pyvmm_bench.bench_dir()))
import bench_kut_vmexit  # noqa: E402


def test_cycles_are_read_from_the_output():
    out = "cr4 = 20\r\ncpuid 22150\r\ninl_from_qemu 38604\ninl_from_kernel 21638\nvmcall 5\n"
    assert bench_kut_vmexit.cycles(out) == {"cpuid": 22150, "inl_from_qemu": 38604,
                                            "inl_from_kernel": 21638}


def test_paired_doc_has_per_boot_ratios():
    data = {n: {"pyvmm": [2.0, 4.0], "qemu": [4.0, 4.0]} for n in bench_kut_vmexit.TESTS}
    doc = bench_kut_vmexit.paired_doc(data, ["kut.vmexit.cpuid"])
    assert doc == {"kut.vmexit.cpuid": {"pyvmm": [2.0, 4.0], "c": [4.0, 4.0],
                                        "ratios": [0.5, 1.0], "loops": [1]}}


def test_one_pyvmm_boot_measures_every_row(kvm):
    kut_dir = os.environ.get("PYVMM_KUT_DIR")
    if not kut_dir:
        if require_kvm():
            pytest.fail("PYVMM_REQUIRE_KVM=1 but PYVMM_KUT_DIR is not set", pytrace=False)
        pytest.skip("PYVMM_KUT_DIR (a built kvm-unit-tests tree) is not set")
    found = bench_kut_vmexit.boot_once(kut_dir, qemu=False)
    assert set(found) == set(bench_kut_vmexit.TESTS)
    assert all(n > 0 for n in found.values())
    # a userspace exit costs more than an in-kernel one, whatever the host
    assert found["inl_from_qemu"] > found["inl_from_kernel"]

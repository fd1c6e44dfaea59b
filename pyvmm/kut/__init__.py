# SPDX-License-Identifier: GPL-2.0-or-later
"""kvm-unit-tests under pyvmm: the unittests.cfg parser (`config`), `-cpu` options as CPUID
(`cpu`), the runners under pyvmm and under QEMU+KVM (`runner`) and `pyvmm kut` (`command`)."""

from .config import KutTest, load_tests, parse_cfg
from .runner import Outcome, run_pyvmm, run_qemu

__all__ = ["KutTest", "Outcome", "load_tests", "parse_cfg", "run_pyvmm", "run_qemu"]

# SPDX-License-Identifier: GPL-2.0-or-later
"""pytest items for kvm-unit-tests (loaded with pyvmm's pytest plugin).

    pytest --kut-dir ~/src/kvm-unit-tests -k msr          # x86/unittests.cfg's [msr] etc.
    pytest --kut-dir DIR --kut-timeout 30 -k "vmexit or smptest"

Each test of the tree's x86/unittests.cfg becomes an item `kvm-unit-tests::NAME`, run under
pyvmm on a PC platform. A test that reports PASS passes; SKIP (by the test itself, or because
pyvmm or this host cannot give what it asks for) is a skip with the reason; FAIL, TIMEOUT and
ERROR fail the item, and the failure shows the test's serial output. The items exist only
when --kut-dir is given, so a plain `pytest` run is not slowed down by the suite.
"""

from __future__ import annotations

import pytest

__all__ = ["KutFailure", "KutItem", "KutSuite"]

SUITE = "kvm-unit-tests"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("pyvmm")
    group.addoption("--kut-dir", default=None, metavar="DIR",
                    help="a built kvm-unit-tests tree: run each x86 test as a pytest item")
    group.addoption("--kut-timeout", type=float, default=None, metavar="S",
                    help="seconds per kvm-unit-test (default: the test's own timeout)")


class KutFailure(Exception):
    """A kvm-unit-test that did not pass: its outcome (status, counts, serial output)."""

    def __init__(self, outcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


class KutItem(pytest.Item):
    """One kvm-unit-test under pyvmm."""

    def __init__(self, *, test, kut_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.test = test
        self.kut_dir = kut_dir

    def runtest(self) -> None:
        from ..kut.runner import run_pyvmm

        outcome = run_pyvmm(self.kut_dir, self.test, explicit=True,
                            timeout=self.config.getoption("kut_timeout"))
        self.user_properties.append(("kut", outcome.as_json()))
        if outcome.status == "SKIP":
            pytest.skip(outcome.reason or outcome.summary or "the test skipped everything")
        if outcome.status != "PASS":
            raise KutFailure(outcome)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, KutFailure):
            o = excinfo.value.outcome
            head = (f"{self.test.name} ({self.test.file}, smp {self.test.smp}): {o.status}"
                    f" - {o.passed} passed, {o.failed} failed, {o.skipped} skipped in "
                    f"{o.seconds:.1f} s" + (f"; {o.reason}" if o.reason else ""))
            failed = [line for line in o.output.splitlines()
                      if line.startswith(("FAIL:", "XPASS:"))]
            parts = [head]
            if failed:
                parts += ["failed checks:", *failed]
            parts += ["--- serial output ---", o.output.rstrip() or "(none)"]
            return "\n".join(parts)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{SUITE}::{self.test.name}"


class KutSuite(pytest.Collector):
    """The tests of one kvm-unit-tests tree's x86/unittests.cfg."""

    def __init__(self, *, kut_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kut_dir = kut_dir

    def collect(self):
        from ..kut.config import load_tests

        try:
            tests = load_tests(self.kut_dir)
        except ValueError as err:
            raise pytest.UsageError(f"--kut-dir: {err}") from None
        return [KutItem.from_parent(self, name=test.name, test=test, kut_dir=self.kut_dir)
                for test in tests]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    # Before -k/-m deselect, so `pytest --kut-dir DIR -k msr` selects among these too.
    kut_dir = config.getoption("kut_dir")
    if not kut_dir:
        return
    from pathlib import Path

    from ..kut.config import find_tests

    try:
        cfg = find_tests(kut_dir)
    except ValueError as err:
        raise pytest.UsageError(f"--kut-dir: {err}") from None
    suite = KutSuite.from_parent(session, name=SUITE, path=Path(cfg), nodeid=SUITE,
                                 kut_dir=str(kut_dir))
    items.extend(suite.collect())

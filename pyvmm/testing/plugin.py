# SPDX-License-Identifier: GPL-2.0-or-later
"""pytest plugin for pyvmm (entry point ``pyvmm`` in the ``pytest11`` group).

Fixtures
    ``kvm``      a ``pyvmm.Kvm()``, closed after the test
    ``vm``       ``kvm.create_vm()``, closed after the test
    ``machine``  a ``pyvmm.Machine()`` on that ``kvm``, closed after the test

    When /dev/kvm cannot be opened they skip the test with the reason; with
    ``PYVMM_REQUIRE_KVM=1`` they fail it instead (CI, where KVM must be there).

Markers
    ``requires_cap(Cap.X86_SMM, ..., vm=False, min=1)``
        Skip the test when this host's KVM lacks one of the capabilities (KVM_CHECK_EXTENSION
        below ``min``; ``vm=True`` asks a VM fd). The reason names the capabilities. This is
        the one skip that ``PYVMM_REQUIRE_KVM=1`` allows. Such tests are also given the
        ``stock_kvm`` marker, so ``pytest -m stock_kvm`` selects exactly them (the nested
        runner's default command).
    ``stock_kvm``
        The test needs stock KVM (SMM, userspace hypercalls); the nested runner runs these.

Reporting
    The session ends with a line naming the KVM that ran the tests and how many tests were
    skipped for which capability. ``PYVMM_CAP_SKIPS=<path>`` writes the tests skipped for a
    capability as JSON; ``PYVMM_PASSED=<path>`` writes the passed, failed and skipped test ids.
    ``pyvmm nested --check-skips LOCAL NESTED`` compares the two (see pyvmm.testing.nested).

pytest-xdist
    Works under ``pytest -n N``: the fixtures are per test, so every worker opens its own KVM
    handles and VMs; the workers' reports reach the controller, which alone writes the JSON
    files and the summary line, merged over all workers (tests/test_xdist.py).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

from . import hostinfo

CAP_SKIPS_ENV = "PYVMM_CAP_SKIPS"
PASSED_ENV = "PYVMM_PASSED"
REQUIRE_ENV = "PYVMM_REQUIRE_KVM"
CAP_SKIP_PROPERTY = "pyvmm_cap_skip"   # item.user_properties key, survives pytest-xdist

CAP_SKIPS_FORMAT = "pyvmm-cap-skips/1"
OUTCOMES_FORMAT = "pyvmm-outcomes/1"

# kvm-unit-tests as pytest items (--kut-dir), in a module of their own.
pytest_plugins = ("pyvmm.testing.kut_plugin",)


def require_kvm() -> bool:
    """True when $PYVMM_REQUIRE_KVM asks for KVM tests to fail rather than skip."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _no_kvm(reason: str):
    if require_kvm():
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _import_core():
    try:
        import pyvmm
    except ImportError as e:  # a broken checkout is a failure, not a missing KVM
        pytest.fail(f"pyvmm cannot be imported: {e}", pytrace=False)
    return pyvmm


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture
def kvm():
    """A ``pyvmm.Kvm()`` (skips, or fails under PYVMM_REQUIRE_KVM=1, without /dev/kvm)."""
    pyvmm = _import_core()
    try:
        handle = pyvmm.Kvm()
    except pyvmm.KvmUnavailable as e:
        reason = f"/dev/kvm unavailable: {e}"
    else:
        reason = None
    if reason is not None:  # outside the except block: no chained traceback in the report
        _no_kvm(reason)
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def vm(kvm):
    """A VM from ``kvm.create_vm()``, closed (with its vCPUs and memory) after the test."""
    handle = kvm.create_vm()
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def machine(kvm):
    """A ``pyvmm.Machine`` on the ``kvm`` fixture's handle, closed after the test."""
    pyvmm = _import_core()
    try:
        machine_cls = pyvmm.Machine
    except (AttributeError, ImportError) as e:
        pytest.fail(f"pyvmm.Machine is not available: {e}", pytrace=False)
    m = machine_cls(kvm=kvm)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def make_machine(kvm):
    """``make(**options)``: a ``pyvmm.Machine(kvm=..., **options)`` (vcpus, irqchip,
    memory_size, serial), each closed after the test."""
    pyvmm = _import_core()
    made = []

    def make(**options):
        m = pyvmm.Machine(kvm=kvm, **options)
        made.append(m)
        return m
    try:
        yield make
    finally:
        for m in reversed(made):
            m.close()


@pytest.fixture
def payload_source(tmp_path):
    """``make(body, mode="long64-user", data="", name="p")``: a payload written from
    assembler source (``pyvmm.inc`` included, `body` at ``start``, `data` in ``.data``), as a
    path ``Machine.load`` and ``guests.build`` take. Long64-user code runs natively (fast)
    even on an emulating host."""
    def make(body: str, mode: str = "long64-user", data: str = "", name: str = "p") -> str:
        bits = {"real16": ".code16", "prot32": ".code32"}.get(mode, ".code64")
        src = tmp_path / f"{name}_{mode.replace('-', '_')}.S"
        src.write_text(f"# pyvmm: mode={mode}\n.include \"pyvmm.inc\"\n.text\n{bits}\n"
                       f".globl start\nstart:\n{body}\n.data\n{data}\n")
        return str(src)
    return make


# ------------------------------------------------------------------------ requires_cap marker

def _cap_number_and_name(cap) -> tuple[int, str]:
    """(number, name) of a capability given as a Cap member, a name, or a number."""
    if isinstance(cap, str):
        name = cap.removeprefix("KVM_CAP_")
        try:
            from pyvmm import Cap
            return int(Cap[name]), name
        except (ImportError, KeyError) as e:
            raise pytest.UsageError(f"requires_cap: unknown capability {cap!r}") from e
    if isinstance(cap, int):
        name = str(getattr(cap, "name", ""))
        if not name:
            try:
                from pyvmm import Cap
                name = Cap(cap).name
            except (ImportError, ValueError):
                name = f"CAP_{int(cap)}"
        return int(cap), name
    raise pytest.UsageError(f"requires_cap: a capability is a Cap, a name or a number, "
                            f"not {cap!r}")


class _CapProbe:
    """KVM_CHECK_EXTENSION results for the session, each asked once."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, bool], int] = {}
        self.error: OSError | None = None

    def value(self, number: int, on_vm: bool) -> int:
        key = (number, on_vm)
        if key not in self.values:
            if self.error is not None:
                raise self.error
            try:
                self.values[key] = hostinfo.probe_caps({"c": number}, vm=on_vm)["c"]
            except OSError as e:
                if not on_vm:
                    self.error = e
                raise
        return self.values[key]


_probe_key = pytest.StashKey[_CapProbe]()
_results_key = pytest.StashKey["_Results"]()


class _Results:
    """Per-test outcomes gathered from reports (so it also works under pytest-xdist)."""

    def __init__(self) -> None:
        self.outcome: dict[str, str] = {}                 # nodeid -> passed/failed/skipped
        self.skip_reason: dict[str, str] = {}
        self.cap_skips: dict[str, list[str]] = {}         # nodeid -> capability names

    def add(self, report) -> None:
        nodeid = report.nodeid
        if report.failed:
            self.outcome[nodeid] = "failed"
        elif report.skipped:
            if self.outcome.get(nodeid) != "failed":
                self.outcome[nodeid] = "skipped"
                self.skip_reason[nodeid] = _skip_reason(report)
            for key, value in getattr(report, "user_properties", ()):
                if key == CAP_SKIP_PROPERTY:
                    self.cap_skips[nodeid] = list(value)
        elif report.when == "call" and self.outcome.get(nodeid) != "failed":
            self.outcome[nodeid] = "passed"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    return str(longrepr)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_cap(*caps, vm=False, min=1): skip unless this host's KVM has the "
        "capabilities (pyvmm.Cap members, names or numbers); the test also becomes stock_kvm")
    config.addinivalue_line(
        "markers",
        "stock_kvm: needs a capability only stock KVM has (SMM, userspace hypercalls); "
        "runs in the nested runner")
    config.stash[_probe_key] = _CapProbe()
    config.stash[_results_key] = _Results()
    config.pluginmanager.register(_Reporter(config), "pyvmm-reporter")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    # Before the mark plugin applies -m: a requires_cap test is part of the stock_kvm selection.
    for item in items:
        if item.get_closest_marker("requires_cap") and not item.get_closest_marker("stock_kvm"):
            item.add_marker(pytest.mark.stock_kvm)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    markers = list(item.iter_markers("requires_cap"))
    if not markers:
        return
    probe = item.config.stash[_probe_key]
    missing = []
    for marker in markers:
        on_vm = bool(marker.kwargs.get("vm", False))
        minimum = int(marker.kwargs.get("min", 1))
        for cap in marker.args:
            number, name = _cap_number_and_name(cap)
            error: str | None = None
            try:
                value = probe.value(number, on_vm)
            except OSError as e:
                value, error = 0, f"/dev/kvm unavailable: {e.strerror or e}"
            if error is not None:
                _no_kvm(error)
            if value < minimum and name not in missing:
                missing.append(name)
    if missing:
        item.user_properties.append((CAP_SKIP_PROPERTY, missing))
        where = hostinfo.kvm_module() or "this host's KVM"
        reason = f"pyvmm: missing KVM capability {', '.join(missing)} on {where}"
        try:  # report the test's own location, as skip/skipif markers do
            exc = pytest.skip.Exception(reason, _use_item_location=True)
        except TypeError:
            exc = pytest.skip.Exception(reason)
        raise exc


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")   # a pytest-xdist worker: the controller reports


class _Reporter:
    """Registered per session: collects outcomes, writes the JSON files and the summary line."""

    def __init__(self, config) -> None:
        self.config = config
        self.results = config.stash[_results_key]

    def pytest_runtest_logreport(self, report) -> None:
        self.results.add(report)

    def pytest_sessionfinish(self, session) -> None:
        if _is_worker(self.config):
            return
        results = self.results
        kvm = hostinfo.describe_host()
        path = os.environ.get(CAP_SKIPS_ENV)
        if path:
            _write_json(path, {"format": CAP_SKIPS_FORMAT, "kvm": kvm,
                               "skipped": dict(sorted(results.cap_skips.items()))})
        path = os.environ.get(PASSED_ENV)
        if path:
            by = collections.defaultdict(list)
            for nodeid, outcome in results.outcome.items():
                by[outcome].append(nodeid)
            _write_json(path, {
                "format": OUTCOMES_FORMAT, "kvm": kvm,
                "passed": sorted(by["passed"]), "failed": sorted(by["failed"]),
                "skipped": {n: results.skip_reason.get(n, "") for n in sorted(by["skipped"])},
                "cap_skips": dict(sorted(results.cap_skips.items()))})

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if _is_worker(self.config):
            return
        terminalreporter.write_line(
            f"pyvmm: tests ran on {hostinfo.describe_host()}; "
            f"{cap_skip_summary(self.results.cap_skips)}")


def _write_json(path: str, data: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, p)


def cap_skip_summary(cap_skips: dict[str, list[str]]) -> str:
    """"3 tests skipped for a missing KVM capability: X86_SMM 2, EXIT_HYPERCALL 1"."""
    if not cap_skips:
        return "no test skipped for a missing KVM capability"
    counts = collections.Counter(name for names in cap_skips.values() for name in names)
    detail = ", ".join(f"{name} {n}" for name, n in counts.most_common())
    s = "" if len(cap_skips) == 1 else "s"
    return f"{len(cap_skips)} test{s} skipped for a missing KVM capability: {detail}"

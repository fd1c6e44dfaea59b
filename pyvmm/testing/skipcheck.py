# SPDX-License-Identifier: GPL-2.0-or-later
"""CI's skip check: every test skipped on this host for a missing KVM capability must have
passed on the stock KVM of the nested runner, except tests of capabilities that the nested
runner's kernel is too old to have (listed here by name, so a broken runner that loses, say,
SMM still fails the check)."""

from __future__ import annotations

import json
import os

__all__ = ["NEWER_THAN_NESTED", "check_skips", "load_json"]

# Capabilities newer than the nested runner's Debian 6.1 kernel (guest_memfd came in 6.8):
# a test skipped for one of these on both kernels ran nowhere, and is named as such.
NEWER_THAN_NESTED = frozenset({"GUEST_MEMFD", "GUEST_MEMFD_FLAGS", "MEMORY_ATTRIBUTES"})


def load_json(path: str | os.PathLike) -> dict:
    """The JSON document at `path`."""
    with open(path) as f:
        return json.load(f)


def check_skips(local: dict, nested: dict) -> tuple[bool, list[str]]:
    """Did every test skipped locally for a missing capability run and pass in the nested run?

    ``local`` is what the plugin wrote to $PYVMM_CAP_SKIPS on the host, ``nested`` what it wrote
    to $PYVMM_PASSED inside the nested runner. A test skipped in both only for capabilities in
    NEWER_THAN_NESTED is reported as run nowhere, not as a failure. Returns (ok, report lines).
    """
    skipped: dict[str, list[str]] = local.get("skipped", {})
    passed = set(nested.get("passed", []))
    failed = set(nested.get("failed", []))
    nested_skipped: dict[str, str] = nested.get("skipped", {})
    lines = []
    bad = nowhere = 0
    for nodeid in sorted(skipped):
        caps = ",".join(skipped[nodeid])
        if nodeid in passed:
            continue
        if nodeid in nested_skipped and set(skipped[nodeid]) <= NEWER_THAN_NESTED:
            nowhere += 1
            lines.append(f"ran on neither KVM: {nodeid} (needs {caps}, newer than the nested "
                         f"runner's kernel)")
            continue
        bad += 1
        if nodeid in failed:
            lines.append(f"FAILED in the nested run: {nodeid} (skipped locally for {caps})")
        elif nodeid in nested_skipped:
            lines.append(f"SKIPPED in the nested run too: {nodeid} ({nested_skipped[nodeid]})")
        else:
            lines.append(f"NOT RUN in the nested run: {nodeid} (skipped locally for {caps})")
    where = nested.get("kvm", "the nested run")
    ran = len(skipped) - bad - nowhere
    lines.append(f"pyvmm nested: {ran} of {len(skipped)} tests skipped locally for a capability "
                 f"passed on {where}" + (f"; {nowhere} ran on neither KVM" if nowhere else "")
                 + ("" if not bad else f"; {bad} did not"))
    return bad == 0, lines

# SPDX-License-Identifier: GPL-2.0-or-later
"""Several vCPUs in one run: one thread each, each in its own run loop on its own fd, and the
rule that says which vCPU's outcome is the run's."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from .runloop import Outcome, RunControl, Stop

__all__ = ["merge", "run_threads"]

#: Outcomes that end only their own vCPU (DONE), or that come from the control itself.
_QUIET = (Stop.DONE, Stop.TIMEOUT, Stop.STOPPED, Stop.CLOSED)


def run_threads(vcpus: Sequence[Any], control: RunControl,
                run_one: Callable[[Any], Outcome]) -> Outcome:
    """`run_one(vcpu)` in one thread per vCPU. A vCPU's DONE ends only that vCPU; the first
    failure (in time) stops the others through `control` and is the run's outcome. Every
    thread is joined before this returns, also when this thread is interrupted."""
    outcomes: dict[int, Outcome] = {}
    first: list[Outcome] = []

    def body(vcpu: Any) -> None:
        outcome = Outcome(Stop.ERROR, vcpu=vcpu.id)
        try:
            outcome = run_one(vcpu)
        finally:
            outcomes[vcpu.id] = outcome
            # The first to set the reason failed first; the others ended because of it.
            if outcome.stop not in _QUIET and control.stop(outcome.stop, status=outcome.status):
                first.append(outcome)

    threads = [threading.Thread(target=body, args=(v,), name=f"pyvmm-vcpu{v.id}")
               for v in vcpus]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:
        # Interrupted (KeyboardInterrupt): end every vCPU thread before going on.
        control.stop(Stop.STOPPED)
        for t in threads:
            if t.ident is not None:
                t.join()
        raise
    return merge(first[0] if first else None, outcomes)


def merge(first: Outcome | None, outcomes: dict[int, Outcome]) -> Outcome:
    """The run's outcome: the first failure in time when there was one, else the first
    non-"done" outcome by vCPU id, else done (with the first non-zero status, if a vCPU
    finished with one)."""
    if first is not None:
        return first
    ordered = [outcomes[i] for i in sorted(outcomes)]
    for outcome in ordered:
        if outcome.stop != Stop.DONE:
            return outcome
    return next((o for o in ordered if o.status), ordered[0])

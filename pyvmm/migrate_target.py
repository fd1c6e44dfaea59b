# SPDX-License-Identifier: GPL-2.0-or-later
"""The target process of a migration: `python -m pyvmm.migrate_target FD` receives a machine
over the connected stream socket FD (inherited from the source's process), runs it to the end
and prints one JSON line: {"stop", "status", "reports": [[tag, value64, rcx], ...],
"console", "rounds", "bytes", "seconds" (receiving), "run_seconds"}; or {"error": why} and exit status 1."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from .migwire import MigrationError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Receive, run, print the outcome; 0 when the guest ran to its end."""
    parser = argparse.ArgumentParser(prog="python -m pyvmm.migrate_target")
    parser.add_argument("fd", type=int, help="a connected stream socket's fd")
    parser.add_argument("--run-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="the longest wait on the source")
    args = parser.parse_args(argv)
    from .migsocket import receive

    with socket.socket(fileno=args.fd) as sock:
        try:
            incoming = receive(sock, timeout=args.timeout)
        except MigrationError as err:
            print(json.dumps({"error": str(err)}), flush=True)
            return 1
    with incoming.machine as machine:
        start = time.perf_counter()
        done = machine.run(timeout=args.run_timeout)
        ran = time.perf_counter() - start
    print(json.dumps({"stop": str(done.stop), "status": done.status,
                      "reports": [[r.tag, r.value64, r.rcx] for r in done.reports],
                      "console": done.console, "rounds": incoming.rounds,
                      "bytes": incoming.bytes_received, "seconds": incoming.seconds,
                      "run_seconds": ran}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

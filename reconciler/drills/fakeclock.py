"""Run a ``reconciler`` command on a host whose wall clock is off: the drills' fake clock.

``python -m reconciler.drills.fakeclock ARGS...`` is ``reconciler ARGS...`` with
``time.time`` and ``time.time_ns`` moved by ``RECONCILER_DRILL_CLOCK_OFFSET_MS``
(positive: the host runs ahead). They are replaced before anything of reconciler is
imported, so every wall-clock reading the process makes through them (the sidecar's
heartbeat ages, the verification watermark, the gate's lag in seconds) sees the
skewed host. ``time.monotonic`` is left alone (a skewed wall clock does not make
intervals longer) and so are ``datetime.now`` and the C libraries (libpq, librdkafka),
which read the system clock themselves: audit timestamps only, never a judgement.
"""

from __future__ import annotations

import os
import sys
import time

OFFSET_ENV = "RECONCILER_DRILL_CLOCK_OFFSET_MS"


def install(offset_ms: int) -> None:
    real_time, real_time_ns = time.time, time.time_ns

    def skewed_time() -> float:
        return real_time() + offset_ms / 1000

    def skewed_time_ns() -> int:
        return real_time_ns() + offset_ms * 1_000_000

    time.time = skewed_time
    time.time_ns = skewed_time_ns


def main() -> None:
    install(int(os.environ.get(OFFSET_ENV, "0")))
    from reconciler.cli import main as cli

    sys.argv = ["reconciler", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()

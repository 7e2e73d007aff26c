"""The drills' fake host clock: a reconciler process whose wall clock is off."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from reconciler.drills.fakeclock import OFFSET_ENV


def test_the_offset_moves_time_and_time_ns_but_not_monotonic() -> None:
    code = ("import time, sys; from reconciler.drills import fakeclock; m = time.monotonic(); "
            "fakeclock.install(-3_600_000); print(time.time(), time.time_ns(), time.monotonic() - m)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    now = time.time()
    assert abs(float(out[0]) - (now - 3600)) < 30
    assert abs(int(out[1]) / 1e9 - (now - 3600)) < 30
    assert float(out[2]) < 30  # intervals are not stretched


def test_the_launcher_runs_the_cli_with_the_offset_from_the_environment() -> None:
    done = subprocess.run([sys.executable, "-m", "reconciler.drills.fakeclock", "--help"], capture_output=True,
                          text=True, check=False, env={**os.environ, OFFSET_ENV: "120000"})
    assert done.returncode == 0 and "recover" in done.stdout

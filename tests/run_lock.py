"""One pycrio test run per machine at a time.

The host-wide names the pod tests use (bridges, subnets, cgroup parents, iptables chains) are
fixed per test module, not per run, so two runs side by side would see each other's interfaces
and fail on them. The first run holds an flock on RUN_LOCK; a second one waits for it, saying
which process it waits for, and gives up after `wait_s` with a clear error.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import IO

RUN_LOCK = Path("/run/lock/pycrio-tests.lock")
WAIT_ENV = "PYCRIO_TEST_LOCK_WAIT"  # seconds a second run waits for the first (default 3600)


class RunLockBusy(RuntimeError):
    """Another test run held the lock for the whole wait."""


def holder(path: Path) -> str:
    """What the lock file says of its holder ("pid N, <argv>"), or "unknown"."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def acquire_run_lock(path: Path = RUN_LOCK, wait_s: float | None = None, poll_s: float = 0.5) -> IO[str]:
    """The open, locked lock file (keep it open for the run); waits up to `wait_s` for a holder."""
    if wait_s is None:
        wait_s = float(os.environ.get(WAIT_ENV, "3600"))
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.close()
                raise RunLockBusy(f"{path}: another pycrio test run holds it ({holder(path)}); waited {wait_s:.0f}s")
            if not told:
                print(f"waiting for another pycrio test run ({holder(path)}) to finish: it holds {path}",
                      file=sys.stderr, flush=True)  # fmt: skip
                told = True
            time.sleep(poll_s)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}, {' '.join(sys.argv)[:200]}\n")
    lock.flush()
    return lock

"""Two pycrio test runs on one machine: the second waits for the first, naming it, or gives up clearly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run_lock import RunLockBusy, acquire_run_lock

REPO = Path(__file__).resolve().parent.parent
HOLD = (
    "import sys, time; sys.path.insert(0, {repo!r}); from tests.run_lock import acquire_run_lock; "
    "lock = acquire_run_lock(__import__('pathlib').Path({path!r}), wait_s=5); print('held', flush=True); "
    "time.sleep({hold})"
)


def hold_in_child(path: Path, hold_s: float) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), path=str(path), hold=hold_s)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_gives_up_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "tests.lock"
    child = hold_in_child(path, 30)
    try:
        with pytest.raises(RunLockBusy, match=rf"another pycrio test run holds it \(pid {child.pid}, "):
            acquire_run_lock(path, wait_s=0.3, poll_s=0.05)
    finally:
        child.kill()
        child.wait()


def test_a_second_run_waits_for_the_first_and_then_runs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tests.lock"
    child = hold_in_child(path, 1.0)
    try:
        started = time.monotonic()
        lock = acquire_run_lock(path, wait_s=30, poll_s=0.05)
        waited = time.monotonic() - started
    finally:
        child.kill()
        child.wait()
    try:
        assert waited > 0.3  # it did wait for the holder
        assert f"waiting for another pycrio test run (pid {child.pid}, " in capfd.readouterr().err
        assert path.read_text().startswith(f"pid {__import__('os').getpid()}, ")  # the new holder says so
    finally:
        lock.close()


def test_the_lock_is_free_again_when_its_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "tests.lock"
    child = hold_in_child(path, 30)
    child.kill()
    child.wait()
    acquire_run_lock(path, wait_s=0).close()  # a killed run leaves no lock behind (flock dies with the process)


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="the run takes the machine's lock as root only")
def test_this_run_holds_the_machine_lock() -> None:
    probe = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.run_lock import RUN_LOCK, acquire_run_lock; "
             "acquire_run_lock(RUN_LOCK, wait_s=0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert f"another pycrio test run holds it (pid {__import__('os').getpid()}, " in done.stderr

"""Process identity from /proc: a pid is only the process it was if its start time (field 22 of
/proc/<pid>/stat, clock ticks since boot) is the one seen when it was stored."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)" (state, ppid, ...; [19] is the start
    time), or None when there is no such process."""
    if pid <= 0:
        return None
    try:
        # os-level calls: 8 µs instead of Path.read_text's 28 (ListPodSandbox checks every infra)
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return stat[stat.rfind(")") + 2 :].split()  # comm may hold anything, ")" included


def process_start_time(pid: int) -> int:
    """Start time of a live (not zombie) process, in clock ticks since boot; 0 when there is
    no such process."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return 0
    return int(fields[19])


def same_process(pid: int, start_time: int) -> bool:
    """Whether `pid` is alive and still the process whose start time was `start_time`."""
    return start_time > 0 and process_start_time(pid) == start_time


def all_pids() -> list[int]:
    """Every pid in the process table right now."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def argv(pid: int) -> list[bytes]:
    """The command line of `pid` as its arguments; [] when it is gone (or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    if not raw:
        return []
    return raw.removesuffix(b"\0").split(b"\0")  # each argument ends in a NUL

"""Cgroups for the cgroupfs driver: mode detection, paths, stats and removal, v1 and v2 alike.

Paths handed around are cgroup paths ("/pycrio/<pod>/pycrio-<ctr>"), as runc's `linux.cgroupsPath`
takes them; where they live on disk depends on the mode. On a hybrid host the v1 controllers do the
work (that is what runc uses there), the v2 mount only carries what v1 does not.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP2_SUPER_MAGIC = 0x63677270
DEFAULT_PARENT = "/pycrio"
CONTAINER_PREFIX = "pycrio-"
RMDIR_ATTEMPTS = 3
RMDIR_BACKOFF_S = 0.05
V1_CONTROLLERS = frozenset(
    "cpu cpuacct cpuset memory devices freezer net_cls net_prio blkio perf_event hugetlb pids rdma misc".split()
)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_libc = ctypes.CDLL(None, use_errno=True)


def _fs_type(path: Path) -> int | None:
    """statfs(2) f_type of `path`, or None if it cannot be read."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every 64-bit ABI
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type is the first member


def cgroup_mode(root: Path = CGROUP_ROOT) -> str:
    """The host's cgroup layout: "v2" (unified), "hybrid" (v1 plus a cgroup2 mount at `unified`) or "v1"."""
    if _fs_type(root) == CGROUP2_SUPER_MAGIC:
        return "v2"
    if _fs_type(root / "unified") == CGROUP2_SUPER_MAGIC:
        return "hybrid"
    return "v1"


def hybrid_with_v2_controllers(root: Path = CGROUP_ROOT) -> bool:
    """Hybrid layout whose cgroup2 tree has controllers enabled: the one crun refuses to run on."""
    if cgroup_mode(root) != "hybrid":
        return False
    try:
        return bool((root / "unified" / "cgroup.controllers").read_text().split())
    except OSError:
        return False


def _v1_mounts(mountinfo: str | None = None) -> dict[str, Path]:
    """Controller (or `name=...`) -> mount point of every cgroup v1 hierarchy."""
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    result: dict[str, Path] = {}
    for line in text.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        after = fields[1].split()
        if len(after) < 3 or after[0] != "cgroup":
            continue
        mount_point = Path(unescape_mountinfo(fields[0].split()[4]))
        for option in after[2].split(","):
            if option in V1_CONTROLLERS or option.startswith("name="):
                result.setdefault(option, mount_point)
    return result


def unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space...)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


@functools.lru_cache(maxsize=1)
def _host_v1_mounts() -> dict[str, Path]:
    """This host's v1 hierarchies, read once: stats polling must not reparse mountinfo each time."""
    return _v1_mounts()


def _hierarchies(mode: str) -> list[Path]:
    """Every mount point under which a cgroup path may exist."""
    if mode == "v2":
        return [CGROUP_ROOT]
    roots = list(dict.fromkeys(_host_v1_mounts().values()))
    if mode == "hybrid":
        roots.append(CGROUP_ROOT / "unified")
    return roots


@dataclass(frozen=True)
class CgroupSupport:
    """What the host's cgroups can enforce; decides which resources a spec may carry."""

    mode: str  # "v1" | "hybrid" | "v2"
    memory_swap: bool
    hugetlb: bool
    pids: bool


@functools.lru_cache(maxsize=1)
def detect_support() -> CgroupSupport:
    """Probe this host once (cached)."""
    mode = cgroup_mode()
    if mode == "v2":
        controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
        return CgroupSupport(mode, _v2_has_swap(), "hugetlb" in controllers, "pids" in controllers)
    mounts = _host_v1_mounts()
    memory = mounts.get("memory")
    swap = memory is not None and (memory / "memory.memsw.limit_in_bytes").exists()
    return CgroupSupport(mode, swap, "hugetlb" in mounts, "pids" in mounts)


def _v2_has_swap() -> bool:
    """memory.swap.max exists in non-root cgroups only: look at our own cgroup and its parents."""
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:]
    path = CGROUP_ROOT / own.lstrip("/")
    while path != CGROUP_ROOT and CGROUP_ROOT in path.parents:
        if (path / "memory.swap.max").exists():
            return True
        path = path.parent
    return False


def cgroups_path(cgroup_parent: str, pod_id: str, container_id: str | None) -> str:
    """The cgroupfs path of a pod (`container_id` None) or of one of its containers; always absolute."""
    parent = cgroup_parent.strip() or f"{DEFAULT_PARENT}/{pod_id}"
    parent = "/" + parent.strip("/")
    if ".." in parent.split("/"):
        raise ValueError(f"cgroup parent {cgroup_parent!r} escapes the cgroup root")
    if container_id is None:
        return parent
    return f"{parent.rstrip('/')}/{CONTAINER_PREFIX}{container_id}"


@dataclass
class CgroupStats:
    """A cgroup's counters, in the units CRI reports."""

    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    memory_rss_bytes: int
    oom_kills: int
    pids: int


def read_stats(path: str, mode: str | None = None) -> CgroupStats | None:
    """Counters of cgroup `path`, or None when the cgroup no longer exists."""
    mode = mode or detect_support().mode
    return _read_v2(CGROUP_ROOT / path.lstrip("/")) if mode == "v2" else _read_v1(path)


def controller_dirs(path: str, mode: str | None = None) -> dict[str, Path]:
    """The directories of cgroup `path`: per v1 controller name, or {"unified": dir} on v2."""
    if (mode or detect_support().mode) == "v2":
        return {"unified": CGROUP_ROOT / path.lstrip("/")}
    return {
        name: mount / path.lstrip("/") for name, mount in _host_v1_mounts().items() if not name.startswith("name=")
    }


def _read_v1(path: str) -> CgroupStats | None:
    mounts = _host_v1_mounts()
    dirs = {name: mounts[name] / path.lstrip("/") for name in ("cpuacct", "memory", "pids") if name in mounts}
    if not any(d.is_dir() for d in dirs.values()):
        return None
    memory = dirs.get("memory")
    usage = read_int(memory / "memory.usage_in_bytes") if memory else 0
    stat = read_keyed(memory / "memory.stat") if memory else {}
    oom = read_keyed(memory / "memory.oom_control") if memory else {}
    return CgroupStats(
        cpu_usage_ns=read_int(dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in dirs else 0,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(0, usage - stat.get("total_inactive_file", 0)),
        memory_rss_bytes=stat.get("total_rss", 0),
        oom_kills=oom.get("oom_kill", 0),
        pids=read_int(dirs["pids"] / "pids.current") if "pids" in dirs else 0,
    )


def _read_v2(directory: Path) -> CgroupStats | None:
    if not directory.is_dir():
        return None
    usage = read_int(directory / "memory.current")
    stat = read_keyed(directory / "memory.stat")
    return CgroupStats(
        cpu_usage_ns=read_keyed(directory / "cpu.stat").get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(0, usage - stat.get("inactive_file", 0)),
        memory_rss_bytes=stat.get("anon", 0),
        oom_kills=read_keyed(directory / "memory.events").get("oom_kill", 0),
        pids=read_int(directory / "pids.current"),
    )


def read_int(file: Path) -> int:
    """The integer in a one-value cgroup file; 0 when missing or "max"."""
    try:
        return int(file.read_text().strip())
    except (OSError, ValueError):
        return 0


def read_keyed(file: Path) -> dict[str, int]:
    """A flat-keyed cgroup file ("key value" per line); empty when missing."""
    try:
        text = file.read_text()
    except OSError:
        return {}
    result: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result


def remove_cgroup(path: str, mode: str | None = None) -> None:
    """Remove cgroup `path` (and any child cgroups) from every hierarchy; idempotent.

    A cgroup whose last process is still exiting reports EBUSY for a moment: retried briefly, then
    the OSError is raised (something still runs in it).
    """
    relative = path.strip("/")
    if not relative or ".." in relative.split("/"):
        raise ValueError(f"refusing to remove cgroup {path!r}")
    for root in _hierarchies(mode or detect_support().mode):
        _remove_tree(root / relative)


def _remove_tree(directory: Path) -> None:
    """rmdir the cgroup directory bottom-up (cgroupfs only lets empty cgroups go, files included)."""
    try:
        children = [entry for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for child in children:
        _remove_tree(Path(child.path))
    for attempt in range(RMDIR_ATTEMPTS):
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == RMDIR_ATTEMPTS - 1:
                raise
            time.sleep(RMDIR_BACKOFF_S * (attempt + 1))

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


# A limit at or above this is "unlimited" (v1 reports PAGE_COUNTER_MAX in bytes, rounded to pages).
UNLIMITED = 1 << 62


@dataclass
class CgroupStats:
    """A cgroup's counters, in the units CRI reports."""

    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    memory_rss_bytes: int
    oom_kills: int
    pids: int
    memory_limit_bytes: int | None = None  # None: unlimited
    page_faults: int = 0
    major_page_faults: int = 0
    swap_usage_bytes: int | None = None  # None: swap is not accounted here
    swap_limit_bytes: int | None = None  # None: unlimited (or not accounted)


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


def _limit(value: int | None) -> int | None:
    """A limit as read, or None when it means "unlimited" (or could not be read)."""
    return None if value is None or value >= UNLIMITED else value


def _read_v1(path: str) -> CgroupStats | None:
    mounts = _host_v1_mounts()
    dirs = {name: mounts[name] / path.lstrip("/") for name in ("cpuacct", "memory", "pids") if name in mounts}
    if not any(d.is_dir() for d in dirs.values()):
        return None
    memory = dirs.get("memory")
    usage = read_int(memory / "memory.usage_in_bytes") if memory else 0
    stat = read_keyed(memory / "memory.stat") if memory else {}
    oom = read_keyed(memory / "memory.oom_control") if memory else {}
    limit = _limit(read_optional_int(memory / "memory.limit_in_bytes")) if memory else None
    swap_usage = swap_limit = None
    memsw_usage = read_optional_int(memory / "memory.memsw.usage_in_bytes") if memory else None
    if memory is not None and memsw_usage is not None:  # memsw counts memory + swap
        swap_usage = max(0, memsw_usage - usage)
        memsw_limit = _limit(read_optional_int(memory / "memory.memsw.limit_in_bytes"))
        if memsw_limit is not None:
            swap_limit = max(0, memsw_limit - (limit or 0))
    return CgroupStats(
        cpu_usage_ns=read_int(dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in dirs else 0,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(0, usage - stat.get("total_inactive_file", 0)),
        memory_rss_bytes=stat.get("total_rss", 0),
        oom_kills=oom.get("oom_kill", 0),
        pids=read_int(dirs["pids"] / "pids.current") if "pids" in dirs else 0,
        memory_limit_bytes=limit,
        page_faults=stat.get("total_pgfault", 0),
        major_page_faults=stat.get("total_pgmajfault", 0),
        swap_usage_bytes=swap_usage,
        swap_limit_bytes=swap_limit,
    )


def _read_v2(directory: Path) -> CgroupStats | None:
    if not directory.is_dir():
        return None
    usage = read_int(directory / "memory.current")
    stat = read_keyed(directory / "memory.stat")
    swap_usage = read_optional_int(directory / "memory.swap.current")
    return CgroupStats(
        cpu_usage_ns=read_keyed(directory / "cpu.stat").get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(0, usage - stat.get("inactive_file", 0)),
        memory_rss_bytes=stat.get("anon", 0),
        oom_kills=read_keyed(directory / "memory.events").get("oom_kill", 0),
        pids=read_int(directory / "pids.current"),
        memory_limit_bytes=_limit(read_optional_int(directory / "memory.max")),
        page_faults=stat.get("pgfault", 0),
        major_page_faults=stat.get("pgmajfault", 0),
        swap_usage_bytes=swap_usage,
        swap_limit_bytes=_limit(read_optional_int(directory / "memory.swap.max")) if swap_usage is not None else None,
    )


def read_int(file: Path) -> int:
    """The integer in a one-value cgroup file; 0 when missing or "max"."""
    try:
        return int(file.read_text().strip())
    except (OSError, ValueError):
        return 0


def read_optional_int(file: Path) -> int | None:
    """The integer in a one-value cgroup file; None when missing or unreadable, UNLIMITED for "max"."""
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


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


# --- writing limits (a pod cgroup pycrio made: runc only ever writes its containers' cgroups) ---


class CgroupWriteError(OSError):
    """The kernel refused a value: `file` and `value` say which; errno as the write gave it."""

    def __init__(self, err: int, file: Path, value: str) -> None:
        super().__init__(err, f"writing {value!r} to {file}: {os.strerror(err)}")
        self.file = file
        self.value = value


class _Journal:
    """Writes cgroup files, remembering each file's old value so a failed update can be undone."""

    def __init__(self) -> None:
        self.done: list[tuple[Path, str]] = []

    def write(self, file: Path, value: str | int) -> None:
        text = str(value)
        try:
            old = file.read_text().strip()
        except OSError as exc:
            raise CgroupWriteError(exc.errno or errno.EIO, file, text) from exc
        try:
            file.write_text(text)
        except OSError as exc:
            raise CgroupWriteError(exc.errno or errno.EIO, file, text) from exc
        self.done.append((file, old))

    def undo(self) -> None:
        for file, old in reversed(self.done):
            try:
                file.write_text(old)
            except OSError:
                pass  # best effort: the error that made us undo is the one reported
        self.done.clear()


def set_resources(path: str, resources: dict, mode: str | None = None, followers: tuple[str, ...] = ()) -> None:
    """Write OCI `linux.resources` (cpu, memory, hugepageLimits; unified on v2) to cgroup `path`,
    creating it where it is missing, in the order runc uses for a container's update. All or
    nothing: when the kernel refuses a value (CgroupWriteError), what was written is put back.
    `followers`: cgroups below `path` that take its cpuset too (a pod's infra process: on v1 a
    child's cpuset must stay inside its parent's, so they are narrowed first, widened after)."""
    mode = mode or detect_support().mode
    relative = path.strip("/")
    if not relative or ".." in relative.split("/"):
        raise ValueError(f"refusing to write cgroup {path!r}")
    journal = _Journal()
    try:
        if mode == "v2":
            _set_v2(relative, resources, journal)
        else:
            _set_v1(relative, resources, journal, [f.strip("/") for f in followers])
    except BaseException:
        journal.undo()
        raise


def _v1_dir(controller: str, relative: str) -> Path | None:
    """The cgroup's directory in a v1 hierarchy, made if missing (cpuset ones get their parent's
    cpus and mems, or no task could join them); None if this host lacks the controller."""
    mount = _host_v1_mounts().get(controller)
    if mount is None:
        return None
    directory = mount / relative
    if not directory.is_dir():
        made = [p for p in [directory, *directory.parents] if mount in p.parents and not p.is_dir()]
        directory.mkdir(parents=True, exist_ok=True)
        if controller == "cpuset":
            for new in reversed(made):  # top-down: each copies from a parent that has values
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if not (new / name).read_text().strip():
                        (new / name).write_text((new.parent / name).read_text().strip())
    return directory


def _set_v1(relative: str, resources: dict, journal: _Journal, followers: list[str]) -> None:
    cpu = resources.get("cpu") or {}
    memory = resources.get("memory") or {}
    if cpu.get("cpus") or cpu.get("mems"):
        directory = _v1_dir("cpuset", relative)
        if directory is not None:
            below = [directory.parent / Path(f).relative_to(Path(relative).parent) for f in followers]
            below = [d for d in below if d.is_dir()]
            for name, key in (("cpuset.mems", "mems"), ("cpuset.cpus", "cpus")):
                if cpu.get(key):
                    _set_v1_cpuset(directory, below, name, str(cpu[key]), journal)
    if any(cpu.get(k) for k in ("shares", "quota", "period")):
        directory = _v1_dir("cpu", relative)
        if directory is not None:
            if cpu.get("shares"):
                journal.write(directory / "cpu.shares", cpu["shares"])
            _set_v1_bandwidth(directory, cpu.get("period") or 0, cpu.get("quota") or 0, journal)
    if memory.get("limit") or memory.get("swap"):
        directory = _v1_dir("memory", relative)
        if directory is not None:
            _set_v1_memory(directory, memory.get("limit") or 0, memory.get("swap") or 0, journal)
    for hugepage in resources.get("hugepageLimits") or []:
        directory = _v1_dir("hugetlb", relative)
        if directory is not None:
            journal.write(directory / f"hugetlb.{hugepage['pageSize']}.limit_in_bytes", hugepage["limit"])


def _set_v1_cpuset(directory: Path, below: list[Path], name: str, value: str, journal: _Journal) -> None:
    """Widening: the cgroup, then those below it; narrowing (EBUSY while a child's set is wider):
    those below first."""
    try:
        journal.write(directory / name, value)
    except CgroupWriteError as exc:
        if exc.errno != errno.EBUSY or not below:
            raise
        for child in below:
            journal.write(child / name, value)
        journal.write(directory / name, value)
        return
    for child in below:
        journal.write(child / name, value)


def _set_v1_bandwidth(directory: Path, period: int, quota: int, journal: _Journal) -> None:
    """runc's order: the period first, and again after the quota if the kernel refused it before
    (a new period can break the quota/period ratio the hierarchy allows until the quota follows)."""
    retry_period = False
    if period:
        try:
            journal.write(directory / "cpu.cfs_period_us", period)
        except CgroupWriteError as exc:
            if exc.errno != errno.EINVAL or not quota:
                raise
            retry_period = True
    if quota:
        journal.write(directory / "cpu.cfs_quota_us", -1 if quota < 0 else quota)
    if retry_period:
        journal.write(directory / "cpu.cfs_period_us", period)


def _set_v1_memory(directory: Path, limit: int, swap: int, journal: _Journal) -> None:
    """memory.memsw (memory + swap) can never be below memory.limit: growing writes memsw first,
    shrinking the limit first (runc's order)."""
    memsw = directory / "memory.memsw.limit_in_bytes"
    if limit < 0 and not swap and memsw.exists():
        swap = -1  # unlimited memory: unlimited swap too
    if limit and swap and memsw.exists():
        current = read_int(directory / "memory.limit_in_bytes")
        if swap < 0 or current < swap:
            journal.write(memsw, swap)
            journal.write(directory / "memory.limit_in_bytes", limit)
            return
    if limit:
        journal.write(directory / "memory.limit_in_bytes", limit)
    if swap and memsw.exists():
        journal.write(memsw, swap)


_V2_CONTROLLERS = frozenset({"cpu", "cpuset", "memory", "hugetlb", "io", "pids"})


def _v2_dir(relative: str, controllers: set[str]) -> Path:
    """The cgroup's directory, made if missing, with `controllers` enabled in each ancestor's
    cgroup.subtree_control on the way down to it (as runc does for a container's)."""
    directory = CGROUP_ROOT / relative
    for parent in [CGROUP_ROOT, *reversed([p for p in directory.parents if CGROUP_ROOT in p.parents])]:
        parent.mkdir(exist_ok=True)
        available = set((parent / "cgroup.controllers").read_text().split())
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        wanted = (controllers & available) - enabled
        if wanted:
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
    directory.mkdir(exist_ok=True)
    return directory


def _set_v2(relative: str, resources: dict, journal: _Journal) -> None:
    cpu = resources.get("cpu") or {}
    memory = resources.get("memory") or {}
    hugepages = resources.get("hugepageLimits") or []
    unified = resources.get("unified") or {}
    wanted = set()
    if cpu.get("cpus") or cpu.get("mems"):
        wanted.add("cpuset")
    if any(cpu.get(k) for k in ("shares", "quota", "period")):
        wanted.add("cpu")
    if memory.get("limit") or memory.get("swap"):
        wanted.add("memory")
    if hugepages:
        wanted.add("hugetlb")
    wanted |= {key.split(".", 1)[0] for key in unified if key.split(".", 1)[0] in _V2_CONTROLLERS}
    if not wanted and not unified:
        return
    directory = _v2_dir(relative, wanted)
    if cpu.get("mems"):
        journal.write(directory / "cpuset.mems", cpu["mems"])
    if cpu.get("cpus"):
        journal.write(directory / "cpuset.cpus", cpu["cpus"])
    if cpu.get("shares"):
        journal.write(directory / "cpu.weight", 1 + ((int(cpu["shares"]) - 2) * 9999) // 262142)
    if cpu.get("quota") or cpu.get("period"):
        current = ((directory / "cpu.max").read_text().split() + ["max", "100000"])[:2]
        quota = cpu.get("quota") or current[0]
        period = cpu.get("period") or current[1]
        journal.write(directory / "cpu.max", f"{'max' if str(quota) == 'max' or int(quota) < 0 else quota} {period}")
    limit, swap = memory.get("limit") or 0, memory.get("swap") or 0
    if limit:
        journal.write(directory / "memory.max", "max" if limit < 0 else limit)
    if swap and (directory / "memory.swap.max").exists():  # OCI swap is memory + swap; v2 counts swap alone
        journal.write(directory / "memory.swap.max", "max" if swap < 0 or limit < 0 else max(0, swap - limit))
    for hugepage in hugepages:
        journal.write(directory / f"hugetlb.{hugepage['pageSize']}.max", hugepage["limit"])
    for key, value in sorted(unified.items()):
        journal.write(directory / key, value)

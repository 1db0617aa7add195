"""Cgroup counters as CRI stats messages (shared by the container and pod sandbox stats calls)."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

from pycrio.cri import api_pb2
from pycrio.disk import disk_usage
from pycrio.oci.cgroups import CgroupStats

NS_PER_S = 1_000_000_000


class CpuRates:
    """`usage_nano_cores` from the cumulative CPU time of successive stats calls, per container or pod.

    Like CRI-O and containerd's fallback: no rate for the first sample of an id (the field stays
    unset, as cAdvisor leaves CpuInst), then (usage - usage before) / (time between). Samples are
    kept at least `min_window_ns` apart, so two callers asking a moment after each other (kubelet's
    ListPodSandboxStats right after a crictl stats) still get a rate over a window of that length
    instead of the noise of a few milliseconds. Ids not sampled for `forget_after_ns` are dropped.
    """

    def __init__(self, min_window_ns: int = NS_PER_S, forget_after_ns: int = 600 * NS_PER_S) -> None:
        self.min_window_ns = min_window_ns
        self.forget_after_ns = forget_after_ns
        self._lock = threading.Lock()
        self._samples: dict[str, deque[tuple[int, int]]] = {}  # id -> up to 2 (monotonic ns, usage ns)
        self._next_sweep = 0

    def rate(self, key: str, usage_ns: int, at_ns: int | None = None) -> int | None:
        """CPU cores x 1e9 used by `key` since an earlier sample, or None without one."""
        at = time.monotonic_ns() if at_ns is None else at_ns
        with self._lock:
            self._sweep(at)
            kept = self._samples.get(key)
            if kept is None:
                self._samples[key] = deque([(at, usage_ns)], maxlen=2)
                return None
            last_at, last_usage = kept[-1]
            if usage_ns < last_usage:  # a counter going back: another cgroup under the same path
                kept.clear()
                kept.append((at, usage_ns))
                return None
            if at - last_at >= self.min_window_ns:
                base_at, base_usage = last_at, last_usage
                kept.append((at, usage_ns))
            else:  # too close to the last sample: measure from the one before it, keep the last
                base_at, base_usage = kept[0]
            if at <= base_at:
                return None
            return int((usage_ns - base_usage) * NS_PER_S / (at - base_at))

    def _sweep(self, now: int) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.forget_after_ns // 10
        stale = [k for k, v in self._samples.items() if now - v[-1][0] > self.forget_after_ns]
        for key in stale:
            del self._samples[key]


CPU_RATES = CpuRates()  # one daemon per process: the rates of its containers and pods


def cpu_usage(stats: CgroupStats, timestamp: int, key: str | None = None) -> api_pb2.CpuUsage:
    """The cumulative CPU time; with `key` (a container or pod id) also the rate since its last sample."""
    usage = api_pb2.CpuUsage(timestamp=timestamp, usage_core_nano_seconds=api_pb2.UInt64Value(value=stats.cpu_usage_ns))
    if key is not None:
        rate = CPU_RATES.rate(key, stats.cpu_usage_ns)
        if rate is not None:
            usage.usage_nano_cores.value = rate
    return usage


def memory_usage(stats: CgroupStats, timestamp: int) -> api_pb2.MemoryUsage:
    """Working set, usage, RSS and page faults; `available_bytes` only under a limit (as cAdvisor)."""
    memory = api_pb2.MemoryUsage(
        timestamp=timestamp,
        working_set_bytes=api_pb2.UInt64Value(value=stats.memory_working_set_bytes),
        usage_bytes=api_pb2.UInt64Value(value=stats.memory_usage_bytes),
        rss_bytes=api_pb2.UInt64Value(value=stats.memory_rss_bytes),
        page_faults=api_pb2.UInt64Value(value=stats.page_faults),
        major_page_faults=api_pb2.UInt64Value(value=stats.major_page_faults),
    )
    if stats.memory_limit_bytes is not None:
        memory.available_bytes.value = max(0, stats.memory_limit_bytes - stats.memory_working_set_bytes)
    return memory


def swap_usage(stats: CgroupStats, timestamp: int) -> api_pb2.SwapUsage | None:
    """Swap in use and, under a swap limit, what is left of it; None where swap is not accounted."""
    if stats.swap_usage_bytes is None:
        return None
    swap = api_pb2.SwapUsage(timestamp=timestamp, swap_usage_bytes=api_pb2.UInt64Value(value=stats.swap_usage_bytes))
    if stats.swap_limit_bytes is not None:
        swap.swap_available_bytes.value = max(0, stats.swap_limit_bytes - stats.swap_usage_bytes)
    return swap


def directory_usage(path: Path, mountpoint: str, timestamp: int) -> api_pb2.FilesystemUsage:
    """Bytes and inodes a directory tree really takes (a container's writable layer)."""
    used, inodes = disk_usage(path, include_root=False)
    return api_pb2.FilesystemUsage(
        timestamp=timestamp,
        fs_id=api_pb2.FilesystemIdentifier(mountpoint=mountpoint),
        used_bytes=api_pb2.UInt64Value(value=used),
        inodes_used=api_pb2.UInt64Value(value=inodes),
    )


def now() -> int:
    return time.time_ns()

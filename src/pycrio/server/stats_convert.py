"""Cgroup counters as CRI stats messages (shared by the container and pod sandbox stats calls)."""

from __future__ import annotations

import time
from pathlib import Path

from pycrio.cri import api_pb2
from pycrio.disk import disk_usage
from pycrio.oci.cgroups import CgroupStats


def cpu_usage(stats: CgroupStats, timestamp: int) -> api_pb2.CpuUsage:
    return api_pb2.CpuUsage(timestamp=timestamp, usage_core_nano_seconds=api_pb2.UInt64Value(value=stats.cpu_usage_ns))


def memory_usage(stats: CgroupStats, timestamp: int) -> api_pb2.MemoryUsage:
    return api_pb2.MemoryUsage(
        timestamp=timestamp,
        working_set_bytes=api_pb2.UInt64Value(value=stats.memory_working_set_bytes),
        usage_bytes=api_pb2.UInt64Value(value=stats.memory_usage_bytes),
        rss_bytes=api_pb2.UInt64Value(value=stats.memory_rss_bytes),
    )


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

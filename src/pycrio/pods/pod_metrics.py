"""Pod and container metrics under cAdvisor's names, for kubelet's CRI metrics (ListMetricDescriptors,
ListPodSandboxMetrics): read from the containers' cgroups, /proc and the pods' network namespaces.

Labels follow containerd's CRI metrics: pod, namespace, container, id, image (container and image
empty on pod-level metrics, whose id is the pod's), plus `interface`, `device`... where cAdvisor has
them. Values are whole numbers (the CRI carries a uint64): seconds are truncated, as containerd does.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pycrio.cri import api_pb2
from pycrio.disk import disk_usage
from pycrio.errors import CRIError
from pycrio.oci import cgroups
from pycrio.pods.containers import ContainerManager
from pycrio.state import ContainerRecord, SandboxRecord, StateStore
from pycrio.state.records import CONTAINER_RUNNING, SANDBOX_READY

log = logging.getLogger("pycrio.pods")

BASE_LABELS = ("pod", "namespace", "container", "id", "image")
COUNTER = api_pb2.COUNTER
GAUGE = api_pb2.GAUGE
NS_PER_S = 1_000_000_000
# A v1 limit at or above this is "unlimited" (the kernel's PAGE_COUNTER_MAX in bytes); reported as 0.
UNLIMITED = 1 << 62
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    kind: int
    extra_labels: tuple[str, ...] = ()


_NET = ("interface",)
_DEV = ("device",)
SPECS: tuple[MetricSpec, ...] = (
    # cpu
    MetricSpec("container_cpu_usage_seconds_total", "Cumulative CPU time consumed in seconds.", COUNTER),
    MetricSpec("container_cpu_user_seconds_total", "Cumulative user CPU time consumed in seconds.", COUNTER),
    MetricSpec("container_cpu_system_seconds_total", "Cumulative system CPU time consumed in seconds.", COUNTER),
    MetricSpec("container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.", COUNTER),
    MetricSpec("container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.", COUNTER),
    MetricSpec("container_cpu_cfs_throttled_seconds_total", "Total time duration the container has been throttled.", COUNTER),
    # memory
    MetricSpec("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when it was accessed.", GAUGE),
    MetricSpec("container_memory_working_set_bytes", "Current working set in bytes (usage minus inactive file cache).", GAUGE),
    MetricSpec("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes.", GAUGE),
    MetricSpec("container_memory_rss", "Size of RSS in bytes (anonymous memory and swap cache).", GAUGE),
    MetricSpec("container_memory_cache", "Number of bytes of page cache memory.", GAUGE),
    MetricSpec("container_memory_mapped_file", "Size of memory mapped files in bytes.", GAUGE),
    MetricSpec("container_memory_swap", "Container swap usage in bytes.", GAUGE),
    MetricSpec("container_memory_kernel_usage", "Size of kernel memory allocated to the container in bytes.", GAUGE),
    MetricSpec("container_memory_failcnt", "Number of times memory usage hit the cgroup v1 limit (0 on cgroup v2).", COUNTER),
    MetricSpec("container_memory_failures_total", "Cumulative count of memory allocation failures.", COUNTER, ("failure_type", "scope")),
    MetricSpec("container_oom_events_total", "Count of out of memory events observed for the container.", COUNTER),
    # disk usage and I/O
    MetricSpec("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.", GAUGE, _DEV),
    MetricSpec("container_fs_limit_bytes", "Number of bytes that can be consumed by the container on this filesystem.", GAUGE, _DEV),
    MetricSpec("container_fs_inodes_total", "Number of inodes on this filesystem.", GAUGE, _DEV),
    MetricSpec("container_fs_inodes_free", "Number of available inodes on this filesystem.", GAUGE, _DEV),
    MetricSpec("container_fs_reads_bytes_total", "Cumulative count of bytes read.", COUNTER, _DEV),
    MetricSpec("container_fs_reads_total", "Cumulative count of reads completed.", COUNTER, _DEV),
    MetricSpec("container_fs_writes_bytes_total", "Cumulative count of bytes written.", COUNTER, _DEV),
    MetricSpec("container_fs_writes_total", "Cumulative count of writes completed.", COUNTER, _DEV),
    MetricSpec("container_blkio_device_usage_total", "Blkio device bytes usage.", COUNTER, ("device", "major", "minor", "operation")),
    # network (pod level: the pod's network namespace)
    MetricSpec("container_network_receive_bytes_total", "Cumulative count of bytes received.", COUNTER, _NET),
    MetricSpec("container_network_receive_packets_total", "Cumulative count of packets received.", COUNTER, _NET),
    MetricSpec("container_network_receive_packets_dropped_total", "Cumulative count of packets dropped while receiving.", COUNTER, _NET),
    MetricSpec("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.", COUNTER, _NET),
    MetricSpec("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", COUNTER, _NET),
    MetricSpec("container_network_transmit_packets_total", "Cumulative count of packets transmitted.", COUNTER, _NET),
    MetricSpec("container_network_transmit_packets_dropped_total", "Cumulative count of packets dropped while transmitting.", COUNTER, _NET),
    MetricSpec("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting.", COUNTER, _NET),
    # processes
    MetricSpec("container_processes", "Number of processes running inside the container.", GAUGE),
    MetricSpec("container_threads", "Number of threads running inside the container.", GAUGE),
    MetricSpec("container_threads_max", "Maximum number of threads allowed inside the container, infinity if value is zero.", GAUGE),
    MetricSpec("container_file_descriptors", "Number of open file descriptors for the container.", GAUGE),
    MetricSpec("container_sockets", "Number of open sockets for the container.", GAUGE),
    MetricSpec("container_ulimits_soft", "Soft ulimit values for the container root process. Unlimited if -1, except priority and nice.", GAUGE, ("ulimit",)),
    # misc
    MetricSpec("container_last_seen", "Last time a container was seen by the exporter.", GAUGE),
    MetricSpec("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", GAUGE),
    # spec (what the cgroup enforces)
    MetricSpec("container_spec_cpu_period", "CPU period of the container.", GAUGE),
    MetricSpec("container_spec_cpu_quota", "CPU quota of the container.", GAUGE),
    MetricSpec("container_spec_cpu_shares", "CPU share of the container.", GAUGE),
    MetricSpec("container_spec_memory_limit_bytes", "Memory limit for the container.", GAUGE),
    MetricSpec("container_spec_memory_reservation_limit_bytes", "Memory reservation limit for the container.", GAUGE),
    MetricSpec("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.", GAUGE),
)  # fmt: skip
_BY_NAME = {spec.name: spec for spec in SPECS}
_NET_DEV_FIELDS = (  # /proc/net/dev columns, in order, that cAdvisor exports
    ("container_network_receive_bytes_total", 0),
    ("container_network_receive_packets_total", 1),
    ("container_network_receive_errors_total", 2),
    ("container_network_receive_packets_dropped_total", 3),
    ("container_network_transmit_bytes_total", 8),
    ("container_network_transmit_packets_total", 9),
    ("container_network_transmit_errors_total", 10),
    ("container_network_transmit_packets_dropped_total", 11),
)


def descriptors() -> list[api_pb2.MetricDescriptor]:
    return [
        api_pb2.MetricDescriptor(name=s.name, help=s.help, label_keys=[*BASE_LABELS, *s.extra_labels]) for s in SPECS
    ]


class _Sink:
    """The metrics of one pod or container: its base label values and one timestamp."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.timestamp = time.time_ns()
        self.metrics: list[api_pb2.Metric] = []

    def add(self, name: str, value: float, *extra: str) -> None:
        spec = _BY_NAME[name]
        assert len(extra) == len(spec.extra_labels), name
        self.metrics.append(
            api_pb2.Metric(
                name=name,
                timestamp=self.timestamp,
                metric_type=spec.kind,
                label_values=[*self.labels, *extra],
                value=api_pb2.UInt64Value(value=max(0, int(value))),
            )
        )


class PodMetricsCollector:
    """Collects the metrics of every ready pod and of its running containers."""

    def __init__(self, state: StateStore, containers: ContainerManager, containers_dir: Path) -> None:
        self.state = state
        self.containers = containers
        self.containers_dir = containers_dir  # where writable layers live: <dir>/<id>/upper

    def collect(self) -> list[api_pb2.PodSandboxMetrics]:
        result = []
        for pod in self.state.list_pods():
            if pod.state != SANDBOX_READY:
                continue
            result.append(self.pod(pod))
        return result

    def pod(self, pod: SandboxRecord) -> api_pb2.PodSandboxMetrics:
        metadata = pod.pod_config.metadata
        base = [metadata.name, metadata.namespace]
        sink = _Sink([*base, "", pod.id, ""])
        netns = pod.namespaces.get("net")  # none for a pod on the host's network
        try:
            interfaces = read_net_dev(Path(netns)) if netns else {}
        except OSError as exc:  # the pod is being torn down
            log.debug("network metrics of pod %s: %s", pod.id, exc)
            interfaces = {}
        for interface, counters in interfaces.items():
            if interface != "lo":
                for name, column in _NET_DEV_FIELDS:
                    sink.add(name, counters[column], interface)
        result = api_pb2.PodSandboxMetrics(pod_sandbox_id=pod.id, metrics=sink.metrics)
        for record in self.state.containers_of(pod.id):
            try:
                record = self.containers.refresh(record)
                if record.state == CONTAINER_RUNNING:
                    result.container_metrics.append(self.container(record, base))
            except (OSError, ValueError, CRIError) as exc:  # a container going away while we read it
                log.debug("metrics of container %s: %s", record.id, exc)
        return result

    def container(self, record: ContainerRecord, base: list[str]) -> api_pb2.ContainerMetrics:
        sink = _Sink([*base, record.container_config.metadata.name, record.id, record.image_name])
        sink.add("container_last_seen", time.time())
        sink.add("container_start_time_seconds", record.started_at // NS_PER_S)
        spec = json.loads((Path(record.bundle) / "config.json").read_text())
        dirs = cgroups.controller_dirs(str(spec.get("linux", {}).get("cgroupsPath", "")))
        if "unified" in dirs:
            _cgroup_v2(sink, dirs["unified"])
            procs_dir = dirs["unified"]
        else:
            _cgroup_v1(sink, dirs)
            procs_dir = dirs.get("pids") or dirs.get("memory") or Path("/nonexistent")
        _processes(sink, procs_dir, "unified" in dirs)
        upper = self.containers_dir / record.id / "upper"
        if upper.is_dir():
            _filesystem(sink, upper)
        pid = self.containers.live_pid(record)  # 0 if the stored pid is no longer the container's
        if pid:
            _ulimits(sink, pid)
        return api_pb2.ContainerMetrics(container_id=record.id, metrics=sink.metrics)


# -- cgroups -------------------------------------------------------------------------------


def _cgroup_v1(sink: _Sink, dirs: dict[str, Path]) -> None:
    cpuacct, cpu, memory, blkio = (dirs.get(n, Path("/nonexistent")) for n in ("cpuacct", "cpu", "memory", "blkio"))
    hz = os.sysconf("SC_CLK_TCK")
    ticks = cgroups.read_keyed(cpuacct / "cpuacct.stat")
    sink.add("container_cpu_usage_seconds_total", cgroups.read_int(cpuacct / "cpuacct.usage") // NS_PER_S)
    sink.add("container_cpu_user_seconds_total", ticks.get("user", 0) // hz)
    sink.add("container_cpu_system_seconds_total", ticks.get("system", 0) // hz)
    throttling = cgroups.read_keyed(cpu / "cpu.stat")
    sink.add("container_cpu_cfs_periods_total", throttling.get("nr_periods", 0))
    sink.add("container_cpu_cfs_throttled_periods_total", throttling.get("nr_throttled", 0))
    sink.add("container_cpu_cfs_throttled_seconds_total", throttling.get("throttled_time", 0) // NS_PER_S)
    sink.add("container_spec_cpu_period", cgroups.read_int(cpu / "cpu.cfs_period_us"))
    quota = cgroups.read_int(cpu / "cpu.cfs_quota_us")  # -1: no quota (cAdvisor then has no series either)
    if quota > 0:
        sink.add("container_spec_cpu_quota", quota)
    sink.add("container_spec_cpu_shares", cgroups.read_int(cpu / "cpu.shares"))

    usage = cgroups.read_int(memory / "memory.usage_in_bytes")
    stat = cgroups.read_keyed(memory / "memory.stat")
    sink.add("container_memory_usage_bytes", usage)
    sink.add("container_memory_working_set_bytes", max(0, usage - stat.get("total_inactive_file", 0)))
    sink.add("container_memory_max_usage_bytes", cgroups.read_int(memory / "memory.max_usage_in_bytes"))
    sink.add("container_memory_rss", stat.get("total_rss", 0))
    sink.add("container_memory_cache", stat.get("total_cache", 0))
    sink.add("container_memory_mapped_file", stat.get("total_mapped_file", 0))
    sink.add("container_memory_swap", stat.get("total_swap", 0))
    sink.add("container_memory_kernel_usage", cgroups.read_int(memory / "memory.kmem.usage_in_bytes"))
    sink.add("container_memory_failcnt", cgroups.read_int(memory / "memory.failcnt"))
    for failure in ("pgfault", "pgmajfault"):
        sink.add("container_memory_failures_total", stat.get(failure, 0), failure, "container")
        sink.add("container_memory_failures_total", stat.get(f"total_{failure}", 0), failure, "hierarchy")
    sink.add("container_oom_events_total", cgroups.read_keyed(memory / "memory.oom_control").get("oom_kill", 0))
    sink.add("container_spec_memory_limit_bytes", _limit(cgroups.read_int(memory / "memory.limit_in_bytes")))
    soft_limit = cgroups.read_int(memory / "memory.soft_limit_in_bytes")
    sink.add("container_spec_memory_reservation_limit_bytes", _limit(soft_limit))
    sink.add("container_spec_memory_swap_limit_bytes", _limit(cgroups.read_int(memory / "memory.memsw.limit_in_bytes")))

    service_bytes = serviced = []
    for prefix in ("blkio.throttle.", "blkio.", "blkio.bfq."):  # throttle counts all I/O; CFQ/BFQ per scheduler
        service_bytes = _blkio_lines(blkio / f"{prefix}io_service_bytes_recursive")
        serviced = _blkio_lines(blkio / f"{prefix}io_serviced_recursive")
        if service_bytes or serviced:
            break
    for major, minor, op, value in service_bytes:
        device = _device_name(major, minor)
        sink.add("container_blkio_device_usage_total", value, device, str(major), str(minor), op)
        if op in ("Read", "Write"):
            sink.add(f"container_fs_{op.lower()}s_bytes_total", value, device)
    for major, minor, op, value in serviced:
        if op in ("Read", "Write"):
            sink.add(f"container_fs_{op.lower()}s_total", value, _device_name(major, minor))


def _cgroup_v2(sink: _Sink, directory: Path) -> None:
    cpu = cgroups.read_keyed(directory / "cpu.stat")
    sink.add("container_cpu_usage_seconds_total", cpu.get("usage_usec", 0) // 1_000_000)
    sink.add("container_cpu_user_seconds_total", cpu.get("user_usec", 0) // 1_000_000)
    sink.add("container_cpu_system_seconds_total", cpu.get("system_usec", 0) // 1_000_000)
    sink.add("container_cpu_cfs_periods_total", cpu.get("nr_periods", 0))
    sink.add("container_cpu_cfs_throttled_periods_total", cpu.get("nr_throttled", 0))
    sink.add("container_cpu_cfs_throttled_seconds_total", cpu.get("throttled_usec", 0) // 1_000_000)
    quota, _, period = _text(directory / "cpu.max").partition(" ")
    sink.add("container_spec_cpu_period", int(period) if period.isdigit() else 100_000)
    if quota.isdigit():
        sink.add("container_spec_cpu_quota", int(quota))
    weight = cgroups.read_int(directory / "cpu.weight") or 100
    sink.add("container_spec_cpu_shares", 2 + (weight - 1) * 262142 // 9999)  # runc's shares->weight, inverted

    usage = cgroups.read_int(directory / "memory.current")
    stat = cgroups.read_keyed(directory / "memory.stat")
    sink.add("container_memory_usage_bytes", usage)
    sink.add("container_memory_working_set_bytes", max(0, usage - stat.get("inactive_file", 0)))
    sink.add("container_memory_max_usage_bytes", cgroups.read_int(directory / "memory.peak"))
    sink.add("container_memory_rss", stat.get("anon", 0))
    sink.add("container_memory_cache", stat.get("file", 0))
    sink.add("container_memory_mapped_file", stat.get("file_mapped", 0))
    sink.add("container_memory_swap", cgroups.read_int(directory / "memory.swap.current"))
    sink.add("container_memory_kernel_usage", stat.get("kernel", stat.get("kernel_stack", 0) + stat.get("slab", 0)))
    sink.add("container_memory_failcnt", 0)
    for failure in ("pgfault", "pgmajfault"):
        for scope in ("container", "hierarchy"):
            sink.add("container_memory_failures_total", stat.get(failure, 0), failure, scope)
    sink.add("container_oom_events_total", cgroups.read_keyed(directory / "memory.events").get("oom_kill", 0))
    sink.add("container_spec_memory_limit_bytes", cgroups.read_int(directory / "memory.max"))
    sink.add("container_spec_memory_reservation_limit_bytes", cgroups.read_int(directory / "memory.low"))
    sink.add("container_spec_memory_swap_limit_bytes", cgroups.read_int(directory / "memory.swap.max"))

    for line in _text(directory / "io.stat").splitlines():
        device_id, *pairs = line.split()
        major, _, minor = device_id.partition(":")
        values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        device = _device_name(int(major), int(minor))
        for key, op in (("rbytes", "Read"), ("wbytes", "Write")):
            sink.add("container_blkio_device_usage_total", int(values.get(key, 0)), device, major, minor, op)
        sink.add("container_fs_reads_bytes_total", int(values.get("rbytes", 0)), device)
        sink.add("container_fs_writes_bytes_total", int(values.get("wbytes", 0)), device)
        sink.add("container_fs_reads_total", int(values.get("rios", 0)), device)
        sink.add("container_fs_writes_total", int(values.get("wios", 0)), device)


def _limit(value: int) -> int:
    return 0 if value >= UNLIMITED else value


# -- processes and files -------------------------------------------------------------------


def _processes(sink: _Sink, directory: Path, unified: bool) -> None:
    pids = [int(p) for p in _text(directory / "cgroup.procs").split()]
    threads = _text(directory / ("cgroup.threads" if unified else "tasks")).split()
    sink.add("container_processes", len(pids))
    sink.add("container_threads", len(threads))
    sink.add("container_threads_max", cgroups.read_int(directory / "pids.max"))  # "max" reads as 0: unlimited
    fds = sockets = 0
    for pid in pids:
        try:
            entries = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        fds += len(entries)
        for entry in entries:
            try:
                sockets += os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:")
            except OSError:
                continue
    sink.add("container_file_descriptors", fds)
    sink.add("container_sockets", sockets)


def _ulimits(sink: _Sink, pid: int) -> None:
    """The soft open-files limit of the container's init, the one ulimit cAdvisor exports."""
    for line in _text(Path(f"/proc/{pid}/limits")).splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            if soft.isdigit():
                sink.add("container_ulimits_soft", int(soft), "max_open_files")


def _filesystem(sink: _Sink, upper: Path) -> None:
    """The writable layer: what it uses, and the filesystem it lives on."""
    fs = os.statvfs(upper)
    st_dev = os.stat(upper).st_dev
    device = _device_name(os.major(st_dev), os.minor(st_dev))
    used, _ = disk_usage(upper, include_root=False)
    sink.add("container_fs_usage_bytes", used, device)
    sink.add("container_fs_limit_bytes", fs.f_blocks * fs.f_frsize, device)
    sink.add("container_fs_inodes_total", fs.f_files, device)
    sink.add("container_fs_inodes_free", fs.f_ffree, device)


def _device_name(major: int, minor: int) -> str:
    """/dev/<name> of a block device (as cAdvisor labels it), else the mount source, else "major:minor"."""
    number = f"{major}:{minor}"
    for line in _text(Path(f"/sys/dev/block/{number}/uevent")).splitlines():
        if line.startswith("DEVNAME="):
            return f"/dev/{line[len('DEVNAME='):]}"
    for line in _text(Path("/proc/self/mountinfo")).splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == number and " - " in line:
            return cgroups.unescape_mountinfo(line.split(" - ", 1)[1].split()[1])
    return number


# -- network -------------------------------------------------------------------------------


def read_net_dev(netns: Path) -> dict[str, list[int]]:
    """Per interface, the /proc/net/dev counters seen inside the network namespace `netns`.

    A throwaway thread enters the namespace (setns changes only the calling thread), reads its own
    /proc/thread-self/net/dev and ends: no process has to live in the namespace.
    """
    result: dict[str, list[int]] = {}
    failure: list[OSError] = []

    def read() -> None:
        try:
            target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(target)
            result.update(parse_net_dev(Path("/proc/thread-self/net/dev").read_text()))
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=read, name="netns-reader", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result


def parse_net_dev(text: str) -> dict[str, list[int]]:
    result = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, counters = line.partition(":")
        if sep:
            result[name.strip()] = [int(v) for v in counters.split()]
    return result


# -- file readers (a missing file reads as nothing: cgroups and processes come and go) -----------


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _blkio_lines(path: Path) -> list[tuple[int, int, str, int]]:
    """(major, minor, operation, value) of a v1 blkio file ("8:0 Read 4096"; the "Total" line skipped)."""
    result = []
    for line in _text(path).splitlines():
        fields = line.split()
        if len(fields) == 3 and ":" in fields[0] and fields[2].isdigit():
            major, _, minor = fields[0].partition(":")
            result.append((int(major), int(minor), fields[1], int(fields[2])))
    return result

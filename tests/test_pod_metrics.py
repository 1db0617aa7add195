"""CRI pod metrics (ListMetricDescriptors, ListPodSandboxMetrics, StreamPodSandboxMetrics) of real
runc/conmon pods, through the real crictl and gRPC, checked the way critest's metrics specs do."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from pycrio.cri import api_pb2
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage
from tests.test_cri_fixes import busybox, fx_bridge, fx_daemon, run_pod  # noqa: F401 (fixtures)

# cri-tools v1.37.0 pkg/validate/pod.go: expectedMetricDescriptorNames, minus the ones it lists as
# not implemented by every runtime (hugetlb, pressure, cpu quota, memory reservation, ulimits) and,
# for values, minus those depending on blkio accounting.
EXPECTED = """
container_blkio_device_usage_total container_cpu_cfs_periods_total container_cpu_cfs_throttled_periods_total
container_cpu_cfs_throttled_seconds_total container_cpu_system_seconds_total container_cpu_usage_seconds_total
container_cpu_user_seconds_total container_file_descriptors container_fs_inodes_free container_fs_inodes_total
container_fs_limit_bytes container_fs_reads_bytes_total container_fs_reads_total container_fs_usage_bytes
container_fs_writes_bytes_total container_fs_writes_total container_last_seen container_memory_cache
container_memory_failcnt container_memory_failures_total container_memory_kernel_usage container_memory_mapped_file
container_memory_max_usage_bytes container_memory_rss container_memory_swap container_memory_usage_bytes
container_memory_working_set_bytes container_network_receive_bytes_total container_network_receive_errors_total
container_network_receive_packets_dropped_total container_network_receive_packets_total
container_network_transmit_bytes_total container_network_transmit_errors_total
container_network_transmit_packets_dropped_total container_network_transmit_packets_total container_oom_events_total
container_processes container_sockets container_spec_cpu_period container_spec_cpu_shares
container_spec_memory_limit_bytes container_spec_memory_swap_limit_bytes container_start_time_seconds
container_threads container_threads_max
""".split()
OPTIONAL_VALUES = {
    "container_blkio_device_usage_total", "container_fs_reads_bytes_total", "container_fs_reads_total",
    "container_fs_writes_bytes_total", "container_fs_writes_total",
}  # fmt: skip
BASE_KEYS = ["pod", "namespace", "container", "id", "image"]
MIB = 1024 * 1024


def metrics_of(d: PycrioDaemon, pod_id: str) -> dict:
    """This pod's entry of `crictl metricsp -o json`."""
    listed = json.loads(d.crictl("metricsp", "-o", "json").stdout)["podMetrics"]
    mine = [p for p in listed if p["podSandboxId"] == pod_id]
    assert len(mine) == 1, listed
    return mine[0]


def by_name(metrics: list[dict]) -> dict[str, list[dict]]:
    result: dict[str, list[dict]] = {}
    for metric in metrics:
        result.setdefault(metric["name"], []).append(metric)
    return result


def value(metric: dict) -> int:
    return int(metric.get("value", {}).get("value", 0))


def test_descriptors_name_what_critest_expects(fx_daemon: PycrioDaemon) -> None:
    descs = json.loads(fx_daemon.crictl("metricdescs", "-o", "json").stdout)["descriptors"]
    names = [desc["name"] for desc in descs]
    assert len(names) == len(set(names))
    assert sorted(set(EXPECTED) - set(names)) == []
    for desc in descs:
        assert desc["help"], desc
        assert desc["labelKeys"][:5] == BASE_KEYS, desc
    keys = {desc["name"]: desc["labelKeys"] for desc in descs}
    assert keys["container_network_receive_bytes_total"] == [*BASE_KEYS, "interface"]
    assert keys["container_fs_usage_bytes"] == [*BASE_KEYS, "device"]
    assert keys["container_memory_failures_total"] == [*BASE_KEYS, "failure_type", "scope"]
    assert keys["container_blkio_device_usage_total"] == [*BASE_KEYS, "device", "major", "minor", "operation"]


def test_pod_and_container_metrics(fx_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path) -> None:
    d = fx_daemon
    started = time.time()
    resources = {"cpu_period": 100000, "cpu_quota": 100000, "cpu_shares": 512,
                 "memory_limit_in_bytes": 64 * MIB, "memory_swap_limit_in_bytes": 64 * MIB}
    # httpd (daemonized, with a listening socket) and sleep: two processes in the container
    pod_id, cid = run_pod(d, tmp_path, busybox.reference, "metrics",
                          ["/bin/sh", "-c", "busybox httpd -p 8080 -h /etc; exec sleep 100000"], resources=resources)
    ip = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]["network"]["ip"]
    d.crictl("exec", "-s", cid, "/bin/sh", "-c", "echo hi > /etc/index.html; dd if=/dev/zero of=/fill bs=1M count=3")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert urllib.request.urlopen(f"http://{ip}:8080/index.html", timeout=5).read() == b"hi\n"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    descs = {desc.name: list(desc.label_keys) for desc in _grpc_descriptors(d)}
    before = metrics_of(d, pod_id)
    assert [c["containerId"] for c in before["containerMetrics"]] == [cid]
    cpu_before = value(by_name(before["containerMetrics"][0]["metrics"])["container_cpu_usage_seconds_total"][0])
    # a busy loop for 3 s (ExecSync times out and kills it): the CPU counter grows by at least a second
    with d.channel() as ch:
        with pytest.raises(grpc.RpcError):
            d.runtime(ch).ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "while :; do :; done"], timeout=3), timeout=30
            )
    now = time.time()
    pod = metrics_of(d, pod_id)
    ctr = pod["containerMetrics"][0]
    pod_metrics, ctr_metrics = by_name(pod.get("metrics", [])), by_name(ctr["metrics"])

    # critest's checks: every expected name has values, and values match the descriptor's keys
    found = {**pod_metrics, **ctr_metrics}
    assert sorted(n for n in EXPECTED if n not in found and n not in OPTIONAL_VALUES) == []
    for name, metrics in found.items():
        assert name in descs, name
        for metric in metrics:
            assert len(metric["labelValues"]) == len(descs[name]), metric
            counter = name.endswith("_total") and name != "container_fs_inodes_total" or name == "container_memory_failcnt"
            kind = "COUNTER" if counter else "GAUGE"
            assert metric.get("metricType", "COUNTER") == kind, metric  # COUNTER is the zero value
            assert abs(int(metric["timestamp"]) / 1e9 - now) < 30, metric

    image = json.loads(d.crictl("inspect", cid).stdout)["status"]["image"]["image"]
    for metric in ctr["metrics"]:
        assert metric["labelValues"][:5] == ["metrics", "fx", "metrics", cid, image], metric
    # network: pod level, the pod's eth0, with our HTTP exchange in it
    received = pod_metrics["container_network_receive_bytes_total"]
    assert [m["labelValues"] for m in received] == [["metrics", "fx", "", pod_id, "", "eth0"]]
    assert value(received[0]) > 0 and value(pod_metrics["container_network_transmit_bytes_total"][0]) > 0
    assert value(pod_metrics["container_network_receive_packets_total"][0]) > 0

    one = {name: value(metrics[0]) for name, metrics in ctr_metrics.items()}
    assert one["container_cpu_usage_seconds_total"] >= cpu_before + 1, (cpu_before, one)
    user_and_system = one["container_cpu_user_seconds_total"] + one["container_cpu_system_seconds_total"]
    assert one["container_cpu_usage_seconds_total"] - 2 <= user_and_system <= one["container_cpu_usage_seconds_total"] + 1
    assert one["container_cpu_cfs_periods_total"] > 0  # a quota is set: periods are counted
    assert 0 < one["container_memory_working_set_bytes"] <= one["container_memory_usage_bytes"] <= 64 * MIB
    assert one["container_memory_max_usage_bytes"] >= one["container_memory_usage_bytes"]
    assert one["container_spec_memory_limit_bytes"] == 64 * MIB
    assert one["container_spec_cpu_period"] == 100000 and one["container_spec_cpu_quota"] == 100000
    assert one["container_spec_cpu_shares"] == 512
    assert one["container_processes"] == 2  # sleep and httpd (the exec'd loop is gone)
    assert one["container_threads"] >= 2
    assert one["container_file_descriptors"] >= 4 and one["container_sockets"] >= 1
    assert one["container_fs_usage_bytes"] >= 3 * MIB
    assert one["container_fs_limit_bytes"] > one["container_fs_usage_bytes"]
    assert one["container_fs_inodes_total"] > one["container_fs_inodes_free"] > 0
    assert started - 5 <= one["container_start_time_seconds"] <= now
    assert abs(one["container_last_seen"] - now) < 30
    assert one["container_oom_events_total"] == 0
    assert {tuple(m["labelValues"][5:]) for m in ctr_metrics["container_memory_failures_total"]} == {
        ("pgfault", "container"), ("pgfault", "hierarchy"), ("pgmajfault", "container"), ("pgmajfault", "hierarchy")
    }
    assert value(ctr_metrics["container_memory_failures_total"][0]) > 0  # page faults happen

    # the stream carries the same pods
    with d.channel() as ch:
        streamed = [p.pod_sandbox_id for r in d.runtime(ch).StreamPodSandboxMetrics(
            api_pb2.StreamPodSandboxMetricsRequest(), timeout=30) for p in r.pod_sandbox_metrics]
    assert streamed == [pod_id]

    # a stopped container has no metrics; a stopped pod is not listed
    d.crictl("stop", "-t", "0", cid)
    assert metrics_of(d, pod_id).get("containerMetrics", []) == []
    d.crictl("stopp", pod_id)
    assert json.loads(d.crictl("metricsp", "-o", "json").stdout).get("podMetrics", []) == []
    d.crictl("rmp", pod_id)


def _grpc_descriptors(d: PycrioDaemon) -> list[api_pb2.MetricDescriptor]:
    with d.channel() as ch:
        return list(d.runtime(ch).ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest(), timeout=10).descriptors)


def test_cgroup_v2_files(tmp_path: Path) -> None:
    """This host has v1 controllers: the v2 reader runs on a directory laid out as a v2 cgroup."""
    from pycrio.pods import pod_metrics

    files = {
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 40\nnr_throttled 3\nthrottled_usec 1200000\n",
        "cpu.max": "50000 100000\n",
        "cpu.weight": "100\n",
        "memory.current": "10485760\n",
        "memory.peak": "20971520\n",
        "memory.stat": "anon 4096000\nfile 6000000\nfile_mapped 1000\ninactive_file 2000000\nkernel 300000\npgfault 77\npgmajfault 2\n",
        "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        "memory.max": "max\n",
        "memory.low": "0\n",
        "memory.swap.max": "max\n",
        "memory.swap.current": "0\n",
        "io.stat": "253:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    sink = pod_metrics._Sink(["p", "ns", "c", "id", "img"])
    pod_metrics._cgroup_v2(sink, tmp_path)
    got = {(m.name, tuple(m.label_values[5:])): m.value.value for m in sink.metrics}
    assert got[("container_cpu_usage_seconds_total", ())] == 2
    assert got[("container_cpu_cfs_throttled_periods_total", ())] == 3
    assert got[("container_cpu_cfs_throttled_seconds_total", ())] == 1
    assert got[("container_spec_cpu_quota", ())] == 50000 and got[("container_spec_cpu_period", ())] == 100000
    assert got[("container_spec_cpu_shares", ())] == 2 + 99 * 262142 // 9999  # runc's shares-to-weight, inverted
    assert got[("container_memory_working_set_bytes", ())] == 10485760 - 2000000
    assert got[("container_memory_max_usage_bytes", ())] == 20971520
    assert got[("container_memory_kernel_usage", ())] == 300000
    assert got[("container_oom_events_total", ())] == 1
    assert got[("container_spec_memory_limit_bytes", ())] == 0  # "max": unlimited
    assert got[("container_memory_failures_total", ("pgfault", "hierarchy"))] == 77
    device = [key for key in got if key[0] == "container_fs_writes_bytes_total"]
    assert len(device) == 1 and got[device[0]] == 8192
    assert got[("container_blkio_device_usage_total", (device[0][1][0], "253", "0", "Read"))] == 4096


def test_net_dev_parsing() -> None:
    from pycrio.pods.pod_metrics import parse_net_dev, read_net_dev

    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n"
        "  eth0:    5000      40    1    2    0     0          0         0     3000      30    3    4    0     0       0          0\n"
    )
    assert parse_net_dev(text)["eth0"][:4] == [5000, 40, 1, 2]
    assert parse_net_dev(text)["eth0"][8:12] == [3000, 30, 3, 4]
    # our own network namespace, entered the same way as a pod's
    assert "lo" in read_net_dev(Path("/proc/self/ns/net"))
    with pytest.raises(OSError):
        read_net_dev(Path("/nonexistent/net"))

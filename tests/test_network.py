"""Pinned namespaces and CNI with real namespaces and the real plugins (bridge, host-local, portmap, loopback).

Everything runs on a test bridge and subnet with its config, IPAM store and cache under tmp_path, so
/etc/cni, /var/lib/cni and the default bridge are never touched. A fixture fails any test that leaves
a veth on the test bridge, a mount, or an iptables rule naming the test subnet (and cleans them).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shlex
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pycrio.errors import AlreadyExists, InvalidArgument
from pycrio.network.cni import CNIManager, NetworkError, PodNetworkRequest, PortMapping, parse_network_file
from pycrio.network.namespaces import (
    is_namespace,
    mount_points,
    nsenter_argv,
    pin_namespaces,
    run_in_netns,
    unpin_namespaces,
)

TEST_BRIDGE = "pycriotest0"
TEST_SUBNET = ipaddress.ip_network("10.123.0.0/24")
TEST_PREFIX = "10.123.0."
PLUGIN_DIRS = [Path("/usr/lib/cni"), Path("/opt/cni/bin")]
CONTRIB_CONFLIST = Path(__file__).resolve().parent.parent / "contrib" / "cni" / "10-pycrio-bridge.conflist"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (PLUGIN_DIRS[0] / "bridge").exists(),
    reason="needs root and the CNI plugins in /usr/lib/cni",
)


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout


def bridge_conflist(ipam_dir: Path, *, name: str = "pycriotest", **range_extra: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": TEST_BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [[{"subnet": str(TEST_SUBNET), **range_extra}]],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


@dataclass
class Net:
    """A test network: its config dir, IPAM store, CNI cache and a place for pod pins."""

    tmp: Path
    manager: CNIManager

    @property
    def network_dir(self) -> Path:
        return self.tmp / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.tmp / "ipam"

    def write(self, filename: str, conf: dict[str, Any]) -> None:
        self.network_dir.mkdir(exist_ok=True)
        (self.network_dir / filename).write_text(json.dumps(conf))

    def pin(self, pod_id: str) -> Path:
        return pin_namespaces(self.tmp / "pods" / pod_id / "ns", ("net",))["net"]

    def unpin(self, pod_id: str) -> None:
        unpin_namespaces(self.tmp / "pods" / pod_id / "ns")

    def add(self, pod_id: str, netns: Path, ports: list[PortMapping] | None = None):
        return self.manager.add(PodNetworkRequest(pod_id, f"name-{pod_id[:6]}", "testns", "uid-1", netns, ports or []))


def new_pod_id() -> str:
    return uuid.uuid4().hex


def veths_on_bridge() -> list[str]:
    return [line.split(":")[1].strip() for line in sh(f"ip -o link show master {TEST_BRIDGE}").splitlines()]


def rules_naming_subnet() -> list[tuple[str, str]]:
    return [
        (table, line)
        for table in ("nat", "filter")
        for line in sh(f"iptables-save -t {table}").splitlines()
        if line.startswith("-A ") and TEST_PREFIX in line
    ]


@pytest.fixture(scope="module", autouse=True)
def test_bridge() -> Iterator[None]:
    sh(f"ip link del {TEST_BRIDGE}")
    yield
    sh(f"ip link del {TEST_BRIDGE}")


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    before = set(mount_points())
    yield
    problems: list[str] = []
    for veth in veths_on_bridge():
        problems.append(f"veth {veth} left on {TEST_BRIDGE}")
        sh(f"ip link del {veth.split('@')[0]}")
    # Only this test's mounts: other pycrio daemons on the host (or in parallel tests) have theirs.
    ours = {(p, t) for p, t in set(mount_points()) - before if p.startswith(str(tmp_path))}
    for point, fstype in sorted(ours, reverse=True):
        problems.append(f"{fstype} mount left at {point}")
        sh(f"umount -l {shlex.quote(point)}")
    leaked = rules_naming_subnet()
    for table, rule in leaked:
        problems.append(f"iptables -t {table} rule left: {rule}")
        sh(f"iptables -t {table} -D {rule[3:]}")
    per_pod_chains = {w for _, rule in leaked for w in rule.split() if w.startswith("CNI-") and "HOSTPORT" not in w}
    for chain in per_pod_chains:
        sh(f"iptables -t nat -F {chain}; iptables -t nat -X {chain}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def net(tmp_path: Path) -> Net:
    n = Net(tmp_path, CNIManager(tmp_path / "net.d", PLUGIN_DIRS, tmp_path / "cache"))
    n.write("10-test.conflist", bridge_conflist(n.ipam_dir))
    return n


@pytest.fixture
def www(tmp_path: Path) -> Path:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello from the pod\n")
    return tmp_path / "www"


@pytest.fixture
def httpd_in(www: Path) -> Iterator[Any]:
    """Start busybox httpd on :8080 inside a netns; stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(netns: Path) -> None:
        argv = nsenter_argv(netns, ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", str(www)])
        started.append(subprocess.Popen(argv))
        for _ in range(100):
            if ":1F90 " in run_in_netns(netns, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout:  # :8080 bound
                return
            time.sleep(0.05)
        raise AssertionError("httpd did not start in the pod")

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def host_ipv4() -> str | None:
    """The host's first global IPv4 outside the test bridge (portmap forwards it to pods)."""
    for line in sh("ip -4 -o addr show scope global").splitlines():
        fields = line.split()
        if fields[1] != TEST_BRIDGE:
            return fields[3].split("/")[0]
    return None


# -- pinned namespaces -------------------------------------------------------------------------


def test_pin_sets_hostname_and_sysctls_inside_only(tmp_path: Path) -> None:
    host_value = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()
    host_name = socket.gethostname()
    directory = tmp_path / "pod" / "ns"
    pins = pin_namespaces(
        directory,
        hostname="pod-a",
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
    )
    assert set(pins) == {"net", "ipc", "uts"} and all(is_namespace(p) for p in pins.values())
    assert {str(p) for p in pins.values()} <= {point for point, fs in mount_points() if fs == "nsfs"}

    def inside(*argv: str) -> str:
        nsenter = ["nsenter", f"--net={pins['net']}", f"--ipc={pins['ipc']}", f"--uts={pins['uts']}", *argv]
        return subprocess.run(nsenter, capture_output=True, text=True, check=True).stdout.strip()

    assert inside("cat", "/proc/sys/kernel/hostname") == "pod-a"
    assert inside("cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start") == "0"
    assert inside("cat", "/proc/sys/kernel/shm_rmid_forced") == "1"
    assert socket.gethostname() == host_name
    assert Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text() == host_value
    # a fresh netns has lo down: the loopback plugin is what brings it up on ADD
    assert "state DOWN" in run_in_netns(pins["net"], ["ip", "-o", "link", "show", "lo"]).stdout

    unpin_namespaces(directory)
    assert not directory.exists()
    assert not [point for point, _ in mount_points() if point.startswith(str(tmp_path))]
    unpin_namespaces(directory)  # idempotent


@pytest.mark.parametrize(
    ("kinds", "sysctls", "named"),
    [
        (("net", "ipc", "uts"), {"kernel.pid_max": "99999"}, "kernel.pid_max"),  # not namespaced at all
        (("net", "ipc", "uts"), {"net.core.rmem_max": "1"}, "net.core.rmem_max"),  # read-only outside the host
        (("net", "ipc", "uts"), {"net.ipv4.no_such_knob": "1"}, "net.ipv4.no_such_knob"),
        (("net", "ipc", "uts"), {"net.ipv4.ip_unprivileged_port_start": "x"}, "net.ipv4.ip_unprivileged_port_start"),
        (("ipc", "uts"), {"net.ipv4.ip_forward": "1"}, "net.ipv4.ip_forward"),  # pod on the host's network
        (("net",), {"net/../../kernel/x": "1"}, "net/../../kernel/x"),
    ],
)
def test_bad_sysctl_is_invalid_argument_and_leaves_nothing(
    tmp_path: Path, kinds: tuple[str, ...], sysctls: dict[str, str], named: str
) -> None:
    directory = tmp_path / "pod" / "ns"
    with pytest.raises(InvalidArgument) as err:
        pin_namespaces(directory, kinds, sysctls=sysctls)
    assert named in err.value.message
    assert not directory.exists()


def test_pinning_twice_is_already_exists(tmp_path: Path) -> None:
    directory = tmp_path / "pod" / "ns"
    pin_namespaces(directory, ("net",))
    try:
        with pytest.raises(AlreadyExists):
            pin_namespaces(directory, ("net",))
        assert is_namespace(directory / "net")
    finally:
        unpin_namespaces(directory)


# -- CNI --------------------------------------------------------------------------------------


def test_add_gives_ip_brings_lo_up_and_host_reaches_pod(net: Net, httpd_in: Any) -> None:
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        result = net.add(pod, netns)
        assert len(result.ips) == 1 and ipaddress.ip_address(result.ips[0]) in TEST_SUBNET
        assert [i.name for i in result.interfaces if i.sandbox] == ["eth0"]
        assert result.raw["cniVersion"] == "1.0.0"
        assert "LOWER_UP" in run_in_netns(netns, ["ip", "-o", "link", "show", "lo"]).stdout
        assert f"inet {result.ips[0]}/24" in run_in_netns(netns, ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout
        assert net.manager.cached_result(pod).ips == result.ips  # type: ignore[union-attr]
        httpd_in(netns)
        assert fetch(f"http://{result.ips[0]}:8080/") == "hello from the pod\n"
    finally:
        net.manager.delete(pod, netns)
        net.unpin(pod)


def test_port_mappings_forward_host_ports_to_the_pod(net: Net, httpd_in: Any) -> None:
    any_ip, loopback_only = free_port(), free_port()
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        net.add(pod, netns, [PortMapping(8080, any_ip), PortMapping(8080, loopback_only, "TCP", "127.0.0.1")])
        httpd_in(netns)
        assert fetch(f"http://127.0.0.1:{any_ip}/") == "hello from the pod\n"
        assert fetch(f"http://127.0.0.1:{loopback_only}/") == "hello from the pod\n"
        primary = host_ipv4()
        if primary:
            assert fetch(f"http://{primary}:{any_ip}/") == "hello from the pod\n"
            with pytest.raises(OSError):  # bound to 127.0.0.1 only
                fetch(f"http://{primary}:{loopback_only}/")
        assert any(f"--dport {any_ip}" in rule for _, rule in rules_naming_subnet())
    finally:
        net.manager.delete(pod, netns)
        net.unpin(pod)
    assert not [rule for _, rule in rules_naming_subnet() if f"--dport {any_ip}" in rule]


def test_two_pods_get_different_ips_and_reach_each_other(net: Net, httpd_in: Any) -> None:
    pods = [new_pod_id(), new_pod_id()]
    netns = [net.pin(p) for p in pods]
    try:
        ips = [net.add(p, n).ips[0] for p, n in zip(pods, netns)]
        assert ips[0] != ips[1] and all(ipaddress.ip_address(ip) in TEST_SUBNET for ip in ips)
        assert len(veths_on_bridge()) == 2
        httpd_in(netns[1])
        got = run_in_netns(netns[0], ["/bin/busybox", "wget", "-qO-", f"http://{ips[1]}:8080/"])
        assert got.stdout == "hello from the pod\n", got.stderr
    finally:
        for p, n in zip(pods, netns):
            net.manager.delete(p, n)
            net.unpin(p)


def test_delete_releases_ip_and_veth_and_is_idempotent(net: Net) -> None:
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        ip = net.add(pod, netns).ips[0]
        ip_file = net.ipam_dir / "pycriotest" / ip
        assert ip_file.read_text().startswith(pod)
        assert len(veths_on_bridge()) == 1
        net.manager.delete(pod, netns)
        assert not ip_file.exists()
        assert veths_on_bridge() == []  # removed by DEL, while the netns still exists
        assert run_in_netns(netns, ["ip", "-o", "link", "show", "eth0"]).returncode != 0
        assert net.manager.cached_result(pod) is None
        net.manager.delete(pod, netns)
        net.manager.delete(pod, None)
    finally:
        net.unpin(pod)


def test_delete_after_the_netns_is_gone_cleans_ip_and_masquerade_rules(net: Net) -> None:
    pod = new_pod_id()
    netns = net.pin(pod)
    ip = net.add(pod, netns).ips[0]
    assert any(ip in rule for _, rule in rules_naming_subnet())
    net.unpin(pod)  # the veth dies with the netns; ipMasq rules and the IP would stay
    net.manager.delete(pod, netns)
    assert not (net.ipam_dir / "pycriotest" / ip).exists()
    assert rules_naming_subnet() == []
    net.manager.delete(pod, None)


def test_delete_after_restart_uses_the_cached_config(net: Net) -> None:
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        ip = net.add(pod, netns, [PortMapping(8080, free_port())]).ips[0]
        (net.network_dir / "10-test.conflist").unlink()
        restarted = CNIManager(net.network_dir, PLUGIN_DIRS, net.tmp / "cache")
        assert restarted.status()[0] is False
        restarted.delete(pod, netns)
        assert not (net.ipam_dir / "pycriotest" / ip).exists()
        assert rules_naming_subnet() == [] and veths_on_bridge() == []
    finally:
        net.unpin(pod)


def test_delete_with_a_lost_cache_uses_the_current_config(net: Net) -> None:
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        ip = net.add(pod, netns).ips[0]
        (net.tmp / "cache" / f"{pod}.json").unlink()
        net.manager.delete(pod, netns)
        assert not (net.ipam_dir / "pycriotest" / ip).exists()
        assert rules_naming_subnet() == [] and veths_on_bridge() == []
    finally:
        net.unpin(pod)


def test_delete_of_an_unknown_pod_is_fine(net: Net, tmp_path: Path) -> None:
    net.manager.delete(new_pod_id(), None)
    net.manager.delete(new_pod_id(), tmp_path / "no-such-netns")
    CNIManager(tmp_path / "empty", PLUGIN_DIRS, tmp_path / "cache2").delete(new_pod_id(), None)


def test_failed_add_is_rolled_back_and_the_ip_is_reused(net: Net) -> None:
    net.write("10-test.conflist", bridge_conflist(net.ipam_dir, rangeStart="10.123.0.10", rangeEnd="10.123.0.10"))
    first, second, third = new_pod_id(), new_pod_id(), new_pod_id()
    netns = {p: net.pin(p) for p in (first, second, third)}
    try:
        assert net.add(first, netns[first]).ips == ["10.123.0.10"]
        with pytest.raises(NetworkError) as err:
            net.add(second, netns[second])
        assert err.value.code == grpc.StatusCode.UNKNOWN
        assert err.value.plugin == "bridge"
        assert "no IP addresses available" in err.value.message and second in err.value.message
        assert len(veths_on_bridge()) == 1  # the failed pod's veth is gone, its netns still pinned
        assert net.manager.cached_result(second) is None
        net.manager.delete(first, netns[first])
        assert net.add(third, netns[third]).ips == ["10.123.0.10"]
    finally:
        for p, n in netns.items():
            net.manager.delete(p, n)
            net.unpin(p)


def test_add_twice_is_already_exists(net: Net) -> None:
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        net.add(pod, netns)
        with pytest.raises(AlreadyExists):
            net.add(pod, netns)
    finally:
        net.manager.delete(pod, netns)
        net.unpin(pod)


def test_add_without_a_netns_fails_cleanly(net: Net, tmp_path: Path) -> None:
    (tmp_path / "plain").touch()
    with pytest.raises(NetworkError) as err:
        net.add(new_pod_id(), tmp_path / "plain")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_add_and_delete_are_logged_and_traced(
    net: Net, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr("pycrio.tracing._STEP_TRACER", provider.get_tracer("test"))
    caplog.set_level(logging.DEBUG, logger="pycrio.network")
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        with provider.get_tracer("test").start_as_current_span("RunPodSandbox"):
            net.add(pod, netns)
        with provider.get_tracer("test").start_as_current_span("StopPodSandbox"):
            net.manager.delete(pod, netns)
    finally:
        net.unpin(pod)
    messages = [r.getMessage() for r in caplog.records if r.name == "pycrio.network"]
    for line in (f"running CNI plugin {p} {c} for pod {pod}" for p, c in
                 [("loopback", "ADD"), ("bridge", "ADD"), ("portmap", "ADD"), ("portmap", "DEL"), ("bridge", "DEL")]):
        assert line in messages
    assert messages.index(f"running CNI plugin portmap DEL for pod {pod}") < messages.index(
        f"running CNI plugin bridge DEL for pod {pod}"
    )
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for step, parent in (("cni_add", "RunPodSandbox"), ("cni_del", "StopPodSandbox")):
        assert spans[step].attributes["pod.id"] == pod
        assert spans[step].parent.span_id == spans[parent].context.span_id


# -- configuration and status -----------------------------------------------------------------


def test_status_without_configuration_is_not_ready(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for directory in (tmp_path / "empty", tmp_path / "missing"):
        manager = CNIManager(directory, PLUGIN_DIRS, tmp_path / "cache")
        ready, message = manager.status()
        assert not ready
        assert message == f"No CNI configuration file in {directory}/. Has your network provider started?"
        with pytest.raises(NetworkError) as err:
            manager.add(PodNetworkRequest("p", "n", "ns", "u", tmp_path / "x"))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_missing_plugin_is_not_ready_and_named(net: Net, tmp_path: Path) -> None:
    (net.network_dir / "10-test.conflist").unlink()
    conf = bridge_conflist(net.ipam_dir)
    conf["plugins"].append({"type": "nosuchplugin"})
    net.write("10-test.conflist", conf)
    ready, message = net.manager.status()
    assert not ready and '"nosuchplugin" not found' in message and "10-test.conflist" in message
    pod = new_pod_id()
    netns = net.pin(pod)
    try:
        with pytest.raises(NetworkError) as err:
            net.add(pod, netns)
        assert "nosuchplugin" in err.value.message
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        net.unpin(pod)
    assert not (net.ipam_dir / "pycriotest").exists() or not list((net.ipam_dir / "pycriotest").glob("10.*"))


def test_first_valid_file_in_lexical_order_wins(net: Net) -> None:
    broken = bridge_conflist(net.ipam_dir, name="broken")
    broken["plugins"][0]["type"] = "nosuchplugin"
    net.write("05-broken.conflist", broken)
    net.write("00-notjson.conf", {"no": "type"})
    net.write("20-later.conflist", bridge_conflist(net.ipam_dir, name="later"))
    (net.network_dir / "01-ignored.txt").write_text("{}")
    ready, message = net.manager.status()
    assert ready and "'pycriotest'" in message and "10-test.conflist" in message
    assert net.manager.load_network().name == "pycriotest"


def test_single_plugin_conf_file_and_version_check(tmp_path: Path) -> None:
    conf = {"cniVersion": "1.0.0", "name": "single", "type": "bridge", "bridge": TEST_BRIDGE}
    (tmp_path / "10-single.conf").write_text(json.dumps(conf))
    network = parse_network_file(tmp_path / "10-single.conf")
    assert network.name == "single" and [p["type"] for p in network.plugins] == ["bridge"]
    assert CNIManager(tmp_path, PLUGIN_DIRS, tmp_path / "cache").status()[0]
    (tmp_path / "10-single.conf").write_text(json.dumps({**conf, "cniVersion": "9.9.9"}))
    ready, message = CNIManager(tmp_path, PLUGIN_DIRS, tmp_path / "cache").status()
    assert not ready and "does not support cniVersion 9.9.9" in message


def test_default_conflist_is_valid() -> None:
    network = parse_network_file(CONTRIB_CONFLIST)
    assert (network.name, network.cni_version) == ("pycrio", "1.0.0")
    assert [p["type"] for p in network.plugins] == ["bridge", "portmap"]
    bridge = network.plugins[0]
    assert bridge["bridge"] == "pycrio0" and bridge["isGateway"] and bridge["ipMasq"] and bridge["hairpinMode"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.85.0.0/16"}]]
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]
    assert network.plugins[1]["capabilities"] == {"portMappings": True}
    assert CNIManager(CONTRIB_CONFLIST.parent, PLUGIN_DIRS, Path("/nonexistent")).status()[0]

"""Hostile or careless requests and failing parts, on a real daemon with real runc/conmon pods:
validation errors reach the caller as INVALID_ARGUMENT, long calls do not starve short ones, and
a failing CNI DEL keeps what a retry needs."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

HD_BRIDGE = "pycriohd4"
HD_SUBNET = "10.137.0.0/24"
HD_PREFIX = "10.137.0."
PLUGIN_DIRS = ["/usr/lib/cni", "/opt/cni/bin"]


def hd_conflist(directory: Path, ipam_dir: Path, portmap_type: str = "portmap") -> Path:
    """Our own bridge network, host-local keeping its allocations in `ipam_dir` (one file per IP)."""
    return bridge_network(directory, "pycrio-hd", HD_BRIDGE, HD_SUBNET, portmap=portmap_type, ipam_dir=ipam_dir,
                          filename="10-hd.conflist")


@pytest.fixture(scope="module", autouse=True)
def hd_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", HD_BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("hd/busybox", "1")


def start_hd_daemon(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage,
                    plugin_dirs: list[str] | None = None, portmap_type: str = "portmap") -> PycrioDaemon:
    netdir = hd_conflist(tmp_path / "net.d", tmp_path / "ipam", portmap_type)
    dirs = ", ".join(f'"{d}"' for d in (plugin_dirs or PLUGIN_DIRS))
    daemon = make_daemon(
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\nplugin_dirs = [{dirs}]\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "/pycrio-hdtest-{tmp_path.name}"\n'
        ),
    )
    daemon.crictl("pull", busybox.reference)
    return daemon


def clean_up(daemon: PycrioDaemon, tmp_path: Path) -> None:
    """Remove every pod, then check nothing of the daemon's is left on the host."""
    if not daemon.alive():
        daemon.start()
    for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
        daemon.crictl("rmp", "-f", pod["id"], check=False)
    procs = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert str(daemon.base) not in procs, procs
    parent = f"/pycrio-hdtest-{tmp_path.name}"
    for directory in cgroups.controller_dirs(parent).values():  # v1: each controller; v2: the one tree
        assert [p for p in directory.glob("*") if p.is_dir()] == [], f"pod cgroups left in {directory}"
    cgroups.remove_cgroup(parent)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(daemon.base) in line]
    assert mounts == [], mounts


@pytest.fixture
def hd_daemon(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator[PycrioDaemon]:
    daemon = start_hd_daemon(make_daemon, tmp_path, registry, busybox)
    yield daemon
    clean_up(daemon, tmp_path)


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def pod_file(tmp_path: Path, name: str, host_network: bool = False, **extra: object) -> Path:
    linux: dict = {"security_context": {"namespace_options": {"network": 2}}} if host_network else {}
    return write_json(
        tmp_path / f"pod-{name}.json",
        {"metadata": {"name": name, "namespace": "hd", "uid": f"uid-{name}", "attempt": 0},
         "log_directory": str(tmp_path / "logs" / name), "linux": linux, **extra},
    )


def ctr_file(tmp_path: Path, image: str, name: str, command: list[str], **extra: object) -> Path:
    return write_json(
        tmp_path / f"ctr-{name}.json",
        {"metadata": {"name": name}, "image": {"image": image}, "command": command, "log_path": f"{name}.log", **extra},
    )


def run_in_pod(d: PycrioDaemon, tmp_path: Path, pod_id: str, podfile: Path, image: str, name: str,
               command: list[str], start: bool = True, **extra: object) -> str:
    cid = d.crictl("create", pod_id, str(ctr_file(tmp_path, image, name, command, **extra)), str(podfile)).stdout.strip()
    if start:
        d.crictl("start", cid)
    return cid


def wait_exited(d: PycrioDaemon, cid: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(d.crictl("inspect", cid).stdout)["status"]
        if status["state"] == "CONTAINER_EXITED" or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def container_log(tmp_path: Path, pod: str, name: str, stream: str = "stdout") -> str:
    """What the container wrote to `stream` (its CRI log lines without timestamp and tags)."""
    path = tmp_path / "logs" / pod / f"{name}.log"
    lines = [line.split(" ", 3) for line in path.read_text().splitlines()]
    return "".join(parts[3] + "\n" for parts in lines if len(parts) == 4 and parts[1] == stream)


# --------------------------------------------------------------------------- validation errors


def pod_request(name: str, **linux: object) -> api_pb2.RunPodSandboxRequest:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="hd", uid=f"uid-{name}"),
        linux=api_pb2.LinuxPodSandboxConfig(**linux),  # type: ignore[arg-type]
    )
    return api_pb2.RunPodSandboxRequest(config=config)


def test_validation_errors_are_invalid_argument_with_their_message(
    hd_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path
) -> None:
    d = hd_daemon
    parent = f"/pycrio-hdtest-{tmp_path.name}"
    escapes = [f"{parent}/../../etc", "../../sys", f"{parent}/a/../../.."]
    with d.channel() as ch:
        rt = d.runtime(ch)
        for n, cgroup_parent in enumerate(escapes):
            security = api_pb2.LinuxSandboxSecurityContext(namespace_options=api_pb2.NamespaceOption(pid=api_pb2.POD))
            for request in (pod_request(f"esc{n}", cgroup_parent=cgroup_parent),
                            pod_request(f"escpid{n}", cgroup_parent=cgroup_parent, security_context=security)):
                with pytest.raises(grpc.RpcError) as err:
                    rt.RunPodSandbox(request, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "escapes the cgroup root" in err.value.details() and cgroup_parent in err.value.details()
        # A NUL byte reaching the OS in a path is Python's ValueError: still the caller's mistake.
        pod = pod_request("nul")
        pod.config.log_directory = str(tmp_path / "logs" / "nul")
        pod.config.linux.security_context.namespace_options.network = api_pb2.NODE
        pod_id = rt.RunPodSandbox(pod, timeout=60).pod_sandbox_id
        ctr = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="nul"),
                                      image=api_pb2.ImageSpec(image=busybox.reference), command=["true"],
                                      log_path="nul\x00.log")
        with pytest.raises(grpc.RpcError) as err:
            rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=ctr,
                                                              sandbox_config=pod.config), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "null" in err.value.details()
        assert rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        assert rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
        assert rt.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pycrio"
    assert "Traceback" not in d.logs()  # the caller's mistakes, not the daemon's bugs


# --------------------------------------------------------------------------- long calls vs short ones


def test_short_calls_answer_while_40_long_calls_are_in_flight(
    hd_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path
) -> None:
    """36 GetContainerEvents streams (kubelet's evented PLEG, crictl events) and 4 StopContainer
    calls waiting out their grace period on containers that ignore SIGTERM: 40 long calls, more
    than the 32 workers that once served every call. Kubelet's polling must still be answered."""
    d = hd_daemon
    grace = 8
    podfile = pod_file(tmp_path, "long", host_network=True)
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    # `sleep` is PID 1 of its own PID namespace: SIGTERM does nothing, StopContainer waits `grace`.
    pid_ns = {"security_context": {"namespace_options": {"pid": 1}}}
    sleepers = [run_in_pod(d, tmp_path, pod_id, podfile, busybox.reference, f"s{i}", ["/bin/sleep", "3600"],
                           linux=pid_ns) for i in range(4)]
    streams_channel, stops_channel, probe_channel = d.channel(), d.channel(), d.channel()
    streams = [d.runtime(streams_channel).GetContainerEvents(api_pb2.GetEventsRequest()) for _ in range(36)]

    def read(stream: grpc.Future) -> None:
        try:
            for _ in stream:  # type: ignore[attr-defined]
                pass
        except grpc.RpcError:
            pass  # cancelled at the end

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]

    def stop(cid: str) -> float:
        started = time.monotonic()
        d.runtime(stops_channel).StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=grace),
                                               timeout=grace + 60)
        return time.monotonic() - started

    try:
        for reader in readers:
            reader.start()
        time.sleep(1.0)
        with ThreadPoolExecutor(max_workers=len(sleepers)) as pool:
            stopping = [pool.submit(stop, cid) for cid in sleepers]
            time.sleep(1.0)
            probe = d.runtime(probe_channel)
            for call, request in ((probe.Version, api_pb2.VersionRequest()),
                                  (probe.ListPodSandbox, api_pb2.ListPodSandboxRequest()),
                                  (probe.Status, api_pb2.StatusRequest())):
                started = time.monotonic()
                call(request, timeout=2.0)  # DEADLINE_EXCEEDED here: queued behind the long calls
                assert time.monotonic() - started < 2.0
            assert not any(f.done() for f in stopping)  # the long calls were really in flight
            waited = [f.result() for f in stopping]
        assert all(grace - 1 <= w < grace + 10 for w in waited), waited
    finally:
        for s in streams:
            s.cancel()
        for channel in (streams_channel, stops_channel, probe_channel):
            channel.close()
    states = {json.loads(d.crictl("inspect", cid).stdout)["status"]["state"] for cid in sleepers}
    assert states == {"CONTAINER_EXITED"}
    d.crictl("rmp", "-f", pod_id)


# --------------------------------------------------------------------------- CNI DEL failing


FLAKY_PORTMAP = """#!/bin/sh
# The real portmap plugin, except that DEL fails while {flag} exists.
echo "$CNI_COMMAND $CNI_CONTAINERID" >> {calls}
if [ "$CNI_COMMAND" = DEL ] && [ -e {flag} ]; then
  echo '{{"cniVersion": "1.0.0", "code": 11, "msg": "DEL refused while the flag file exists"}}'
  exit 1
fi
exec /usr/lib/cni/portmap
"""


@pytest.fixture
def flaky_daemon(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator[PycrioDaemon]:
    """A daemon whose plugin dir holds the real plugins and `hd-portmap`, a portmap that can fail DEL."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("bridge", "host-local", "loopback", "portmap"):
        (plugins / name).symlink_to(Path(PLUGIN_DIRS[0]) / name)
    wrapper = plugins / "hd-portmap"
    wrapper.write_text(FLAKY_PORTMAP.format(flag=tmp_path / "fail-del", calls=tmp_path / "cni-calls"))
    wrapper.chmod(0o755)
    daemon = start_hd_daemon(make_daemon, tmp_path, registry, busybox, [str(plugins)], "hd-portmap")
    yield daemon
    (tmp_path / "fail-del").unlink(missing_ok=True)
    clean_up(daemon, tmp_path)


def allocated(tmp_path: Path, pod_id: str) -> list[str]:
    """The IPs host-local has reserved for the pod (its files name the IP and hold the owner's id)."""
    store = tmp_path / "ipam" / "pycrio-hd"
    return sorted(f.name for f in store.glob(f"{HD_PREFIX}*") if pod_id in f.read_text()) if store.exists() else []


def nat_rules_of(pod_id: str) -> list[str]:
    """iptables rules whose comment names the pod (bridge's ipMasq, portmap's DNAT)."""
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    return [line for line in rules.splitlines() if pod_id in line]


def del_calls(tmp_path: Path, pod_id: str) -> int:
    calls = tmp_path / "cni-calls"
    return calls.read_text().splitlines().count(f"DEL {pod_id}") if calls.exists() else 0


def test_failed_cni_del_keeps_what_a_retry_needs(flaky_daemon: PycrioDaemon, tmp_path: Path) -> None:
    from tests.otlp_receiver import free_port

    d = flaky_daemon
    podfile = pod_file(tmp_path, "flaky", port_mappings=[
        {"container_port": 8080, "host_port": free_port(), "host_ip": "127.0.0.1"}])
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    ip = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]["network"]["ip"]
    assert allocated(tmp_path, pod_id) == [ip]
    assert any("DNAT" in rule or "dnat" in rule for rule in nat_rules_of(pod_id))
    cache = d.base / "run" / "cni" / f"{pod_id}.json"
    assert cache.exists()

    (tmp_path / "fail-del").touch()
    for attempt in (1, 2):  # every retry runs DEL again: nothing it needs was released
        failed = d.crictl("stopp", pod_id, check=False)
        assert failed.returncode != 0 and "DEL refused while the flag file exists" in failed.stderr, failed.stderr
        assert del_calls(tmp_path, pod_id) == attempt
        assert allocated(tmp_path, pod_id) == [ip] and nat_rules_of(pod_id) and cache.exists()
        status = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]
        assert status["state"] == "SANDBOX_NOTREADY" and status["network"]["ip"] == ip
    removal = d.crictl("rmp", pod_id, check=False)  # removing needs the network gone too
    assert removal.returncode != 0 and del_calls(tmp_path, pod_id) == 3

    (tmp_path / "fail-del").unlink()
    d.crictl("stopp", pod_id)
    assert del_calls(tmp_path, pod_id) == 4
    assert allocated(tmp_path, pod_id) == [] and nat_rules_of(pod_id) == [] and not cache.exists()
    assert not (d.base / "run" / "pods" / pod_id / "ns" / "net").exists()
    d.crictl("rmp", pod_id)
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []


def test_failed_teardown_at_start_up_keeps_the_record_for_the_next_try(
    flaky_daemon: PycrioDaemon, tmp_path: Path
) -> None:
    d = flaky_daemon
    pod_id = d.crictl("runp", str(pod_file(tmp_path, "halfmade"))).stdout.strip()
    ip = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]["network"]["ip"]
    d.stop(sig=9)
    # A daemon killed inside RunPodSandbox leaves an unfinished record (netns pinned, IP taken).
    record_path = d.base / "root" / "state" / "pods" / f"{pod_id}.json"
    record = json.loads(record_path.read_text())
    record["complete"] = False
    record_path.write_text(json.dumps(record))
    (tmp_path / "fail-del").touch()
    d.start()
    d.wait_for_log("kept for the next try")
    assert [p["id"] for p in json.loads(d.crictl("pods", "-o", "json").stdout)["items"]] == [pod_id]
    assert allocated(tmp_path, pod_id) == [ip] and nat_rules_of(pod_id)
    assert del_calls(tmp_path, pod_id) == 1

    (tmp_path / "fail-del").unlink()
    d.stop()
    d.start()  # the next try
    assert del_calls(tmp_path, pod_id) == 2
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []
    assert allocated(tmp_path, pod_id) == [] and nat_rules_of(pod_id) == []
    assert not (d.base / "run" / "pods" / pod_id).exists()


# --------------------------------------------------------------------------- what kubelet reads


def test_pod_sandbox_status_carries_container_statuses_for_evented_pleg(
    hd_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path
) -> None:
    d = hd_daemon
    podfile = pod_file(tmp_path, "pleg", host_network=True)
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    running = run_in_pod(d, tmp_path, pod_id, podfile, busybox.reference, "running", ["/bin/sleep", "1000"])
    done = run_in_pod(d, tmp_path, pod_id, podfile, busybox.reference, "done", ["/bin/sh", "-c", "exit 3"])
    assert wait_exited(d, done)["exitCode"] == 3

    def status(verbose: bool) -> tuple[api_pb2.PodSandboxStatusResponse, int, int]:
        with d.channel() as ch:
            before = time.time_ns()
            response = d.runtime(ch).PodSandboxStatus(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose), timeout=10)
            return response, before, time.time_ns()

    plain, _, _ = status(False)
    assert plain.status.id == pod_id and plain.timestamp == 0 and not plain.containers_statuses and not plain.info
    verbose, before, after = status(True)
    assert before <= verbose.timestamp <= after
    states = {c.id: (c.state, c.exit_code, c.metadata.name) for c in verbose.containers_statuses}
    assert states == {running: (api_pb2.CONTAINER_RUNNING, 0, "running"), done: (api_pb2.CONTAINER_EXITED, 3, "done")}
    info = json.loads(verbose.info["info"])
    assert info["runtimeHandler"] == "runc" and info["cgroupParent"].endswith(pod_id)

    # Kubelet's evented PLEG asks without verbose: the daemon is told to answer it so.
    d.stop()
    (d.config_dir / "50-pod-events.conf").write_text("[pycrio.runtime]\nenable_pod_events = true\n")
    d.start()
    evented, before, after = status(False)
    assert before <= evented.timestamp <= after and not evented.info
    assert {c.id for c in evented.containers_statuses} == {running, done}

    # And Status lists every handler, the default one ("") included, with its features.
    with d.channel() as ch:
        handlers = {h.name: h.features for h in d.runtime(ch).Status(api_pb2.StatusRequest(), timeout=10).runtime_handlers}
    assert set(handlers) == {"", "runc", "crun"} and handlers[""] == handlers["runc"]
    d.crictl("rmp", "-f", pod_id)

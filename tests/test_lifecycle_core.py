"""The lifecycle core on a real daemon (runc + conmon, CNI bridge, busybox image, gRPC calls as
kubelet makes them): exits as events, one STOPPED event per exit, the runtime's own start times,
stored pids checked before use, hostile CreateContainer requests, capped ExecSync output and
what ContainerStatus reports."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

BRIDGE = "pycriolc3"
SUBNET = "10.138.0.0/24"
MiB = 1024 * 1024
POD, CONTAINER = api_pb2.POD, api_pb2.CONTAINER


@pytest.fixture(scope="module", autouse=True)
def lc_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("lc/busybox", "1")


@pytest.fixture
def lc(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator["Client"]:
    netdir = bridge_network(tmp_path / "net.d", "pycrio-lc", BRIDGE, SUBNET, filename="10-lc.conflist")
    parent = f"/pycrio-lc-{tmp_path.name}"
    daemon = make_daemon(
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{parent}"\n'
        ),
    )
    daemon.crictl("pull", busybox.reference)
    channel = grpc.insecure_channel(daemon.endpoint, options=[("grpc.max_receive_message_length", 64 * MiB)])
    client = Client(daemon, api_pb2_grpc.RuntimeServiceStub(channel), tmp_path, busybox.reference)
    yield client
    for pod in client.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
        client.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        client.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
    left = client.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
    channel.close()
    procs = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert str(daemon.base) not in procs, procs
    assert [c.id for c in left] == [], "containers outlived their pods"
    cgroups.remove_cgroup(parent)


class Client:
    """The daemon, a RuntimeService stub and small builders of CRI configs."""

    def __init__(self, daemon: PycrioDaemon, rt: api_pb2_grpc.RuntimeServiceStub, tmp: Path, image: str) -> None:
        self.daemon, self.rt, self.tmp, self.image = daemon, rt, tmp, image
        self.count = 0

    def pod_config(self, name: str, pid: int = CONTAINER, **linux: object) -> api_pb2.PodSandboxConfig:
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="lc", uid=f"uid-{name}"),
            hostname=f"host-{name}", log_directory=str(self.tmp / "logs" / name),
        )  # fmt: skip
        config.linux.security_context.namespace_options.pid = pid
        for key, value in linux.items():
            if key == "sysctls":
                config.linux.sysctls.update(value)  # type: ignore[arg-type]
        return config

    def run_pod(self, name: str, pid: int = CONTAINER) -> tuple[str, api_pb2.PodSandboxConfig]:
        config = self.pod_config(name, pid)
        pod_id = self.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        return pod_id, config

    def container_config(self, name: str, command: list[str], pid: int = CONTAINER) -> api_pb2.ContainerConfig:
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=self.image),
            command=command, log_path=f"{name}.log",
        )  # fmt: skip
        config.linux.security_context.namespace_options.pid = pid
        return config

    def create(
        self, pod_id: str, pod: api_pb2.PodSandboxConfig, config: api_pb2.ContainerConfig, timeout: float = 60
    ) -> str:
        request = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        return self.rt.CreateContainer(request, timeout=timeout).container_id

    def run(self, pod_id: str, pod: api_pb2.PodSandboxConfig, name: str, command: list[str], pid: int = CONTAINER) -> str:
        cid = self.create(pod_id, pod, self.container_config(name, command, pid))
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
        return cid

    def status(self, cid: str, verbose: bool = False) -> api_pb2.ContainerStatusResponse:
        return self.rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=verbose), timeout=30)

    def wait_exited(self, cid: str, timeout: float = 20) -> api_pb2.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(cid).status
            if status.state == api_pb2.CONTAINER_EXITED or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def exec(self, cid: str, cmd: list[str], timeout: int = 30) -> api_pb2.ExecSyncResponse:
        return self.rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 30)


class EventReader:
    """GetContainerEvents in a thread: every event with the time it arrived."""

    def __init__(self, daemon: PycrioDaemon) -> None:
        self.channel = daemon.channel()
        self.stream = daemon.runtime(self.channel).GetContainerEvents(api_pb2.GetEventsRequest())
        self.events: list[tuple[float, api_pb2.ContainerEventResponse]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        time.sleep(0.3)  # subscribed before anything happens

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.append((time.time(), event))
        except grpc.RpcError:
            pass

    def of(self, cid: str, kind: int) -> list[tuple[float, api_pb2.ContainerEventResponse]]:
        return [(at, e) for at, e in self.events if e.container_id == cid and e.container_event_type == kind]

    def wait_for(self, cid: str, kind: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(cid, kind)
            if found:
                return found[0][0]
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(5)
        self.channel.close()


# --- exits are events -------------------------------------------------------------------


def test_exits_arrive_as_events_while_another_stop_waits_out_its_grace(lc: Client) -> None:
    """A StopContainer holding one container through its grace period delays no other exit: the
    STOPPED event of a container that exits meanwhile comes at once (inotify, not a poll), and
    each exit gives exactly one STOPPED event."""
    events = EventReader(lc.daemon)
    try:
        pod_id, pod = lc.run_pod("grace")
        stubborn = lc.run(pod_id, pod, "stubborn", ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"])
        quick = lc.run(pod_id, pod, "quick", ["/bin/sh", "-c", "sleep 2; exit 3"])
        assert events.wait_for(quick, api_pb2.CONTAINER_STARTED_EVENT, 5)
        stopper = threading.Thread(
            target=lc.rt.StopContainer,
            args=(api_pb2.StopContainerRequest(container_id=stubborn, timeout=8),), kwargs={"timeout": 60},
        )  # fmt: skip
        stopper.start()
        # nobody asks for the status of `quick`: only the exit monitor can notice its exit
        arrived = events.wait_for(quick, api_pb2.CONTAINER_STOPPED_EVENT, 6)
        assert stopper.is_alive(), "the stop ended early: it cannot show that exits do not wait for it"
        assert arrived is not None, "no STOPPED event while another container's stop waited"
        finished = lc.status(quick).status.finished_at / 1e9
        assert arrived - finished < 0.5, f"STOPPED came {arrived - finished:.2f}s after the exit"
        stopper.join(30)
        status = lc.status(stubborn).status
        assert status.state == api_pb2.CONTAINER_EXITED and status.exit_code == 137  # SIGKILL after the grace
        for cid in (quick, stubborn):
            lc.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
        time.sleep(0.3)
        for cid in (quick, stubborn):
            assert len(events.of(cid, api_pb2.CONTAINER_STOPPED_EVENT)) == 1, cid
            assert len(events.of(cid, api_pb2.CONTAINER_STARTED_EVENT)) == 1, cid
    finally:
        events.close()
    assert "exit monitor:" not in lc.daemon.logs()


def test_a_container_that_exits_at_once_never_starts_after_it_finished(lc: Client) -> None:
    pod_id, pod = lc.run_pod("quick")
    ids = [lc.run(pod_id, pod, f"true{n}", ["/bin/busybox", "true"]) for n in range(6)]
    for cid in ids:
        status = lc.wait_exited(cid)
        assert status.state == api_pb2.CONTAINER_EXITED and status.exit_code == 0
        assert 0 < status.started_at <= status.finished_at, (status.started_at, status.finished_at)


def test_listing_shows_exits_from_the_events_alone(lc: Client) -> None:
    """ListContainers reads the records (it asks the runtime nothing): the exit event keeps them current."""
    pod_id, pod = lc.run_pod("lister")
    cid = lc.run(pod_id, pod, "brief", ["sh", "-c", "sleep 0.5; exit 3"])
    idle = lc.create(pod_id, pod, lc.container_config("idle", ["sleep", "60"]))
    deadline = time.monotonic() + 15
    listed: dict[str, int] = {}
    while time.monotonic() < deadline:  # no ContainerStatus call in between
        listed = {c.id: c.state for c in lc.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers}
        if listed.get(cid) == api_pb2.CONTAINER_EXITED:
            break
        time.sleep(0.1)
    assert listed == {cid: api_pb2.CONTAINER_EXITED, idle: api_pb2.CONTAINER_CREATED}
    assert lc.status(cid).status.exit_code == 3


# --- stored pids ------------------------------------------------------------------------


def test_a_recycled_infra_pid_is_not_joined(lc: Client) -> None:
    """The pod's infra process dies and a stranger gets its pid: a new container must not join
    the stranger's PID namespace (here: the host's)."""
    pod_id, pod = lc.run_pod("recycled", pid=POD)
    first = lc.run(pod_id, pod, "first", ["/bin/sleep", "1000"], pid=POD)
    infra = _infra_pid(lc, first)
    os.kill(infra, 9)
    stranger = _take_pid(infra)
    try:
        assert os.readlink(f"/proc/{stranger.pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
        with pytest.raises(grpc.RpcError) as caught:
            cid = lc.run(pod_id, pod, "second", ["/bin/sleep", "1000"], pid=POD)
            host_view = lc.exec(cid, ["/bin/busybox", "ps"]).stdout.decode()
            pytest.fail(f"the container joined pid {infra}'s namespace, now a stranger's:\n{host_view[:500]}")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
        assert "infra process" in caught.value.details()
    finally:
        stranger.kill()
        stranger.wait()


def _infra_pid(lc: Client, cid: str) -> int:
    """The host pid of the pod's catatonit, seen from a container sharing its PID namespace."""
    pid = json.loads(lc.status(cid, verbose=True).info["info"])["pid"]
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == ns and (entry / "comm").read_text().strip() == "catatonit":
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError("no catatonit in the pod's PID namespace")


def _take_pid(pid: int) -> subprocess.Popen[bytes]:
    """A host process with pid `pid` (the kernel hands out ns_last_pid + 1 next)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
            proc = subprocess.Popen(["sleep", "600"])
            if proc.pid == pid:
                return proc
            proc.kill()
            proc.wait()
        time.sleep(0.01)
    pytest.skip(f"could not get pid {pid} back (a busy machine)")


# --- hostile or careless CreateContainer requests ----------------------------------------


@pytest.mark.parametrize("log_path", ["../../escaped/x.log", "/ABS/escaped.log", "a/../../escaped.log"])
def test_a_log_path_out_of_the_pods_log_directory_is_refused(lc: Client, log_path: str) -> None:
    pod_id, pod = lc.run_pod("logs")
    log_path = log_path.replace("/ABS", str(lc.tmp))
    config = lc.container_config("escape", ["/bin/sleep", "100"])
    config.log_path = log_path
    with pytest.raises(grpc.RpcError) as caught:
        lc.create(pod_id, pod, config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "log directory" in caught.value.details()
    assert not (lc.tmp / "escaped").exists() and not (lc.tmp / "escaped.log").exists()
    assert not any(lc.tmp.glob("**/escaped*")), list(lc.tmp.glob("**/escaped*"))
    assert lc.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    # the same container with a proper path is fine, and its name was released
    config.log_path = "escape/0.log"
    cid = lc.create(pod_id, pod, config)
    assert lc.status(cid).status.log_path == str(lc.tmp / "logs" / "logs" / "escape" / "0.log")


def test_privilege_and_sysctls_come_from_the_pod_not_the_request(lc: Client) -> None:
    pod_id, pod = lc.run_pod("plain")
    claimed = api_pb2.PodSandboxConfig()
    claimed.CopyFrom(pod)
    claimed.linux.security_context.privileged = True  # the request's copy says what the pod is not
    claimed.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    privileged = lc.container_config("root", ["/bin/sleep", "100"])
    privileged.linux.security_context.privileged = True
    with pytest.raises(grpc.RpcError) as caught:
        lc.create(pod_id, claimed, privileged)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not privileged" in caught.value.details()
    cid = lc.create(pod_id, claimed, lc.container_config("plain", ["/bin/sleep", "100"]))
    spec = json.loads(lc.status(cid, verbose=True).info["info"])["runtimeSpec"]
    assert "kernel.shm_rmid_forced" not in spec["linux"].get("sysctl", {}), spec["linux"].get("sysctl")
    # a pod created with them does pass them on
    sysctl_pod = lc.pod_config("tuned", sysctls={"kernel.shm_rmid_forced": "1"})
    tuned = lc.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=sysctl_pod), timeout=60).pod_sandbox_id
    bare = api_pb2.PodSandboxConfig(metadata=sysctl_pod.metadata)  # a request leaving them out
    cid = lc.create(tuned, bare, lc.container_config("tuned", ["/bin/sleep", "100"]))
    spec = json.loads(lc.status(cid, verbose=True).info["info"])["runtimeSpec"]
    assert spec["linux"]["sysctl"]["kernel.shm_rmid_forced"] == "1"


def test_no_container_outlives_its_pod_when_create_races_stop_and_remove(lc: Client) -> None:
    """CreateContainer against StopPodSandbox + RemovePodSandbox of the same pod, at once: either
    the create fails or the pod's removal takes the container with it."""
    outcomes: list[str] = []

    def create(pod_id: str, pod: api_pb2.PodSandboxConfig, n: int) -> None:
        try:
            lc.create(pod_id, pod, lc.container_config(f"racer{n}", ["/bin/sleep", "100"]))
            outcomes.append("created")
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), exc
            outcomes.append(exc.code().name)

    def remove(pod_id: str, delay: float) -> None:
        time.sleep(delay)
        lc.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        lc.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

    rng = random.Random(11)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for round_ in range(4):
            pods = [lc.run_pod(f"race{round_}-{n}") for n in range(3)]
            jobs = []
            for n, (pod_id, pod) in enumerate(pods):
                jobs.append(pool.submit(create, pod_id, pod, n))
                jobs.append(pool.submit(remove, pod_id, rng.uniform(0.0, 0.12)))
            for job in jobs:
                job.result()
            pods_left = {p.id for p in lc.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items}
            orphans = [
                c.id for c in lc.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
                if c.pod_sandbox_id not in pods_left
            ]  # fmt: skip
            assert orphans == [], f"round {round_}: containers outlived their pods ({outcomes})"
    assert len(outcomes) == 12


# --- ExecSync output ---------------------------------------------------------------------


def test_exec_sync_output_is_capped_and_says_so(lc: Client) -> None:
    pod_id, pod = lc.run_pod("chatty")
    cid = lc.run(pod_id, pod, "chatty", ["/bin/sleep", "1000"])
    pid = lc.daemon.proc.pid  # type: ignore[union-attr]
    before = _peak_rss(pid)
    reply = lc.exec(cid, ["/bin/busybox", "head", "-c", str(400 * MiB), "/dev/zero"], timeout=60)
    grown = _peak_rss(pid) - before
    assert reply.exit_code == 0
    assert len(reply.stdout) + len(reply.stderr) <= 16 * MiB
    assert len(reply.stdout) >= 15 * MiB and set(reply.stdout[:1024]) == {0}
    assert b"truncated" in reply.stderr and b"stdout" in reply.stderr, reply.stderr[-300:]
    assert grown < 120 * MiB, f"the daemon's peak memory grew by {grown / MiB:.0f} MiB for 400 MiB of output"
    # both streams at once, and a normal exec after it
    both = lc.exec(cid, ["/bin/sh", "-c", f"/bin/busybox head -c {20 * MiB} /dev/zero >&2; echo done"])
    assert both.stdout == b"done\n" and b"stderr" in both.stderr[-300:]
    assert lc.exec(cid, ["/bin/echo", "fine"]).stdout == b"fine\n"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# --- what ContainerStatus says -----------------------------------------------------------


def test_container_status_resources_stop_signal_image_ref_and_hostname(lc: Client, busybox: BuiltImage) -> None:
    pod_id, pod = lc.run_pod("fields")
    config = lc.container_config(
        "fields", ["/bin/sh", "-c", "trap 'echo got-usr1; exit 0' USR1; while :; do sleep 0.1; done"]
    )
    config.linux.resources.memory_limit_in_bytes = 64 * MiB
    config.linux.resources.cpu_shares = 512
    config.stop_signal = api_pb2.SIGNAL_SIGUSR1
    cid = lc.create(pod_id, pod, config)
    lc.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    status = lc.status(cid).status
    assert status.resources.linux.memory_limit_in_bytes == 64 * MiB
    assert status.resources.linux.cpu_shares == 512
    assert status.stop_signal == api_pb2.SIGNAL_SIGUSR1
    image = lc.daemon.images().ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=busybox.reference)), timeout=10
    ).image
    assert status.image_ref == image.repo_digests[0] and "@sha256:" in status.image_ref
    assert status.image_id == image.id
    # the pod's /etc/hostname is the container's
    assert lc.exec(cid, ["/bin/cat", "/etc/hostname"]).stdout.decode().strip() == "host-fields"
    # an update shows in the status
    update = api_pb2.LinuxContainerResources(memory_limit_in_bytes=128 * MiB, cpu_shares=512)
    lc.rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(container_id=cid, linux=update), timeout=30)
    assert lc.status(cid).status.resources.linux.memory_limit_in_bytes == 128 * MiB
    # StopContainer sends the configured signal: the trap answers it at once
    started = time.monotonic()
    lc.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=20), timeout=60)
    assert time.monotonic() - started < 5
    stopped = lc.status(cid).status
    assert (stopped.state, stopped.exit_code) == (api_pb2.CONTAINER_EXITED, 0)
    plain = lc.create(pod_id, pod, lc.container_config("plain", ["/bin/sleep", "10"]))
    assert lc.status(plain).status.stop_signal == api_pb2.SIGNAL_SIGTERM


# --- an exited container is released at its exit ------------------------------------------


def _runtime_knows(lc: Client, cid: str) -> bool:
    root = lc.daemon.base / "run" / "runtimes" / "runc"
    return subprocess.run(["runc", "--root", str(root), "state", cid], capture_output=True).returncode == 0


def _mounted_under(cid: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if f"/{cid}/" in line.split()[4] or line.split()[4].endswith(f"/{cid}")]


def _conmon_of(cid: str) -> str:
    return subprocess.run(["pgrep", "-af", f"conmon.*-c {cid}"], capture_output=True, text=True).stdout


def test_a_container_that_exits_on_its_own_is_released_at_once_and_kept_until_removed(lc: Client) -> None:
    """As containerd does on the exit event: the runtime deletes the container and its rootfs is
    unmounted right away, while its record, exit code, log and writable layer stay for
    ContainerStatus, logs and stats until RemoveContainer."""
    pod_id, pod = lc.run_pod("retire")
    cid = lc.run(pod_id, pod, "leaver", ["sh", "-c", "echo kept > /written; echo bye; exit 4"])
    assert lc.wait_exited(cid).exit_code == 4
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_runtime_knows(lc, cid) or _mounted_under(cid) or _conmon_of(cid)):
        time.sleep(0.05)
    assert not _runtime_knows(lc, cid), "runc still holds the exited container"
    assert _mounted_under(cid) == [], "the exited container's rootfs is still mounted"
    assert _conmon_of(cid) == ""
    status = lc.status(cid).status
    assert status.state == api_pb2.CONTAINER_EXITED and status.exit_code == 4 and status.reason == "Error"
    assert "bye" in Path(status.log_path).read_text()
    layer = lc.daemon.base / "root" / "storage" / "containers" / cid
    assert (layer / "upper" / "written").read_text() == "kept\n", "the writable layer must stay until RemoveContainer"
    lc.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    assert not layer.exists(), "RemoveContainer leaves the writable layer"
    with pytest.raises(grpc.RpcError) as err:
        lc.status(cid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_container_returns_with_the_runtime_done_with_it(lc: Client) -> None:
    pod_id, pod = lc.run_pod("stopper")
    cid = lc.run(pod_id, pod, "sleeper", ["sleep", "1000"])
    assert _runtime_knows(lc, cid) and _mounted_under(cid)
    lc.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
    assert not _runtime_knows(lc, cid) and _mounted_under(cid) == [] and _conmon_of(cid) == ""
    assert lc.status(cid).status.state == api_pb2.CONTAINER_EXITED
    lc.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    assert cid not in {c.id for c in lc.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers}

"""Real pods and containers through the real crictl: runc + conmon, CNI bridge, busybox image."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon, tracing_args
from tests.otlp_receiver import OTLPReceiver
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

TEST_BRIDGE = "pycriotest9"
TEST_SUBNET = "10.129.0.0/24"


def conflist(directory: Path) -> Path:
    return bridge_network(directory, "pycrio-test", TEST_BRIDGE, TEST_SUBNET, portmap="portmap", hairpin=True,
                          filename="10-test.conflist")


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("pods/busybox", "1")


@pytest.fixture
def pod_daemon(make_daemon, tmp_path: Path, registry: TestRegistry, receiver: OTLPReceiver, busybox) -> PycrioDaemon:
    netdir = conflist(tmp_path / "net.d")
    daemon = make_daemon(
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "/pycrio-podtest-{tmp_path.name}"\n'
        ),
        args=tracing_args(receiver.endpoint),
    )
    daemon.crictl("pull", busybox.reference)
    yield daemon
    if not daemon.alive():  # a test that killed the daemon failed before starting it again
        daemon.start()
    # Whatever a test left behind goes, so the next test and the host start clean...
    for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
        daemon.crictl("rmp", "-f", pod["id"], check=False)
    # ...and then nothing of pycrio may remain on the host.
    assert_nothing_left(daemon)


def assert_nothing_left(daemon: PycrioDaemon) -> None:
    base = str(daemon.base)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if base in line]
    assert mounts == [], mounts
    procs = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert base not in procs, procs
    assert pod_cgroups(daemon) == [], "pod cgroups left"
    cgroups.remove_cgroup(pod_cgroup_parent(daemon))  # the per-test parent itself, in every hierarchy
    links = subprocess.run(["ip", "-o", "link", "show", "master", TEST_BRIDGE], capture_output=True, text=True).stdout
    assert links.strip() == "", links
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert TEST_SUBNET.split("/")[0].rsplit(".", 1)[0] not in rules


def pod_cgroup_parent(daemon: PycrioDaemon) -> str:
    return f"/pycrio-podtest-{daemon.base.parent.name}"


def pod_cgroups(daemon: PycrioDaemon) -> list[Path]:
    """The pods' cgroups below the test's parent, in this host's hierarchies: each v1 controller
    (hybrid included) or the one v2 tree, as pycrio.oci.cgroups finds them."""
    dirs = cgroups.controller_dirs(pod_cgroup_parent(daemon)).values()
    return sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir())


@pytest.fixture(scope="module", autouse=True)
def test_bridge():
    yield
    subprocess.run(["ip", "link", "delete", TEST_BRIDGE], capture_output=True)


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def pod_config(tmp_path: Path, name: str = "web", **linux: object) -> Path:
    return write_json(
        tmp_path / f"pod-{name}.json",
        {
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "attempt": 0},
            "hostname": name,
            "log_directory": str(tmp_path / "logs" / name),
            "linux": linux or {},
        },
    )


def container_config(tmp_path: Path, image: str, name: str, command: list[str], **extra: object) -> Path:
    return write_json(
        tmp_path / f"ctr-{name}.json",
        {"metadata": {"name": name}, "image": {"image": image}, "command": command, "log_path": f"{name}.log", **extra},
    )


def wait_for_state(daemon: PycrioDaemon, container_id: str, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(daemon.crictl("inspect", container_id).stdout)["status"]
        if status["state"] == state or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_full_lifecycle_with_crictl(pod_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path) -> None:
    d = pod_daemon
    pod_id = d.crictl("runp", str(pod_config(tmp_path))).stdout.strip()
    assert len(pod_id) == 64
    pods = json.loads(d.crictl("pods", "-o", "json").stdout)["items"]
    assert [(p["id"], p["state"]) for p in pods] == [(pod_id, "SANDBOX_READY")]
    podstatus = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]
    ip = podstatus["network"]["ip"]
    assert ip.startswith("10.129.0.")

    script = "echo hello-out; echo hello-err >&2; exec sleep 1000"
    ctr = container_config(tmp_path, busybox.reference, "app", ["/bin/sh", "-c", script])
    cid = d.crictl("create", pod_id, str(ctr), str(pod_config(tmp_path))).stdout.strip()
    assert json.loads(d.crictl("inspect", cid).stdout)["status"]["state"] == "CONTAINER_CREATED"
    d.crictl("start", cid)
    assert wait_for_state(d, cid, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"
    listed = json.loads(d.crictl("ps", "-a", "-o", "json").stdout)["containers"]
    assert [(c["id"], c["state"], c["podSandboxId"]) for c in listed] == [(cid, "CONTAINER_RUNNING", pod_id)]
    # The leak check at the end looks where this host keeps the pod's cgroup (v1 or v2).
    assert pod_id in {p.name for p in pod_cgroups(d)}

    deadline = time.monotonic() + 10
    logs = ""
    while "hello-err" not in logs and time.monotonic() < deadline:
        result = d.crictl("logs", cid)
        logs = result.stdout + result.stderr
        time.sleep(0.2)
    assert "hello-out" in logs and "hello-err" in logs
    raw = (tmp_path / "logs" / "web" / "app.log").read_text()
    assert " stdout F hello-out" in raw and " stderr F hello-err" in raw

    out = d.crictl("exec", "-s", cid, "/bin/sh", "-c", "hostname; echo in-exec")
    assert out.stdout.split() == ["web", "in-exec"]
    with d.channel() as ch:
        result = d.runtime(ch).ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=["/bin/sh", "-c", "echo o; echo e >&2; exit 7"], timeout=10),
            timeout=30,
        )
    assert (result.stdout, result.stderr, result.exit_code) == (b"o\n", b"e\n", 7)
    failing = d.crictl("exec", "-s", cid, "/bin/sh", "-c", "exit 7", check=False)
    assert failing.returncode != 0 and "exited with 7" in failing.stderr

    d.crictl("stop", "-t", "2", cid)
    stopped = wait_for_state(d, cid, "CONTAINER_EXITED")
    assert stopped["state"] == "CONTAINER_EXITED"
    d.crictl("rm", cid)
    assert json.loads(d.crictl("ps", "-a", "-o", "json").stdout)["containers"] == []
    d.crictl("stopp", pod_id)
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"][0]["state"] == "SANDBOX_NOTREADY"
    d.crictl("rmp", pod_id)
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []


def test_exit_code_of_a_finished_container(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id = d.crictl("runp", str(pod_config(tmp_path, "job"))).stdout.strip()
    ctr = container_config(tmp_path, busybox.reference, "job", ["/bin/sh", "-c", "exit 3"])
    cid = d.crictl("create", pod_id, str(ctr), str(pod_config(tmp_path, "job"))).stdout.strip()
    d.crictl("start", cid)
    status = wait_for_state(d, cid, "CONTAINER_EXITED")
    assert status["exitCode"] == 3
    assert status["reason"] == "Error"
    d.crictl("rmp", "-f", pod_id)


def test_pod_answers_on_its_ip(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id = d.crictl("runp", str(pod_config(tmp_path, "httpd"))).stdout.strip()
    ip = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]["network"]["ip"]
    ctr = container_config(
        tmp_path, busybox.reference, "httpd",
        ["/bin/sh", "-c", "mkdir -p /www && echo pod-says-hi > /www/index.html && exec busybox httpd -f -p 8080 -h /www"],
    )
    cid = d.crictl("create", pod_id, str(ctr), str(pod_config(tmp_path, "httpd"))).stdout.strip()
    d.crictl("start", cid)
    deadline = time.monotonic() + 15
    body = ""
    while time.monotonic() < deadline:
        result = subprocess.run(["busybox", "wget", "-qO-", f"http://{ip}:8080/"], capture_output=True, text=True)
        body = result.stdout
        if "pod-says-hi" in body:
            break
        time.sleep(0.3)
    assert "pod-says-hi" in body
    d.crictl("rmp", "-f", pod_id)


def test_bad_requests(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    with d.channel() as ch:
        rt = d.runtime(ch)
        for call, request, code in [
            (rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig()), grpc.StatusCode.INVALID_ARGUMENT),
            (rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(
                config=api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="a", namespace="b", uid="c")),
                runtime_handler="nosuch"), grpc.StatusCode.INVALID_ARGUMENT),
            (rt.StartContainer, api_pb2.StartContainerRequest(container_id="0" * 64), grpc.StatusCode.NOT_FOUND),
            (rt.CreateContainer, api_pb2.CreateContainerRequest(pod_sandbox_id="f" * 64, config=api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name="x"), image=api_pb2.ImageSpec(image="busybox"))),
             grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == code, err.value.details()
            assert err.value.details()
    # Create in a stopped pod; double start; remove of a running container.
    pod_id = d.crictl("runp", str(pod_config(tmp_path, "bad"))).stdout.strip()
    ctr = container_config(tmp_path, busybox.reference, "sleeper", ["/bin/sleep", "1000"])
    cid = d.crictl("create", pod_id, str(ctr), str(pod_config(tmp_path, "bad"))).stdout.strip()
    d.crictl("start", cid)
    again = d.crictl("start", cid, check=False)
    assert again.returncode != 0 and "not created" in again.stderr
    d.crictl("rm", "-f", cid)
    d.crictl("stopp", pod_id)
    late = d.crictl("create", pod_id, str(ctr), str(pod_config(tmp_path, "bad")), check=False)
    assert late.returncode != 0 and "not ready" in late.stderr
    d.crictl("rmp", pod_id)
    assert d.version().runtime_name == "pycrio"


def test_run_pod_sandbox_trace_shows_the_steps(pod_daemon, tmp_path, receiver) -> None:
    d = pod_daemon
    pod_id = d.crictl("runp", str(pod_config(tmp_path, "traced")), tracing_endpoint=receiver.endpoint).stdout.strip()
    [root] = receiver.wait_for(lambda s: s.name == "/runtime.v1.RuntimeService/RunPodSandbox")
    spans = receiver.settle(quiet=0.5)
    children = {s.name for s in spans if s.parent_span_id == root.span_id}
    assert {"create_namespaces", "cni_add"} <= children
    d.crictl("rmp", "-f", pod_id)


def run_container(d: PycrioDaemon, tmp_path: Path, image: str, pod: str, name: str, command: list[str],
                  pod_linux: dict | None = None, **extra: object) -> tuple[str, str]:
    """runp + create + start; returns (pod id, container id)."""
    podfile = pod_config(tmp_path, pod, **(pod_linux or {}))
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    cid = d.crictl("create", pod_id, str(container_config(tmp_path, image, name, command, **extra)), str(podfile)).stdout.strip()
    d.crictl("start", cid)
    return pod_id, cid


def test_stats_from_the_cgroups(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id, cid = run_container(
        d, tmp_path, busybox.reference, "stats", "eater",
        ["/bin/sh", "-c", "head -c 20000000 /dev/zero > /dev/shm/fill 2>/dev/null || true; dd if=/dev/zero of=/big bs=1M count=3; exec sleep 1000"],
    )
    wait_for_state(d, cid, "CONTAINER_RUNNING")
    time.sleep(1)
    stats = json.loads(d.crictl("stats", "-o", "json", cid).stdout)["stats"][0]
    assert int(stats["cpu"]["usageCoreNanoSeconds"]["value"]) > 0
    assert int(stats["memory"]["workingSetBytes"]["value"]) > 0
    assert int(stats["writableLayer"]["usedBytes"]["value"]) >= 3 * 1024 * 1024
    podstats = json.loads(d.crictl("statsp", "-o", "json", pod_id).stdout)["stats"][0]
    assert int(podstats["linux"]["memory"]["workingSetBytes"]["value"]) > 0
    assert [c["attributes"]["id"] for c in podstats["linux"]["containers"]] == [cid]
    d.crictl("rmp", "-f", pod_id)


def test_container_survives_a_daemon_kill(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id, running = run_container(d, tmp_path, busybox.reference, "survivor", "long", ["/bin/sleep", "1000"])
    short = d.crictl("create", pod_id, str(container_config(tmp_path, busybox.reference, "short",
                                                            ["/bin/sh", "-c", "sleep 2; exit 5"])),
                     str(pod_config(tmp_path, "survivor"))).stdout.strip()
    d.crictl("start", short)
    wait_for_state(d, running, "CONTAINER_RUNNING")
    d.stop(sig=9)
    time.sleep(3)  # `short` exits while no daemon watches
    d.start()
    assert wait_for_state(d, running, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"
    exited = wait_for_state(d, short, "CONTAINER_EXITED")
    assert exited["exitCode"] == 5
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"][0]["state"] == "SANDBOX_READY"
    out = d.crictl("exec", "-s", running, "/bin/sh", "-c", "echo still-here").stdout
    assert "still-here" in out
    d.crictl("stop", "-t", "1", running)
    assert wait_for_state(d, running, "CONTAINER_EXITED")["state"] == "CONTAINER_EXITED"
    d.crictl("rmp", "-f", pod_id)


def test_oom_killed_with_a_small_memory_limit(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id, cid = run_container(
        d, tmp_path, busybox.reference, "oom", "hog",
        ["/bin/sh", "-c", "x=a; while true; do x=$x$x; done"],
        linux={"resources": {"memory_limit_in_bytes": 16 * 1024 * 1024}},
    )
    status = wait_for_state(d, cid, "CONTAINER_EXITED", timeout=60)
    assert status["state"] == "CONTAINER_EXITED"
    assert status["reason"] == "OOMKilled", status
    d.crictl("rmp", "-f", pod_id)


def test_shared_pid_namespace(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    shared = {"security_context": {"namespace_options": {"pid": 0}}}  # POD
    pod_id, first = run_container(d, tmp_path, busybox.reference, "sharing", "first", ["/bin/sleep", "1000"],
                                  pod_linux=shared)
    second = d.crictl("create", pod_id, str(container_config(
        tmp_path, busybox.reference, "second", ["/bin/sleep", "2000"],
        linux={"security_context": {"namespace_options": {"pid": 0}}})),
        str(pod_config(tmp_path, "sharing", **shared))).stdout.strip()
    d.crictl("start", second)
    wait_for_state(d, second, "CONTAINER_RUNNING")
    ps = d.crictl("exec", "-s", second, "/bin/busybox", "ps").stdout
    assert "sleep 1000" in ps and "sleep 2000" in ps
    assert "catatonit" in ps  # the pod's infra process holds the namespace as PID 1
    d.crictl("rmp", "-f", pod_id)


def test_update_resources_and_reopen_log(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id, cid = run_container(d, tmp_path, busybox.reference, "upd", "app",
                                ["/bin/sh", "-c", "while true; do echo tick; sleep 0.2; done"])
    wait_for_state(d, cid, "CONTAINER_RUNNING")
    d.crictl("update", "--memory", str(64 * 1024 * 1024), cid)
    spec = json.loads(d.crictl("inspect", cid).stdout)["info"]["runtimeSpec"]
    dirs = cgroups.controller_dirs(spec["linux"]["cgroupsPath"])
    limit_file = dirs["unified"] / "memory.max" if "unified" in dirs else dirs["memory"] / "memory.limit_in_bytes"
    assert int(limit_file.read_text().strip()) == 64 * 1024 * 1024
    log = tmp_path / "logs" / "upd" / "app.log"
    time.sleep(0.5)
    log.rename(log.with_suffix(".1"))
    with d.channel() as ch:
        d.runtime(ch).ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid), timeout=10)
    deadline = time.monotonic() + 5
    while (not log.exists() or "tick" not in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "tick" in log.read_text()
    d.crictl("rmp", "-f", pod_id)


def test_container_events_for_kubelets_evented_pleg(pod_daemon, busybox, tmp_path) -> None:
    import threading

    d = pod_daemon
    events: list[api_pb2.ContainerEventResponse] = []
    channel = d.channel()
    stream = d.runtime(channel).GetContainerEvents(api_pb2.GetEventsRequest())

    def collect() -> None:
        try:
            for event in stream:
                events.append(event)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    def wait_for(subject: str, kind: int) -> None:
        deadline = time.monotonic() + 10  # exits arrive from the exit watcher, asynchronously
        while not any(e.container_id == subject and e.container_event_type == kind for e in events):
            assert time.monotonic() < deadline, [(e.container_id[:6], e.container_event_type) for e in events]
            time.sleep(0.1)

    reader = threading.Thread(target=collect)
    reader.start()
    # The subscription is live once an event reaches it: a throwaway host-network pod's CREATED.
    probe_pod = d.crictl("runp", str(write_json(tmp_path / "pod-probe.json", {
        "metadata": {"name": "probe", "namespace": "default", "uid": "uid-probe"},
        "linux": {"security_context": {"namespace_options": {"network": 2}}}}))).stdout.strip()
    wait_for(probe_pod, api_pb2.CONTAINER_CREATED_EVENT)
    d.crictl("rmp", "-f", probe_pod)
    pod_id, cid = run_container(d, tmp_path, busybox.reference, "events", "short", ["/bin/sh", "-c", "sleep 1"])
    wait_for_state(d, cid, "CONTAINER_EXITED")
    wait_for(cid, api_pb2.CONTAINER_STOPPED_EVENT)
    d.crictl("rm", cid)
    d.crictl("stopp", pod_id)
    d.crictl("rmp", pod_id)
    wait_for(cid, api_pb2.CONTAINER_DELETED_EVENT)
    wait_for(pod_id, api_pb2.CONTAINER_DELETED_EVENT)
    stream.cancel()
    reader.join(5)
    channel.close()

    # What must hold per container (and for the pod), whatever else interleaves: each lifecycle
    # event exactly once, in lifecycle order, with non-decreasing times; nothing after DELETED.
    lifecycle = [api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT,
                 api_pb2.CONTAINER_STOPPED_EVENT, api_pb2.CONTAINER_DELETED_EVENT]
    for subject in (cid, pod_id):
        own = [e for e in events if e.container_id == subject]
        assert [e.container_event_type for e in own] == lifecycle
        assert [e.created_at for e in own] == sorted(e.created_at for e in own)
    # The container's events come while its pod exists: after the pod's CREATED, before its DELETED.
    index = {(e.container_id, e.container_event_type): n for n, e in enumerate(events)}
    assert index[(pod_id, api_pb2.CONTAINER_CREATED_EVENT)] < index[(cid, api_pb2.CONTAINER_CREATED_EVENT)]
    assert index[(cid, api_pb2.CONTAINER_DELETED_EVENT)] < index[(pod_id, api_pb2.CONTAINER_DELETED_EVENT)]
    started = events[index[(cid, api_pb2.CONTAINER_STARTED_EVENT)]]
    assert started.pod_sandbox_status.id == pod_id
    assert cid in [s.id for s in started.containers_statuses]


def test_port_mapping_reaches_the_pod(pod_daemon, busybox, tmp_path) -> None:
    from tests.otlp_receiver import free_port

    d = pod_daemon
    host_port = free_port()
    podfile = write_json(tmp_path / "pod-ports.json", {
        "metadata": {"name": "ports", "namespace": "default", "uid": "uid-ports"},
        "hostname": "ports",
        "log_directory": str(tmp_path / "logs" / "ports"),
        "port_mappings": [{"container_port": 8080, "host_port": host_port, "host_ip": "127.0.0.1"}],
    })
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    ctr = container_config(
        tmp_path, busybox.reference, "web",
        ["/bin/sh", "-c", "mkdir -p /www && echo mapped > /www/index.html && exec busybox httpd -f -p 8080 -h /www"],
    )
    cid = d.crictl("create", pod_id, str(ctr), str(podfile)).stdout.strip()
    d.crictl("start", cid)
    deadline = time.monotonic() + 15
    body = ""
    while "mapped" not in body and time.monotonic() < deadline:
        body = subprocess.run(["busybox", "wget", "-qO-", f"http://127.0.0.1:{host_port}/"],
                              capture_output=True, text=True).stdout
        time.sleep(0.3)
    assert "mapped" in body
    d.crictl("rmp", "-f", pod_id)
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert f"--dport {host_port}" not in rules  # the mapping went with the pod


def test_parallel_clients_run_full_lifecycles(pod_daemon, busybox, tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    d = pod_daemon

    def lifecycles(client: int) -> int:
        done = 0
        with d.channel() as ch:
            rt = d.runtime(ch)
            for round_ in range(5):
                name = f"p{client}-{round_}"
                pod = api_pb2.PodSandboxConfig(
                    metadata=api_pb2.PodSandboxMetadata(name=name, namespace="par", uid=f"uid-{name}"),
                    hostname=name, log_directory=str(tmp_path / "logs" / name),
                )
                pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
                ctr = api_pb2.ContainerConfig(
                    metadata=api_pb2.ContainerMetadata(name="c"), image=api_pb2.ImageSpec(image=busybox.reference),
                    command=["/bin/sleep", "1000"], log_path="c.log",
                )
                cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=ctr, sandbox_config=pod), timeout=120).container_id
                rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
                out = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["/bin/echo", name], timeout=30), timeout=60)
                assert out.stdout.strip() == name.encode()
                rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
                rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=120)
                rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
                done += 1
        return done

    with ThreadPoolExecutor(max_workers=10) as pool:
        assert sum(pool.map(lifecycles, range(10))) == 50
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []


def runc_containers(daemon: PycrioDaemon) -> dict[str, str]:
    """id -> status of the containers runc knows under the daemon's runtime root."""
    root = daemon.base / "run" / "runtimes" / "runc"
    listed = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    return {c["id"]: c["status"] for c in json.loads(listed or "null") or []}


def conmon_of(container_id: str) -> list[str]:
    procs = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    return [line for line in procs.splitlines() if f"-c {container_id}" in line]


def test_restart_cleans_up_what_a_crash_left_half_made(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    pod_id = d.crictl("runp", str(pod_config(tmp_path, "half"))).stdout.strip()
    kept_id = d.crictl("runp", str(pod_config(tmp_path, "whole"))).stdout.strip()
    # A container runc created (its init waits for `start`, conmon watches it) ...
    orphan = d.crictl("create", kept_id, str(container_config(tmp_path, busybox.reference, "orphan", ["/bin/sleep", "1000"])),
                      str(pod_config(tmp_path, "whole"))).stdout.strip()
    assert runc_containers(d)[orphan] == "created" and conmon_of(orphan)
    assert d.worker_processes()  # the image pull started the unpack workers
    d.stop(sig=9)
    # They follow the killed daemon instead of waiting forever for work.
    deadline = time.monotonic() + 10
    while d.worker_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.worker_processes() == []
    # ... and what a daemon killed inside RunPodSandbox / CreateContainer leaves: an unfinished pod
    # record (its namespaces pinned, its IP taken), and that container with its bundle and conmon
    # but no record (killed between `runc create` and saving the record).
    record_path = d.base / "root" / "state" / "pods" / f"{pod_id}.json"
    record = json.loads(record_path.read_text())
    record["complete"] = False
    record_path.write_text(json.dumps(record))
    (d.base / "root" / "state" / "containers" / f"{orphan}.json").unlink()
    bundle = d.base / "run" / "containers" / orphan
    assert bundle.is_dir() and runc_containers(d)[orphan] == "created" and conmon_of(orphan)
    d.start()
    pods = json.loads(d.crictl("pods", "-o", "json").stdout)["items"]
    assert [p["id"] for p in pods] == [kept_id]
    assert json.loads(d.crictl("ps", "-a", "-o", "json").stdout)["containers"] == []
    assert orphan not in runc_containers(d)
    deadline = time.monotonic() + 10  # conmon sees its container go and exits
    while conmon_of(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert conmon_of(orphan) == []
    assert not bundle.exists()
    assert not (d.base / "run" / "pods" / pod_id).exists()
    assert "left half-created" in d.logs()
    # The surviving pod's name is still taken.
    again = d.crictl("runp", str(pod_config(tmp_path, "whole")), check=False)
    assert again.returncode != 0 and "reserved" in again.stderr


def test_list_filters(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    a_pod, a_ctr = run_container(d, tmp_path, busybox.reference, "fa", "one", ["/bin/sleep", "1000"],
                                 labels={"tier": "front"})
    b_podfile = write_json(tmp_path / "pod-fb.json", {
        "metadata": {"name": "fb", "namespace": "default", "uid": "uid-fb"}, "labels": {"team": "b"},
        "log_directory": str(tmp_path / "logs" / "fb")})
    b_pod = d.crictl("runp", str(b_podfile)).stdout.strip()
    b_ctr = d.crictl("create", b_pod, str(container_config(tmp_path, busybox.reference, "two", ["/bin/sleep", "1000"])),
                     str(b_podfile)).stdout.strip()

    def ps(*args: str) -> list[str]:
        return sorted(c["id"] for c in json.loads(d.crictl("ps", "-a", "-o", "json", *args).stdout)["containers"])

    def pods(*args: str) -> list[str]:
        return sorted(p["id"] for p in json.loads(d.crictl("pods", "-o", "json", *args).stdout)["items"])

    assert ps() == sorted([a_ctr, b_ctr])
    assert ps("--label", "tier=front") == [a_ctr]
    assert ps("--pod", b_pod[:12]) == [b_ctr]
    assert ps("--state", "running") == [a_ctr]
    assert ps("--state", "created") == [b_ctr]
    assert ps("--id", a_ctr[:10]) == [a_ctr]
    assert pods("--label", "team=b") == [b_pod]
    assert pods("--id", a_pod[:10]) == [a_pod]
    d.crictl("stopp", b_pod)
    assert pods("--state", "ready") == [a_pod]
    assert pods("--state", "notready") == [b_pod]
    d.crictl("rmp", "-f", a_pod)
    d.crictl("rmp", "-f", b_pod)


def test_host_network_pod_and_dns_config(pod_daemon, busybox, tmp_path) -> None:
    d = pod_daemon
    podfile = write_json(tmp_path / "pod-hostnet.json", {
        "metadata": {"name": "hostnet", "namespace": "default", "uid": "uid-hostnet"},
        "log_directory": str(tmp_path / "logs" / "hostnet"),
        "dns_config": {"servers": ["10.0.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]},
        "linux": {"security_context": {"namespace_options": {"network": 2}}},  # NODE
    })
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    status = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]
    assert not (status.get("network") or {}).get("ip")  # no CNI for host-network pods
    cid = d.crictl("create", pod_id, str(container_config(tmp_path, busybox.reference, "c", ["/bin/sleep", "1000"])),
                   str(podfile)).stdout.strip()
    d.crictl("start", cid)
    wait_for_state(d, cid, "CONTAINER_RUNNING")
    resolv = d.crictl("exec", "-s", cid, "/bin/cat", "/etc/resolv.conf").stdout
    assert "nameserver 10.0.0.10" in resolv and "search svc.cluster.local" in resolv and "ndots:5" in resolv
    links = d.crictl("exec", "-s", cid, "/bin/cat", "/proc/net/dev").stdout
    host_links = Path("/proc/net/dev").read_text()
    def names(text: str) -> set[str]:
        return {line.split(":")[0].strip() for line in text.splitlines() if ":" in line}

    assert names(links) == names(host_links)  # the host's interfaces, not a pod's eth0 + lo
    d.crictl("rmp", "-f", pod_id)


def test_crun_is_refused_with_its_reason_on_this_host(pod_daemon, tmp_path) -> None:
    from pycrio.oci.cgroups import cgroup_mode

    if cgroup_mode() != "hybrid":
        pytest.skip("crun only refuses cgroup v1 hybrid hosts")
    d = pod_daemon
    result = d.crictl("runp", "--runtime", "crun", str(pod_config(tmp_path, "crun")), check=False)
    assert result.returncode != 0
    assert "FailedPrecondition" in result.stderr and "hybrid" in result.stderr
    info = json.loads(d.crictl("info").stdout)
    handlers = info["runtimeHandlers"]
    assert handlers["runc"]["available"] is True
    assert handlers["crun"]["available"] is False and "hybrid" in handlers["crun"]["reason"]
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []

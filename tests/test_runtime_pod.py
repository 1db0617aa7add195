"""The "pod" runtime type on a real daemon with the real crictl, runc and pycrio-monitor: one
monitor per pod owns its containers (create, start, exec, logs, stop, remove), survives a daemon
SIGKILL, and its own SIGKILL leaves nothing behind; a mixed node runs "oci" and "pod" pods side by
side; one trace spans cri-tools, pycrio and pycrio-monitor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pycrio.oci import cgroups
from pycrio.procfs import all_pids, argv
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon, pycrio_command, tool
from tests.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, OTLPReceiver, ReceivedSpan
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

BRIDGE = "pycriopod0"
SUBNET = "10.146.0.0/24"
RUNC = "/usr/sbin/runc"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path(RUNC).exists(), reason="needs root and runc")


@pytest.fixture(scope="module", autouse=True)
def pod_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("podrt/busybox", "1")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


class Node:
    """A daemon whose default handler "runc" is of type "pod" ("runc-oci" is an "oci" one)."""

    def __init__(self, daemon: PycrioDaemon, tmp: Path, image: str, parent: str) -> None:
        self.daemon, self.tmp, self.image, self.parent = daemon, tmp, image, parent

    def crictl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
               tracing_endpoint: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        cmd = [tool("crictl"), "--runtime-endpoint", self.daemon.endpoint, "--image-endpoint", self.daemon.endpoint,
               "--timeout", "30s"]  # fmt: skip
        if tracing_endpoint:
            cmd += ["--enable-tracing", "--tracing-endpoint", tracing_endpoint]
        done = subprocess.run([*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done

    def pod_config(self, name: str) -> Path:
        return write_json(self.tmp / f"pod-{name}.json", {
            "metadata": {"name": name, "namespace": "podrt", "uid": f"uid-{name}", "attempt": 0},
            "hostname": name, "log_directory": str(self.tmp / "logs" / name), "linux": {},
        })  # fmt: skip

    def runp(self, name: str, handler: str = "", **crictl: Any) -> str:
        args = ["runp", *(["--runtime", handler] if handler else []), str(self.pod_config(name))]
        return self.crictl(*args, **crictl).stdout.strip()

    def run(self, pod_id: str, pod: str, name: str, command: list[str], start: bool = True, **crictl: Any) -> str:
        config = write_json(self.tmp / f"ctr-{name}.json", {
            "metadata": {"name": name}, "image": {"image": self.image}, "command": command, "log_path": f"{name}.log",
        })  # fmt: skip
        cid = self.crictl("create", pod_id, str(config), str(self.pod_config(pod)), **crictl).stdout.strip()
        if start:
            self.crictl("start", cid)
        return cid

    def inspect(self, cid: str) -> dict[str, Any]:
        return json.loads(self.crictl("inspect", cid).stdout)["status"]

    def wait_for_state(self, cid: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.inspect(cid)
            if status["state"] == state or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def monitor_pid(self, pod_id: str) -> int:
        return int((self.daemon.base / "run" / "pods" / pod_id / "monitor" / "monitor.pid").read_text())

    def monitors(self) -> list[int]:
        """pids of pycrio-monitor processes of this daemon (its runroot in their command line)."""
        run = str(self.daemon.base / "run").encode()
        return [p for p in all_pids() if any(run in a for a in argv(p)) and _is_monitor(p)]


def _is_monitor(pid: int) -> bool:
    """A pycrio-monitor: exec'd as one, or forked by the zygote (named pycrio-monitor, its argv the zygote's)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == "pycrio-monitor" or any(b"pycrio-monitor" in a for a in argv(pid)[:2])


@pytest.fixture
def make_node(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator[Any]:
    """Factory: make_node(tracing_endpoint, rate) -> a Node; each is checked for leftovers at the end."""
    netdir = bridge_network(tmp_path / "net.d", "pycrio-podrt", BRIDGE, SUBNET, filename="10-podrt.conflist")
    nodes: list[Node] = []

    def factory(tracing_endpoint: str, rate: int = 1_000_000) -> Node:
        parent = f"/pycrio-podrt-{tmp_path.name}-{len(nodes)}"
        daemon = make_daemon(
            config_text=(
                f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
                f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
                f'[pycrio.runtime]\ndefault_runtime = "runc"\npod_cgroup_parent = "{parent}"\n'
                f'[pycrio.runtime.runtimes.runc]\nruntime_type = "pod"\nruntime_path = "{RUNC}"\n'
                f'[pycrio.runtime.runtimes.runc-oci]\nruntime_type = "oci"\nruntime_path = "{RUNC}"\n'
                # in the file, not flags: a reload may change it
                f'[pycrio.tracing]\nenable_tracing = true\ntracing_endpoint = "{tracing_endpoint}"\n'
                f"tracing_sampling_rate_per_million = {rate}\n"
            ),
        )
        daemon.crictl("pull", busybox.reference)
        node = Node(daemon, tmp_path, busybox.reference, parent)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        if not node.daemon.alive():
            node.daemon.start()
        for pod in json.loads(node.crictl("pods", "-o", "json").stdout).get("items", []):
            node.crictl("rmp", "-f", pod["id"], check=False)
        assert_nothing_left(node)


@pytest.fixture
def node(make_node: Any, receiver: OTLPReceiver) -> Node:
    return make_node(receiver.endpoint)


def assert_nothing_left(node: Node) -> None:
    base = str(node.daemon.base)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if base in line]
    assert mounts == [], mounts
    assert node.monitors() == [], "pycrio-monitor processes left"
    conmons = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert base not in conmons, conmons
    dirs = cgroups.controller_dirs(node.parent).values()
    left = sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir())
    assert left == [], f"cgroups left: {left}"
    cgroups.remove_cgroup(node.parent)
    links = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    assert links.strip() == "", links
    runc = subprocess.run([RUNC, "--root", f"{base}/run/runtimes/runc", "list", "-q"], capture_output=True, text=True)
    assert runc.stdout.strip() == "", runc.stdout


# --- the lifecycle ----------------------------------------------------------------------------


def test_pod_lifecycle_with_crictl(node: Node) -> None:
    pod_id = node.runp("life")
    pid = node.monitor_pid(pod_id)
    assert node.monitors() == [pid], "one monitor per pod"
    info = json.loads(node.crictl("inspectp", pod_id).stdout)
    assert info["status"]["runtimeHandler"] == "runc"
    assert info["status"]["network"]["ip"].startswith("10.146.0.")

    cid = node.run(pod_id, "life", "app", ["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 1000"])
    assert node.wait_for_state(cid, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"
    # the container's processes are the monitor's (it is their subreaper), not a conmon's
    init = int(json.loads(node.crictl("inspect", cid).stdout)["info"]["pid"])
    assert int(Path(f"/proc/{init}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid

    done = node.crictl("exec", "-s", cid, "sh", "-c", "echo sync-out; echo sync-err >&2")
    assert done.stdout.split() == ["sync-out", "sync-err"], done.stdout  # crictl prints both on stdout
    failed = node.crictl("exec", "-s", cid, "sh", "-c", "echo sync-err >&2; exit 3", check=False)
    assert failed.returncode == 1 and "exited with 3: sync-err" in failed.stderr, failed.stderr
    streamed = node.crictl("exec", cid, "sh", "-c", "echo streamed; exit 4", check=False)
    assert streamed.stdout == "streamed\n" and "exit code 4" in streamed.stderr, streamed.stderr
    piped = node.crictl("exec", "-i", cid, "cat", input="one\ntwo\n")
    assert piped.stdout == "one\ntwo\n"

    deadline = time.monotonic() + 10
    while "hello-err" not in (logs := node.crictl("logs", cid)).stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (logs.stdout, logs.stderr.splitlines()[-1]) == ("hello-out\n", "hello-err")  # after crictl's warning
    log_file = node.tmp / "logs" / "life" / "app.log"
    lines = log_file.read_text().splitlines()
    assert [line.split(" ", 3)[1:] for line in lines] == [["stdout", "F", "hello-out"], ["stderr", "F", "hello-err"]]

    quick = node.run(pod_id, "life", "quick", ["sh", "-c", "exit 7"])
    status = node.wait_for_state(quick, "CONTAINER_EXITED")
    assert (status["exitCode"], status["reason"]) == (7, "Error")

    node.crictl("stop", "-t", "5", cid)
    status = node.inspect(cid)
    assert (status["state"], status["exitCode"]) == ("CONTAINER_EXITED", 143)
    node.crictl("stopp", pod_id)
    node.crictl("rmp", pod_id)
    assert node.monitors() == []
    assert not (node.daemon.base / "run" / "pods" / pod_id).exists()


def test_port_forward_reaches_a_pod_of_the_pod_runtime(node: Node) -> None:
    """Port-forward is the daemon's dial into the pod's netns whichever handler runs the pod."""
    import httpx

    from tests.registry_fixture import free_port

    pod_id = node.runp("pf")
    cid = node.run(pod_id, "pf", "web", ["sh", "-c", "mkdir -p /w && echo via-monitor > /w/index.html && exec busybox httpd -f -p 8080 -h /w"])
    deadline = time.monotonic() + 20
    while "via-monitor" not in node.crictl("exec", "-s", cid, "busybox", "wget", "-q", "-O-", "http://127.0.0.1:8080/", check=False).stdout:
        assert time.monotonic() < deadline, "httpd did not come up"
        time.sleep(0.1)
    local = free_port()
    args = [tool("crictl"), "--runtime-endpoint", node.daemon.endpoint, "port-forward", pod_id, f"{local}:8080"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                body = httpx.get(f"http://127.0.0.1:{local}/", timeout=10).text
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
                time.sleep(0.1)
        assert body == "via-monitor\n"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    node.crictl("rmp", "-f", pod_id)


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _init_pid(node: Node, cid: str) -> int:
    return int(json.loads(node.crictl("inspect", cid).stdout)["info"]["pid"])


def test_a_mixed_node_runs_an_oci_pod_and_a_pod_pod_side_by_side(node: Node) -> None:
    info = json.loads(node.crictl("info").stdout)
    handlers = info["runtimeHandlers"]
    assert handlers["runc"] == {"runtime_type": "pod", "available": True, "reason": ""}
    assert handlers["runc-oci"] == {"runtime_type": "oci", "available": True, "reason": ""}
    oci_pod = node.runp("oci", handler="runc-oci")
    pod_pod = node.runp("mon")
    assert json.loads(node.crictl("inspectp", oci_pod).stdout)["status"]["runtimeHandler"] == "runc-oci"
    assert not (node.daemon.base / "run" / "pods" / oci_pod / "monitor").exists()
    monitor = node.monitor_pid(pod_pod)
    assert node.monitors() == [monitor]
    by_conmon = node.run(oci_pod, "oci", "a", ["sleep", "1000"])
    by_monitor = node.run(pod_pod, "mon", "b", ["sleep", "1000"])
    conmon = _parent_pid(_init_pid(node, by_conmon))
    assert b"conmon" in argv(conmon)[0]
    assert _parent_pid(_init_pid(node, by_monitor)) == monitor
    for cid in (by_conmon, by_monitor):
        assert node.crictl("exec", "-s", cid, "echo", cid[:8]).stdout.strip() == cid[:8]
        assert node.crictl("exec", cid, "echo", "streamed").stdout == "streamed\n"
    ips = {json.loads(node.crictl("inspectp", p).stdout)["status"]["network"]["ip"] for p in (oci_pod, pod_pod)}
    assert len(ips) == 2 and all(ip.startswith("10.146.0.") for ip in ips)
    for pod in (oci_pod, pod_pod):
        node.crictl("stopp", pod)
        node.crictl("rmp", pod)
    assert node.monitors() == [] and not _running(conmon)


def test_a_daemon_sigkill_leaves_the_pod_running_and_the_restarted_daemon_reattaches(node: Node) -> None:
    pod_id = node.runp("restart")
    monitor = node.monitor_pid(pod_id)
    keep = node.run(pod_id, "restart", "keep", ["sleep", "1000"])
    dies = node.run(pod_id, "restart", "dies", ["sh", "-c", "sleep 3; exit 42"])
    init = _init_pid(node, keep)
    node.daemon.stop(signal.SIGKILL)
    time.sleep(4)  # `dies` exits while no daemon runs
    assert _running(monitor) and _running(init)
    node.daemon.start()
    status = node.wait_for_state(dies, "CONTAINER_EXITED", timeout=10)
    assert (status["state"], status["exitCode"]) == ("CONTAINER_EXITED", 42)
    status = node.inspect(keep)
    assert status["state"] == "CONTAINER_RUNNING" and _init_pid(node, keep) == init
    assert node.monitor_pid(pod_id) == monitor and node.monitors() == [monitor]
    assert node.crictl("exec", "-s", keep, "echo", "after").stdout.strip() == "after"
    assert node.crictl("exec", keep, "echo", "streamed").stdout == "streamed\n"
    # and exits are reported again as they happen
    node.crictl("exec", "-s", keep, "kill", "-USR1", "1", check=False)
    late = node.run(pod_id, "restart", "late", ["sh", "-c", "exit 9"])
    assert node.wait_for_state(late, "CONTAINER_EXITED")["exitCode"] == 9
    node.crictl("stop", "-t", "5", keep)
    assert node.inspect(keep)["exitCode"] == 143
    node.crictl("rmp", "-f", pod_id)


def test_a_pod_a_crash_left_half_created_loses_its_monitor_at_the_next_start(node: Node) -> None:
    """A RunPodSandbox cut short by a crash (its record not complete): the next start removes the
    pod with everything it holds, its pycrio-monitor included."""
    pod_id = node.runp("half")
    monitor = node.monitor_pid(pod_id)
    node.daemon.stop(signal.SIGKILL)
    record = node.daemon.base / "root" / "state" / "pods" / f"{pod_id}.json"
    data = json.loads(record.read_text())
    data["complete"] = False  # as if the crash came before RunPodSandbox finished
    record.write_text(json.dumps(data))
    node.daemon.start()
    deadline = time.monotonic() + 15
    while _running(monitor) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(monitor), "the half-created pod's monitor runs on"
    assert node.monitors() == []
    assert pod_id not in node.crictl("pods", "-q").stdout


def test_a_killed_monitor_stops_its_containers_with_a_reason_and_the_pod_is_removed_cleanly(node: Node) -> None:
    pod_id = node.runp("mkill")
    cid = node.run(pod_id, "mkill", "app", ["sleep", "1000"])
    done = node.run(pod_id, "mkill", "done", ["sh", "-c", "exit 5"])
    assert node.wait_for_state(done, "CONTAINER_EXITED")["exitCode"] == 5
    init = _init_pid(node, cid)
    pod_dir = node.daemon.base / "run" / "pods" / pod_id
    assert (pod_dir / "ns" / "net").exists()
    os.kill(node.monitor_pid(pod_id), signal.SIGKILL)
    status = node.wait_for_state(cid, "CONTAINER_EXITED", timeout=10)
    assert (status["state"], status["exitCode"], status["reason"]) == ("CONTAINER_EXITED", 255, "Error")
    assert status["message"] == f"pycrio-monitor of pod {pod_id} exited"
    assert node.inspect(done)["exitCode"] == 5  # recorded before the monitor died: unchanged
    deadline = time.monotonic() + 10
    while _running(init) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(init), "the container's process outlived its exit record"
    exec_after = node.crictl("exec", "-s", cid, "echo", check=False)
    assert exec_after.returncode != 0 and "not running" in exec_after.stderr
    node.crictl("stopp", pod_id)
    node.crictl("rmp", pod_id)
    assert json.loads(node.crictl("pods", "-o", "json").stdout)["items"] == []
    assert not pod_dir.exists()  # with its pinned namespaces (the fixture: nothing mounted below the daemon's dirs)
    # the fixture checks mounts, monitors, cgroups, runc's containers and the bridge


# --- tracing -------------------------------------------------------------------------------


def _by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def _ancestors(span: ReceivedSpan, spans: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_span_id in spans:
        span = spans[span.parent_span_id]
        chain.append(span)
    return chain


def test_one_trace_spans_crictl_pycrio_and_the_monitor(node: Node, receiver: OTLPReceiver) -> None:
    pod_id = node.runp("traced")
    cid = node.run(pod_id, "traced", "app", ["sleep", "1000"], start=False, tracing_endpoint=receiver.endpoint)
    created = receiver.wait_for(
        lambda s: s.service == "pycrio-monitor" and s.name == "create_container" and s.attributes.get("container_id") == cid
    )
    assert created, "no create_container span from the monitor"
    server = created[0]
    assert server.kind == SPAN_KIND_SERVER
    assert server.attributes["container_id"] == cid and server.attributes["pod.id"] == pod_id
    assert server.attributes["uuid"]
    assert server.resource["service.name"] == "pycrio-monitor"
    assert server.resource["process.pid"] == node.monitor_pid(pod_id)
    spans = _by_id(receiver.settle())
    chain = _ancestors(server, spans)
    names = [(s.service, s.name) for s in chain]
    client = chain[0]
    assert (client.service, client.name, client.kind) == ("pycrio", "pycrio-monitor-client: CreateContainer", SPAN_KIND_CLIENT)
    assert client.attributes["uuid"] == server.attributes["uuid"]
    assert ("pycrio", "/runtime.v1.RuntimeService/CreateContainer") in names, names
    assert chain[-1].service == "cri-tools", names
    assert len({s.trace_id for s in [server, *chain]}) == 1
    steps = [s for s in spans.values() if s.parent_span_id == server.span_id]
    assert steps and all(s.service == "pycrio-monitor" for s in steps), [s.name for s in steps]
    monitor_spans = [s for s in spans.values() if s.service == "pycrio-monitor" and s.trace_id == server.trace_id]
    assert any(s.log_events() for s in monitor_spans), "no log events on the monitor's spans"
    # the other calls: the same shape, each under its own CRI call
    node.crictl("start", cid, tracing_endpoint=receiver.endpoint)
    node.crictl("exec", "-s", cid, "echo", tracing_endpoint=receiver.endpoint)
    for op, method in (("start_container", "StartContainer"), ("exec_sync_container", "ExecSync")):
        found = receiver.wait_for(
            lambda s, op=op: s.service == "pycrio-monitor" and s.name == op and s.attributes.get("container_id") == cid
        )
        assert found, op
        parents = receiver.wait_for(lambda s, want=found[0].parent_span_id: s.span_id == want)
        assert [p.name for p in parents] == [f"pycrio-monitor-client: {method}"]


GRPC_THREADS = ("grpc_global_tim", "event_engine", "lifeguard", "default-execut", "resolver-execu")


def _thread_names(pid: int) -> list[str]:
    return sorted(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task"))


def test_monitors_send_their_spans_through_the_daemons_relay_also_across_a_daemon_restart(
    node: Node, receiver: OTLPReceiver
) -> None:
    pod_id = node.runp("relayed")
    cid = node.run(pod_id, "relayed", "app", ["sleep", "1000"])
    monitor = node.monitor_pid(pod_id)
    node.crictl("exec", "-s", cid, "echo", tracing_endpoint=receiver.endpoint)
    assert receiver.wait_for(lambda s: s.service == "pycrio-monitor" and s.name == "exec_sync_container")
    log_file = node.daemon.base / "run" / "pods" / pod_id / "monitor" / "monitor.log"
    relay = node.daemon.base / "run" / "monitor-spans.sock"
    assert f"tracing enabled: the daemon's span relay {relay}" in log_file.read_text()
    # no OTLP channel of its own: none of gRPC's threads, only the loop and the span batcher's
    threads = _thread_names(monitor)
    assert not [t for t in threads if t.startswith(GRPC_THREADS)], threads
    assert "pycrio-spans" in threads, threads
    export = json.loads(subprocess.run(
        [*pycrio_command(), "--listen", str(node.daemon.socket), "status", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout)["tracing"]["export"]  # fmt: skip
    assert export["spans_relayed"] >= 1 and export["spans_relay_dropped"] == 0, export
    # a restarted daemon binds the relay again; the monitor's next batch finds it
    node.daemon.stop()
    assert not relay.exists()
    node.daemon.start()
    receiver.clear()
    node.crictl("exec", "-s", cid, "echo", "again", tracing_endpoint=receiver.endpoint)
    found = receiver.wait_for(lambda s: s.service == "pycrio-monitor" and s.name == "exec_sync_container")
    assert found and found[0].resource["process.pid"] == monitor
    parents = receiver.wait_for(lambda s, want=found[0].parent_span_id: s.span_id == want)
    assert [p.service for p in parents] == ["pycrio"]
    node.crictl("rmp", "-f", pod_id)


def test_a_reload_sends_the_new_tracing_settings_to_running_monitors(node: Node, receiver: OTLPReceiver) -> None:
    pod_id = node.runp("reload")
    cid = node.run(pod_id, "reload", "app", ["sleep", "1000"])
    with OTLPReceiver() as second:
        (node.daemon.config_dir / "50-tracing.conf").write_text(
            f'[pycrio.tracing]\ntracing_endpoint = "{second.endpoint}"\n'
        )
        node.daemon.proc.send_signal(signal.SIGHUP)
        node.daemon.wait_for_log("configuration reloaded")
        log_file = node.daemon.base / "run" / "pods" / pod_id / "monitor" / "monitor.log"
        deadline = time.monotonic() + 10
        while "tracing to the daemon relay" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # ConfigureTracing goes out in the background (a reload waits for no monitor)
        node.crictl("exec", "-s", cid, "echo", tracing_endpoint=second.endpoint)
        found = second.wait_for(lambda s: s.service == "pycrio-monitor" and s.name == "exec_sync_container")
        assert found, (log_file.read_text()[-1500:], sorted({(s.service, s.name) for s in second.spans()}))
        assert found[0].resource["process.pid"] == node.monitor_pid(pod_id)


# --- more of the container's life ---------------------------------------------------------------


def test_oom_is_reported(node: Node) -> None:
    pod_id = node.runp("oom")
    config = write_json(node.tmp / "ctr-hog.json", {
        "metadata": {"name": "hog"}, "image": {"image": node.image}, "log_path": "hog.log",
        "command": ["/bin/sh", "-c", "x=a; while true; do x=$x$x; done"],
        "linux": {"resources": {"memory_limit_in_bytes": 16 * 1024 * 1024}},
    })  # fmt: skip
    cid = node.crictl("create", pod_id, str(config), str(node.pod_config("oom"))).stdout.strip()
    node.crictl("start", cid)
    status = node.wait_for_state(cid, "CONTAINER_EXITED", timeout=60)
    assert (status["state"], status["reason"], status["exitCode"]) == ("CONTAINER_EXITED", "OOMKilled", 137), status
    node.crictl("rmp", "-f", pod_id)


def _under_pty(args: list[str], rows: int, cols: int, timeout: float = 30) -> tuple[int, bytes]:
    """Run `args` with a terminal of rows x cols as its stdio (crictl -t reads its size from it)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
    code = proc.wait(10)
    os.close(master)
    return code, out


def test_exec_with_a_tty_attach_and_an_exec_sync_timeout_through_the_monitor(node: Node) -> None:
    pod_id = node.runp("streams")
    cid = node.run(pod_id, "streams", "app", ["sleep", "1000"])
    base = [tool("crictl"), "--runtime-endpoint", node.daemon.endpoint, "exec", "-it", cid]
    code, out = _under_pty([*base, "busybox", "stty", "size"], 37, 111)
    assert code == 0 and b"37 111" in out, out
    code, out = _under_pty([*base, "sh", "-c", "exit 5"], 24, 80)
    assert code == 1 and b"command terminated with exit code 5" in out, out

    started = time.monotonic()
    timed_out = node.crictl("exec", "-s", "--timeout", "1", cid, "sleep", "30", check=False)
    assert timed_out.returncode != 0 and "DeadlineExceeded" in timed_out.stderr, timed_out.stderr
    assert time.monotonic() - started < 15
    procs = node.crictl("exec", "-s", cid, "busybox", "ps", "-o", "args").stdout.splitlines()
    assert "sleep 30" not in [p.strip() for p in procs], procs  # the timed-out tree was killed

    config = write_json(node.tmp / "ctr-reader.json", {
        "metadata": {"name": "reader"}, "image": {"image": node.image}, "log_path": "reader.log",
        "command": ["sh", "-c", "read line; echo got $line; sleep 1"], "stdin": True, "stdin_once": True,
    })  # fmt: skip
    reader = node.crictl("create", pod_id, str(config), str(node.pod_config("streams"))).stdout.strip()
    node.crictl("start", reader)
    attached = node.crictl("attach", "-i", reader, input="hello\n")
    assert "got hello" in attached.stdout, (attached.stdout, attached.stderr)
    assert node.wait_for_state(reader, "CONTAINER_EXITED")["exitCode"] == 0
    node.crictl("rmp", "-f", pod_id)


# --- tracing off and collector down ----------------------------------------------------------


def test_at_rate_zero_the_monitor_exports_only_what_a_caller_traced(make_node: Any, receiver: OTLPReceiver) -> None:
    node = make_node(receiver.endpoint, rate=0)
    pod_id = node.runp("quiet")
    cid = node.run(pod_id, "quiet", "app", ["sleep", "1000"])
    node.crictl("exec", "-s", cid, "echo")
    node.crictl("exec", cid, "echo")
    assert not receiver.wait_for(lambda s: s.service == "pycrio-monitor", timeout=3.0)
    node.crictl("exec", "-s", cid, "echo", tracing_endpoint=receiver.endpoint)  # crictl samples its trace
    traced = receiver.wait_for(lambda s: s.service == "pycrio-monitor" and s.name == "exec_sync_container")
    assert traced and {s.name for s in receiver.spans(lambda s: s.service == "pycrio-monitor")} >= {"exec_sync_container"}
    node.crictl("rmp", "-f", pod_id)


def test_a_collector_that_never_answers_blocks_neither_process(make_node: Any, black_hole: str) -> None:
    node = make_node(black_hole)
    started = time.monotonic()
    pod_id = node.runp("dark")
    cid = node.run(pod_id, "dark", "app", ["sleep", "1000"])
    for _ in range(5):
        assert node.crictl("exec", "-s", cid, "echo", "lit").stdout.strip() == "lit"
    node.crictl("stop", "-t", "2", cid)
    node.crictl("stopp", pod_id)
    removing = time.monotonic()
    node.crictl("rmp", pod_id)
    assert time.monotonic() - removing < 10  # the monitor's flush at exit gives up on the lost collector
    assert time.monotonic() - started < 30
    assert node.monitors() == []

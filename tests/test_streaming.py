"""Streaming on a real daemon with the real crictl: exec (spdy and websocket, with and without a
tty, piped stdin, exit codes), attach, port-forward to a busybox httpd fetched with a real HTTP
client, token misuse, many sessions at once without leaks, and the session spans."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import pytest

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.oci import cgroups
from pycrio.procfs import all_pids, argv
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon, tool
from tests.otlp_receiver import OTLPReceiver
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry, free_port

BRIDGE = "pycriostm0"
SUBNET = "10.144.0.0/24"
TRANSPORTS = ["spdy", "websocket"]


@pytest.fixture(scope="module", autouse=True)
def stream_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("stream/busybox", "1")


class Node:
    """A daemon with a pod, helpers to run containers in it and to call crictl."""

    def __init__(self, daemon: PycrioDaemon, tmp: Path, image: str) -> None:
        self.daemon, self.tmp, self.image = daemon, tmp, image
        self.channel = daemon.channel()
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.pod_config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="streams", namespace="stream", uid="uid-streams"),
            hostname="streams", log_directory=str(tmp / "logs"),
        )  # fmt: skip
        self.pod_id = self.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=self.pod_config), timeout=60).pod_sandbox_id
        self.count = 0

    def run(self, command: list[str], *, stdin: bool = False, stdin_once: bool = False, tty: bool = False) -> str:
        self.count += 1
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=f"c{self.count}"), image=api_pb2.ImageSpec(image=self.image),
            command=command, log_path=f"c{self.count}.log", stdin=stdin, stdin_once=stdin_once, tty=tty,
        )  # fmt: skip
        request = api_pb2.CreateContainerRequest(pod_sandbox_id=self.pod_id, config=config, sandbox_config=self.pod_config)
        cid = self.rt.CreateContainer(request, timeout=60).container_id
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
        return cid

    def crictl(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [tool("crictl"), "--runtime-endpoint", self.daemon.endpoint, "--timeout", "20s", *args]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def node(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator[Node]:
    netdir = bridge_network(tmp_path / "net.d", "pycrio-stream", BRIDGE, SUBNET, filename="10-stream.conflist")
    parent = f"/pycrio-stream-{tmp_path.name}"
    daemon = make_daemon(
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{parent}"\n'
            '[pycrio.api]\nstream_token_ttl = "3s"\n'
        ),
    )
    daemon.crictl("pull", busybox.reference)
    node = Node(daemon, tmp_path, busybox.reference)
    yield node
    node.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=node.pod_id), timeout=60)
    node.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=node.pod_id), timeout=60)
    node.channel.close()
    cgroups.remove_cgroup(parent)


def _stream_url(node: Node) -> str:
    info = json.loads(node.crictl("info", "-o", "json").stdout)
    return json.loads(info["streaming"])["url"] if isinstance(info.get("streaming"), str) else info["streaming"]["url"]


# --- exec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_streams_stdout_and_stderr_apart_and_exits_with_the_commands_code(node: Node, transport: str) -> None:
    cid = node.run(["sleep", "1000"])
    done = node.crictl("exec", "--transport", transport, cid, "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    # crictl v1.37's streaming exec exits 1 for any failure and prints the code the runtime sent in
    # its Status (NonZeroExitCode, cause ExitCode): client-go's "command terminated with exit code 3"
    assert done.returncode == 1, done.stderr
    assert "command terminated with exit code 3" in done.stderr
    assert done.stdout == "to-out\n"
    assert "to-err\n" in done.stderr
    ok = node.crictl("exec", "--transport", transport, cid, "echo", "hi")
    assert (ok.returncode, ok.stdout) == (0, "hi\n"), ok.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_with_piped_stdin_ends_when_stdin_does(node: Node, transport: str) -> None:
    cid = node.run(["sleep", "1000"])
    payload = "".join(f"line {n}\n" for n in range(2000))
    done = node.crictl("exec", "-i", "--transport", transport, cid, "cat", input=payload, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload
    counted = node.crictl("exec", "-i", "--transport", transport, cid, "busybox", "wc", "-l", input=payload)
    assert counted.stdout.strip() == "2000"


def _under_pty(args: list[str], rows: int, cols: int, send: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    """Run `args` with a terminal of rows x cols as its stdio (crictl -t reads its size from it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    if send:
        os.write(master, send)
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_with_a_tty_gets_a_terminal_of_the_clients_size(node: Node, transport: str) -> None:
    cid = node.run(["sleep", "1000"])
    base = [tool("crictl"), "--runtime-endpoint", node.daemon.endpoint, "exec", "-it", "--transport", transport, cid]
    code, out = _under_pty([*base, "busybox", "tty"], 24, 80)
    assert code == 0, out
    assert re.search(rb"/dev/pts/\d+", out), out
    code, out = _under_pty([*base, "busybox", "stty", "size"], 37, 111)
    assert code == 0, out
    assert b"37 111" in out, out
    code, out = _under_pty([*base, "sh", "-c", "exit 5"], 24, 80)
    assert code == 1 and b"command terminated with exit code 5" in out, out


# --- attach -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_reaches_the_containers_stdin_and_stdout(node: Node, transport: str) -> None:
    cid = node.run(["sh", "-c", "read line; echo got $line; sleep 1"], stdin=True, stdin_once=True)
    done = node.crictl("attach", "-i", "--transport", transport, cid, input="hello\n", timeout=60)
    assert "got hello" in done.stdout, (done.stdout, done.stderr)


def test_attach_asking_for_stdin_of_a_container_without_stdin_is_refused(node: Node) -> None:
    cid = node.run(["sleep", "1000"])
    with pytest.raises(grpc.RpcError) as err:
        node.rt.Attach(api_pb2.AttachRequest(container_id=cid, stdin=True, stdout=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        node.rt.Attach(api_pb2.AttachRequest(container_id=cid, tty=True, stdout=True, stderr=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- port-forward -------------------------------------------------------------------------


def _httpd(node: Node, port: int, body: str) -> str:
    cid = node.run(["sh", "-c", f"mkdir -p /www{port} && echo {body} > /www{port}/index.html && exec busybox httpd -f -p {port} -h /www{port}"])
    deadline = time.monotonic() + 20
    while body not in node.crictl("exec", "-s", cid, "busybox", "wget", "-q", "-O-", f"http://127.0.0.1:{port}/").stdout:
        assert time.monotonic() < deadline, f"httpd on {port} did not come up"
        time.sleep(0.1)
    return cid


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_reaches_two_ports_in_the_pod_with_parallel_connections(node: Node, transport: str) -> None:
    _httpd(node, 8080, "eighty-eighty")
    _httpd(node, 9090, "ninety-ninety")
    local_a, local_b = free_port(), free_port()
    args = [tool("crictl"), "--runtime-endpoint", node.daemon.endpoint, "port-forward", "--transport", transport,
            node.pod_id, f"{local_a}:8080", f"{local_b}:9090"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(local_a)
        _wait_port(local_b)
        with ThreadPoolExecutor(10) as pool:
            urls = [f"http://127.0.0.1:{local_a if n % 2 else local_b}/" for n in range(20)]
            bodies = list(pool.map(lambda url: httpx.get(url, timeout=20).text, urls))
        assert bodies == ["eighty-eighty\n" if n % 2 else "ninety-ninety\n" for n in range(20)]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_port_forward_to_a_port_nobody_listens_on_is_reported_and_leaves_other_sessions(node: Node) -> None:
    """client-go ends its whole port-forward when an error stream speaks ("lost connection to
    pod"), so the live port runs in a second crictl: it must not notice the other one failing."""
    _httpd(node, 8081, "still-here")
    local_dead, local_live = free_port(), free_port()
    base = [tool("crictl"), "--runtime-endpoint", node.daemon.endpoint, "port-forward", node.pod_id]
    live = subprocess.Popen([*base, f"{local_live}:8081"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dead = subprocess.Popen([*base, f"{local_dead}:7000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(local_live)
        _wait_port(local_dead)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{local_dead}/", timeout=10)
        _, err = dead.communicate(timeout=20)
        assert "error forwarding port 7000" in err and "connection refused" in err, err
        for _ in range(3):
            assert httpx.get(f"http://127.0.0.1:{local_live}/", timeout=10).text == "still-here\n"
    finally:
        for proc in (live, dead):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


# --- tokens -------------------------------------------------------------------------------


def _upgrade(url: str, path: str | None = None) -> int:
    """The HTTP status a websocket upgrade to `url` (or `path` on its server) gets."""
    parsed = urllib.parse.urlsplit(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        request = (
            f"GET {path or parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"
        )
        s.sendall(request.encode())
        head = s.recv(4096).decode(errors="replace")
    return int(head.split()[1])


def test_a_stream_url_works_once_expires_and_cannot_be_guessed_or_reused_elsewhere(node: Node) -> None:
    cid = node.run(["sleep", "1000"])
    exec_request = api_pb2.ExecRequest(container_id=cid, cmd=["sh", "-c", ":"], stdout=True)
    url = node.rt.Exec(exec_request, timeout=10).url
    token = url.rsplit("/", 1)[1]
    assert len(token) >= 20 and url.startswith(_stream_url(node))
    assert _upgrade(url) == 101
    assert _upgrade(url) == 404, "a used token must not work again"
    other = node.rt.Exec(exec_request, timeout=10).url
    assert other != url
    assert _upgrade(other, "/attach/" + other.rsplit("/", 1)[1]) == 404, "an exec token is not an attach token"
    assert _upgrade(other) == 404, "a token presented on the wrong path is spent"
    assert _upgrade(url, "/exec/" + "A" * len(token)) == 404
    late = node.rt.Exec(exec_request, timeout=10).url
    time.sleep(3.5)
    assert _upgrade(late) == 404, "an expired token must not work"
    assert "404" in node.daemon.logs() or "token" in node.daemon.logs()


def test_streaming_requests_are_checked_before_a_url_is_issued(node: Node) -> None:
    cid = node.run(["sleep", "1000"])
    cases = [
        (lambda: node.rt.Exec(api_pb2.ExecRequest(container_id=cid, cmd=["true"]), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: node.rt.Exec(api_pb2.ExecRequest(container_id=cid, stdout=True), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: node.rt.Exec(api_pb2.ExecRequest(container_id="nope", cmd=["true"], stdout=True), timeout=10), grpc.StatusCode.NOT_FOUND),
        (lambda: node.rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=node.pod_id, port=[70000]), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: node.rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="nope", port=[80]), timeout=10), grpc.StatusCode.NOT_FOUND),
    ]  # fmt: skip
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, err.value.details()
    exited = node.run(["sh", "-c", "exit 0"])
    deadline = time.monotonic() + 10
    while node.rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=exited), timeout=10).status.state != api_pb2.CONTAINER_EXITED:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as err:
        node.rt.Exec(api_pb2.ExecRequest(container_id=exited, cmd=["true"], stdout=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- many sessions, no leaks ----------------------------------------------------------------


def _daemon_fds_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def _exec_processes(cid: str) -> list[int]:
    """`runc exec` processes of the container, and what they run (our sessions' commands)."""
    found = []
    for pid in all_pids():
        args = [a.decode(errors="replace") for a in argv(pid)]
        if (cid in args and "exec" in args) or any("echo session-" in a for a in args):
            found.append(pid)
    return found


def test_twenty_concurrent_exec_sessions_get_their_own_output_and_leave_nothing_behind(node: Node) -> None:
    cid = node.run(["sleep", "1000"])
    pid = node.daemon.proc.pid

    def one(n: int) -> tuple[str, str]:
        done = node.crictl("exec", "--transport", TRANSPORTS[n % 2], cid, "sh", "-c", f"sleep 0.5; echo session-{n}; exit {n % 7}")
        code = re.search(r"command terminated with exit code (\d+)", done.stderr)
        return (code.group(1) if code else str(done.returncode)), done.stdout

    with ThreadPoolExecutor(20) as pool:  # a first round: the thread pools grow to what 20 calls need
        list(pool.map(one, range(20)))
    time.sleep(1)
    before = _daemon_fds_threads(pid)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert results == [(str(n % 7), f"session-{n}\n") for n in range(20)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_exec_processes(cid) or _daemon_fds_threads(pid)[0] > before[0] + 5):
        time.sleep(0.2)
    assert _exec_processes(cid) == []
    after = _daemon_fds_threads(pid)
    # a leak would be one per session (+20); the thread pools may still grow by a few
    assert after[0] <= before[0] + 5, f"fds {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 8, f"threads {before[1]} -> {after[1]}"


def test_a_client_that_disconnects_leaves_no_process(node: Node) -> None:
    cid = node.run(["sleep", "1000"])
    args = [tool("crictl"), "--runtime-endpoint", node.daemon.endpoint, "exec", cid, "sleep", "777"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    top = node.crictl("exec", cid, "busybox", "ps")
    deadline = time.monotonic() + 10
    while "sleep 777" not in top.stdout and time.monotonic() < deadline:
        time.sleep(0.2)
        top = node.crictl("exec", cid, "busybox", "ps")
    assert "sleep 777" in top.stdout
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while "sleep 777" in node.crictl("exec", cid, "busybox", "ps").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "sleep 777" not in node.crictl("exec", cid, "busybox", "ps").stdout
    assert node.crictl("exec", cid, "echo", "still-fine").stdout == "still-fine\n"


# --- tracing ------------------------------------------------------------------------------


def test_each_session_is_a_span_in_the_trace_of_the_rpc_that_issued_its_url(
    make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage, receiver: OTLPReceiver
) -> None:
    netdir = bridge_network(tmp_path / "net.d", "pycrio-stream", BRIDGE, SUBNET, filename="10-stream.conflist")
    daemon = make_daemon(
        name="traced",
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "/pycrio-stream-traced-{tmp_path.name}"\n'
            f'[pycrio.tracing]\nenable_tracing = true\ntracing_endpoint = "{receiver.endpoint}"\n'
            "tracing_sampling_rate_per_million = 1000000\n"
        ),
    )
    daemon.crictl("pull", busybox.reference)
    node = Node(daemon, tmp_path, busybox.reference)
    try:
        cid = node.run(["sleep", "1000"])
        done = node.crictl("exec", cid, "sh", "-c", "echo traced; exit 2")
        assert "exit code 2" in done.stderr
    finally:
        node.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=node.pod_id), timeout=60)
        node.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=node.pod_id), timeout=60)
        node.channel.close()
        daemon.stop()
        cgroups.remove_cgroup(f"/pycrio-stream-traced-{tmp_path.name}")
    sessions = receiver.spans(lambda s: s.name == "stream.exec")
    rpcs = receiver.spans(lambda s: s.name.endswith("RuntimeService/Exec") and s.service == "pycrio")
    assert len(sessions) == 1 and len(rpcs) == 1, [s.name for s in receiver.spans()]
    session, rpc = sessions[0], rpcs[0]
    assert session.trace_id == rpc.trace_id and session.parent_span_id == rpc.span_id
    assert (rpc.trace_id, rpc.span_id) in session.links
    assert session.attributes["container.id"] == cid and session.attributes["exit_code"] == 2
    assert session.attributes["stream.protocol"] == "spdy"
    assert session.attributes["bytes_out"] >= len("traced\n")
    assert any("exit code 2" in e.get("log.message", "") for e in session.log_events()), session.events


# --- TLS ----------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost (crictl's default --tls-sni) and a
    client certificate, all signed by the CA."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pycrio-test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)  # fmt: skip
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pycrio-test-{name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        (directory / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory)  # fmt: skip
    return {n: directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_exec_over_tls_with_client_certificates(
    make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage
) -> None:
    certs = _certificates(tmp_path / "pki")
    netdir = bridge_network(tmp_path / "net.d", "pycrio-stream", BRIDGE, SUBNET, filename="10-stream.conflist")
    parent = f"/pycrio-stream-tls-{tmp_path.name}"
    daemon = make_daemon(
        name="tls",
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{parent}"\n'
            f'[pycrio.api]\nstream_tls_cert = "{certs["server.crt"]}"\nstream_tls_key = "{certs["server.key"]}"\n'
            f'stream_tls_ca = "{certs["ca.crt"]}"\n'
        ),
    )
    daemon.crictl("pull", busybox.reference)
    node = Node(daemon, tmp_path, busybox.reference)
    try:
        assert _stream_url(node).startswith("https://127.0.0.1:")
        cid = node.run(["sleep", "1000"])
        tls = ["--tls-ca", str(certs["ca.crt"]), "--tls-cert", str(certs["client.crt"]), "--tls-key", str(certs["client.key"])]
        done = node.crictl("exec", *tls, cid, "echo", "over-tls")
        assert (done.returncode, done.stdout) == (0, "over-tls\n"), done.stderr
        refused = node.crictl("exec", "--tls-ca", str(certs["ca.crt"]), cid, "echo", "no-client-cert")
        assert refused.returncode != 0 and "no-client-cert" not in refused.stdout
    finally:
        node.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=node.pod_id), timeout=60)
        node.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=node.pod_id), timeout=60)
        node.channel.close()
        daemon.stop()
        cgroups.remove_cgroup(parent)

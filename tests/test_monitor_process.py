"""The real `pycrio-monitor` process: daemonizing, its socket, its request loop, its tracing.

The shell's tests run the real command around a small fake supervisor (`FakeSupervisor`, injected
through main.supervisor_factory by `python -c`), so what they check is the shell itself: readiness,
session, subreaper, cgroup, socket, error conversion, streams and spans. They speak the wire
protocol with framing.read_sync/write_sync as the daemon does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import pytest

from pycrio.monitor import framing
from pycrio.monitor import monitor_pb2 as pb

if TYPE_CHECKING:  # not imported at run time: the fake monitor imports this module, and gRPC must stay out
    from tests.otlp_receiver import OTLPReceiver

REPO = Path(__file__).resolve().parent.parent
MONITOR = REPO / ".venv" / "bin" / "pycrio-monitor"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PR_SET_CHILD_SUBREAPER = 36
OK, INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED, INTERNAL = 0, 3, 5, 12, 13
SPAN_KIND_SERVER = 2
WAIT = 15.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, subreaper)")


# -- the fake supervisor (runs inside the monitor process) -------------------------------------


class FakeSupervisor:
    """Just enough of ContainerSupervisor for the shell: one container "c1"; "boom" is a bug."""

    def __init__(self, pod_id: str) -> None:
        self.pod_id = pod_id
        self.exits: asyncio.Queue[pb.ContainerState] = asyncio.Queue()

    async def restore(self) -> None:
        if os.environ.get("FAKE_RESTORE_FAIL"):
            from pycrio.errors import FailedPrecondition

            raise FailedPrecondition(f"exit records of pod {self.pod_id} are unreadable")

    def _known(self, container_id: str) -> None:
        from pycrio.errors import NotFound

        if container_id == "boom":
            raise RuntimeError("kaboom")
        if container_id != "c1":
            raise NotFound(f"container {container_id} not found in pod {self.pod_id}")

    async def create(self, req: pb.CreateContainerRequest) -> int:
        # An orphan, as a container's init is once `runc create` exits: `sh` forks `sleep`, exits.
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!", stdout=subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return int(out)

    async def start(self, container_id: str) -> None:
        self._known(container_id)

    async def kill(self, container_id: str, signal: int) -> None:
        self._known(container_id)
        self.exits.put_nowait(pb.ContainerState(container_id=container_id, state="stopped", exited=True, exit_code=128 + signal))

    async def delete(self, container_id: str) -> None:
        self._known(container_id)

    def state(self, container_id: str) -> pb.ContainerState:
        self._known(container_id)
        return pb.ContainerState(container_id=container_id, state="running", pid=os.getpid())

    async def exec_sync(self, req: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
        self._known(req.container_id)
        if req.cmd[0] == "slow":
            await asyncio.sleep(float(req.cmd[1]))
        return pb.ExecSyncResponse(exit_code=0, stdout=" ".join(req.cmd).encode())

    async def reopen_log(self, container_id: str) -> None:
        self._known(container_id)

    async def set_window_size(self, container_id: str, width: int, height: int) -> None:
        self._known(container_id)

    async def exec_stream(self, req: pb.ServeExecRequest, io: Any) -> int:
        """Echoes stdin to stdout (upper-cased on stderr), reports the first resize, exits 3."""
        self._known(req.container_id)
        if req.tty:
            size = await io.resizes.get()
            await io.write_stdout(f"size {size.width}x{size.height}\n".encode())
        while True:
            data = await io.read_stdin()
            if not data:
                break
            await io.write_stdout(data)
            await io.write_stderr(data.upper())
        return 3

    async def attach_stream(self, req: pb.ServeAttachRequest, io: Any) -> None:
        self._known(req.container_id)
        await io.write_stdout(b"attached\n")
        await io.client_gone.wait()

    async def watch_exits(self) -> AsyncIterator[pb.ContainerState]:
        while True:
            yield await self.exits.get()

    async def shutdown(self) -> None:
        pass


def run_with_fake() -> None:
    """`python -c` entry: the real pycrio-monitor main around FakeSupervisor."""
    from pycrio.monitor import main

    main.supervisor_factory = lambda options, loop: FakeSupervisor(options.pod_id)
    sys.argv[0] = "pycrio-monitor"
    main.main()


FAKE_COMMAND = [sys.executable, "-c", "from tests.test_monitor_process import run_with_fake; run_with_fake()"]


# -- driving a monitor -------------------------------------------------------------------------


def _prctl_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


class Monitor:
    """One monitor's directories, command line and process; `call` sends one request."""

    def __init__(self, base: Path, pod_id: str = "", extra: list[str] | None = None, command: list[str] | None = None) -> None:
        self.base = base
        self.pod_id = pod_id or uuid.uuid4().hex
        self.socket = base / "monitor.sock"
        self.state_dir = base / "state"
        self.log_file = base / "monitor.log"
        self.extra = extra or []
        self.command = command or FAKE_COMMAND
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            *self.command,
            "--pod-id", self.pod_id,
            "--socket", str(self.socket),
            "--state-dir", str(self.state_dir),
            "--runtime-root", str(self.base / "runc"),
            "--log-file", str(self.log_file),
            *self.extra,
        ]

    def daemonize(self, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
        """Run the command; it returns once the monitor serves (or failed to)."""
        result = subprocess.run(self.argv(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if result.returncode == 0:
            self.pid = int((self.state_dir / "monitor.pid").read_text())
        return result

    def foreground(self) -> "Monitor":
        self.proc = subprocess.Popen([*self.argv(), "--foreground"], cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT
        while not (self.state_dir / "monitor.pid").exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"monitor exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "monitor not ready"
            time.sleep(0.02)
        self.pid = self.proc.pid
        return self

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(str(self.socket))
        return sock

    def call(self, request: pb.Request, sock: socket.socket | None = None) -> pb.Response:
        own = sock is None
        conn = sock or self.connect()
        try:
            framing.write_sync(conn, request)
            response = framing.read_sync(conn, pb.Response)
            assert response is not None, "monitor closed the connection"
            return response
        finally:
            if own:
                conn.close()

    def wait_exit(self, timeout: float = WAIT) -> int | None:
        """The monitor's exit code (a daemonized one is our child: the test process is a subreaper);
        None once gone for one forked by a zygote (the zygote's child: its status is not ours)."""
        if self.proc is not None:
            return self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                if not Path(f"/proc/{self.pid}").exists():
                    return None
            else:
                if pid:
                    return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        raise AssertionError(f"monitor {self.pid} still running")

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            try:
                self.wait_exit(5)
            except (AssertionError, ChildProcessError):
                pass


@pytest.fixture
def monitors(tmp_path: Path) -> Iterator[Any]:
    """Factory of monitors; daemonized ones get re-parented to this (subreaper) test process."""
    made: list[Monitor] = []
    _prctl_subreaper(True)

    def factory(**kwargs: Any) -> Monitor:
        base = Path(f"/tmp/pcm-{uuid.uuid4().hex[:8]}")  # short: sun_path holds 107 bytes
        base.mkdir()
        monitor = Monitor(base, **kwargs)
        made.append(monitor)
        return monitor

    try:
        yield factory
    finally:
        _prctl_subreaper(False)
        for monitor in made:
            monitor.kill()
            for pid in pids_running(str(monitor.base)):  # a zygote started with a socket in it
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            subprocess.run(["rm", "-rf", str(monitor.base)], check=False)


def pids_running(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a test's own directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def version_request(**trace: str) -> pb.Request:
    return pb.Request(uuid=str(uuid.uuid4()), trace=trace, version=pb.VersionRequest())


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


# -- tests -------------------------------------------------------------------------------------


def test_help_documents_every_flag() -> None:
    result = subprocess.run([str(MONITOR), "--help"], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    for flag in (
        "--pod-id", "--socket", "--state-dir", "--runtime-path", "--runtime-root", "--cgroup", "--log-level",
        "--log-file", "--enable-tracing", "--tracing-endpoint", "--tracing-sampling-rate-per-million", "--foreground",
    ):
        assert flag in result.stdout
    bad = subprocess.run(
        [str(MONITOR), "--pod-id", "p", "--socket", "/tmp/x.sock", "--state-dir", "/tmp/x", "--runtime-root", "/tmp/r",
         "--tracing-sampling-rate-per-million", "2000000"],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert bad.returncode == 2 and "between 0 and 1000000" in bad.stderr


def test_daemonized_monitor_serves_version_then_shutdown_exits_0(monitors: Any) -> None:
    monitor = monitors()
    result = monitor.daemonize()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    # a session of its own, and the socket only for root
    stat_fields = Path(f"/proc/{monitor.pid}/stat").read_text().rpartition(")")[2].split()
    assert int(stat_fields[3]) == monitor.pid  # session id: it called setsid
    assert stat.S_IMODE(os.stat(monitor.socket).st_mode) == 0o600
    response = monitor.call(version_request())
    assert response.code == OK and response.WhichOneof("result") == "version"
    assert response.version.pid == monitor.pid and response.version.pod_id == monitor.pod_id
    assert response.version.version
    assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
    assert monitor.wait_exit() == 0
    assert not monitor.socket.exists()
    assert not (monitor.state_dir / "monitor.pid").exists()
    assert "serving pod" in monitor.log_file.read_text()


def test_foreground_monitor_exits_0_on_shutdown_and_on_sigterm(monitors: Any) -> None:
    monitor = monitors().foreground()
    assert monitor.call(version_request()).version.pid == monitor.pid
    assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
    assert monitor.wait_exit() == 0
    assert not monitor.socket.exists()

    again = monitors().foreground()
    again.call(version_request())
    os.kill(again.pid, signal.SIGTERM)
    assert again.wait_exit() == 0
    assert not again.socket.exists()
    assert "SIGTERM received" in again.log_file.read_text()


def test_empty_and_unknown_operations_are_refused_and_the_connection_goes_on(monitors: Any) -> None:
    monitor = monitors().foreground()
    with monitor.connect() as conn:
        empty = monitor.call(pb.Request(uuid="u1"), conn)
        assert empty.code == INVALID_ARGUMENT and "no operation" in empty.error
        # a request from a newer daemon: an operation field this monitor does not know (99)
        newer = bytes([0x9A, 0x06, 0x00])  # field 99, length-delimited, empty: tag varint 794, length 0
        conn.sendall(len(newer).to_bytes(4, "big") + newer)
        unknown = framing.read_sync(conn, pb.Response)
        assert unknown is not None and unknown.code == UNIMPLEMENTED and "field 99" in unknown.error
        assert monitor.call(version_request(), conn).version.pid == monitor.pid


def test_supervisor_errors_become_codes_and_a_bug_is_internal(monitors: Any) -> None:
    monitor = monitors().foreground()
    with monitor.connect() as conn:
        missing = monitor.call(pb.Request(container_state=pb.ContainerStateRequest(container_id="nope")), conn)
        assert missing.code == NOT_FOUND and missing.error == f"container nope not found in pod {monitor.pod_id}"
        bug = monitor.call(pb.Request(kill_container=pb.KillContainerRequest(container_id="boom", signal=9)), conn)
        assert bug.code == INTERNAL and bug.error == "RuntimeError: kaboom"
        no_id = monitor.call(pb.Request(start_container=pb.StartContainerRequest()), conn)
        assert no_id.code == INVALID_ARGUMENT and "container_id is empty" in no_id.error
        bad_signal = monitor.call(pb.Request(kill_container=pb.KillContainerRequest(container_id="c1", signal=99)), conn)
        assert bad_signal.code == INVALID_ARGUMENT and "signal 99" in bad_signal.error
        state = monitor.call(pb.Request(container_state=pb.ContainerStateRequest(container_id="c1")), conn)
        assert state.code == OK and state.container_state.state == "running"
    log = monitor.log_file.read_text()
    assert "RuntimeError: kaboom" in log and "Traceback" in log  # the bug is logged with its stack


def test_a_malformed_frame_closes_only_its_connection(monitors: Any) -> None:
    monitor = monitors().foreground()
    with monitor.connect() as good, monitor.connect() as huge, monitor.connect() as garbage:
        assert monitor.call(version_request(), good).code == OK
        huge.sendall(b"\xff\xff\xff\xff")  # a 4 GiB frame announced
        answer = framing.read_sync(huge, pb.Response)
        assert answer is not None and answer.code == INVALID_ARGUMENT and "limit" in answer.error
        assert huge.recv(1) == b""  # then closed
        garbage.sendall(b"\x00\x00\x00\x03\xff\xff\xff")  # not a protobuf Request
        answer = framing.read_sync(garbage, pb.Response)
        assert answer is not None and answer.code == INVALID_ARGUMENT and "malformed request" in answer.error
        assert garbage.recv(1) == b""
        assert monitor.call(version_request(), good).code == OK
    assert monitor.call(version_request()).code == OK


def test_two_clients_are_served_at_once(monitors: Any) -> None:
    monitor = monitors().foreground()
    with monitor.connect() as slow, monitor.connect() as quick:
        framing.write_sync(slow, pb.Request(exec_sync=pb.ExecSyncRequest(container_id="c1", cmd=["slow", "1.5"])))
        time.sleep(0.1)
        started = time.monotonic()
        assert monitor.call(version_request(), quick).code == OK
        assert time.monotonic() - started < 0.5  # not queued behind the slow exec
        answer = framing.read_sync(slow, pb.Response)
        assert answer is not None and answer.exec_sync.stdout == b"slow 1.5"


def test_watch_exits_streams_exits_until_the_watcher_leaves(monitors: Any) -> None:
    monitor = monitors().foreground()
    watcher = monitor.connect()
    framing.write_sync(watcher, pb.Request(watch_exits=pb.WatchExitsRequest()))
    opened = framing.read_sync(watcher, pb.Response)
    assert opened is not None and opened.code == OK and opened.WhichOneof("result") == "watch_exits"
    monitor.call(pb.Request(kill_container=pb.KillContainerRequest(container_id="c1", signal=9)))
    frame = framing.read_sync(watcher, pb.StreamFrame)
    assert frame is not None and frame.exit.container_id == "c1" and frame.exit.exit_code == 137
    watcher.close()
    assert monitor.call(version_request()).code == OK


def test_exec_and_attach_streams(monitors: Any) -> None:
    monitor = monitors().foreground()
    with monitor.connect() as conn:
        framing.write_sync(conn, pb.Request(serve_exec=pb.ServeExecRequest(
            container_id="c1", cmd=["cat"], stdin=True, stdout=True, stderr=True)))
        assert framing.read_sync(conn, pb.Response).code == OK  # type: ignore[union-attr]
        framing.write_sync(conn, pb.StreamFrame(stdin=b"hello"))
        framing.write_sync(conn, pb.StreamFrame(stdin_eof=True))
        frames = []
        while True:
            frame = framing.read_sync(conn, pb.StreamFrame)
            assert frame is not None
            frames.append(frame)
            if frame.WhichOneof("frame") == "exit_code":
                break
        assert b"".join(f.stdout for f in frames) == b"hello"
        assert b"".join(f.stderr for f in frames) == b"HELLO"
        assert frames[-1].exit_code == 3
        assert conn.recv(1) == b""  # the session's connection ends with it
    with monitor.connect() as conn:  # tty: one output stream, the first size arrives as a frame
        framing.write_sync(conn, pb.Request(serve_exec=pb.ServeExecRequest(
            container_id="c1", cmd=["sh"], tty=True, stdin=True, stdout=True, stderr=True)))
        assert framing.read_sync(conn, pb.Response).code == OK  # type: ignore[union-attr]
        framing.write_sync(conn, pb.StreamFrame(resize=pb.TerminalSize(width=80, height=24)))
        framing.write_sync(conn, pb.StreamFrame(stdin=b"x"))
        framing.write_sync(conn, pb.StreamFrame(stdin_eof=True))
        out = b""
        while (frame := framing.read_sync(conn, pb.StreamFrame)) and frame.WhichOneof("frame") != "exit_code":
            assert frame.WhichOneof("frame") == "stdout"
            out += frame.stdout
        assert out == b"size 80x24\nxX"
    with monitor.connect() as conn:  # an unknown container: an error Response, no stream
        framing.write_sync(conn, pb.Request(serve_attach=pb.ServeAttachRequest(container_id="nope", stdout=True)))
        answer = framing.read_sync(conn, pb.Response)
        assert answer is not None and answer.code == NOT_FOUND
    with monitor.connect() as conn:
        framing.write_sync(conn, pb.Request(serve_attach=pb.ServeAttachRequest(container_id="c1", stdout=True)))
        assert framing.read_sync(conn, pb.Response).code == OK  # type: ignore[union-attr]
        assert framing.read_sync(conn, pb.StreamFrame).stdout == b"attached\n"  # type: ignore[union-attr]
    assert monitor.call(version_request()).code == OK  # the attach ended when its client left


def test_readiness_failure_makes_the_command_exit_1_with_the_reason(monitors: Any) -> None:
    monitor = monitors()
    monitor.socket = monitor.base / "missing" / "monitor.sock"
    started = time.monotonic()
    result = monitor.daemonize()
    assert result.returncode == 1
    assert f"cannot bind {monitor.socket}: its directory {monitor.socket.parent} does not exist" in result.stderr
    assert monitor.pod_id in result.stderr
    assert time.monotonic() - started < 10
    assert not (monitor.state_dir / "monitor.pid").exists()

    failing = monitors()
    result = subprocess.run(failing.argv(), cwd=REPO, capture_output=True, text=True, timeout=WAIT,
                            env={**os.environ, "FAKE_RESTORE_FAIL": "1"})
    assert result.returncode == 1 and "exit records of pod" in result.stderr and "unreadable" in result.stderr
    assert not failing.socket.exists()


def test_a_second_monitor_on_a_live_socket_is_refused_a_stale_one_replaced(monitors: Any) -> None:
    first = monitors()
    assert first.daemonize().returncode == 0
    second = Monitor(first.base, pod_id=first.pod_id)
    second.state_dir = first.base / "state2"
    result = second.daemonize()
    assert result.returncode == 1 and "another process already serves" in result.stderr
    assert first.call(version_request()).version.pid == first.pid
    first.kill()  # SIGKILL leaves the socket file behind
    assert first.socket.exists()
    third = Monitor(first.base, pod_id=first.pod_id)
    third.state_dir = first.base / "state3"
    assert third.daemonize().returncode == 0
    assert third.call(version_request()).version.pid == third.pid
    third.kill()


def test_monitor_is_a_child_subreaper(monitors: Any) -> None:
    monitor = monitors()
    assert monitor.daemonize().returncode == 0
    response = monitor.call(pb.Request(create_container=pb.CreateContainerRequest(container_id="c1", bundle="/b")))
    assert response.code == OK
    orphan = response.create_container.pid
    try:
        # its parent (sh) exited: it was re-parented to the monitor, not to init
        assert proc_status(orphan)["PPid"] == str(monitor.pid)
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_monitor_joins_its_cgroup(monitors: Any) -> None:
    from pycrio.oci.cgroups import remove_cgroup

    cgroup = f"/pycrio-monitor-test-{uuid.uuid4().hex[:8]}"
    monitor = monitors(extra=["--cgroup", cgroup])
    try:
        assert monitor.daemonize().returncode == 0
        lines = Path(f"/proc/{monitor.pid}/cgroup").read_text().splitlines()
        controllers = {line.split(":")[1]: line.split(":", 2)[2] for line in lines}
        for name in ("memory", "pids", "cpu", "freezer", ""):  # "" is the v2 (unified) hierarchy
            if any(entry == name or entry.split(",")[0] == name for entry in controllers):
                path = next(p for entry, p in controllers.items() if entry == name or entry.split(",")[0] == name)
                assert path == cgroup, (name, lines)
        assert str(monitor.pid) in (CGROUP_ROOT / "memory" / cgroup.strip("/") / "cgroup.procs").read_text()
        assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
        assert monitor.wait_exit() == 0
    finally:
        monitor.kill()
        remove_cgroup(cgroup)
    assert not (CGROUP_ROOT / "memory" / cgroup.strip("/")).exists()


def _loaded(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


def test_traced_request_is_a_server_span_child_of_the_callers(monitors: Any, receiver: OTLPReceiver) -> None:
    monitor = monitors(extra=["--enable-tracing", "--tracing-endpoint", receiver.endpoint, "--log-level", "debug"])
    assert monitor.daemonize().returncode == 0
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request = pb.Request(
        uuid="req-1", trace={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        container_state=pb.ContainerStateRequest(container_id="nope"),
    )
    assert monitor.call(request).code == NOT_FOUND
    assert monitor.call(version_request()).code == OK  # no caller trace at rate 0: no span
    assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
    assert monitor.wait_exit() == 0  # spans flushed at exit (the batch delay is 5 s)
    spans = receiver.wait_for(lambda s: s.service == "pycrio-monitor", timeout=5)
    assert [s.name for s in spans] == ["container_state"]
    span = spans[0]
    assert span.trace_id == trace_id and span.parent_span_id == parent_id and span.kind == SPAN_KIND_SERVER
    assert span.attributes["uuid"] == "req-1" and span.attributes["container_id"] == "nope"
    assert span.attributes["pod.id"] == monitor.pod_id
    assert span.resource["service.name"] == "pycrio-monitor" and span.resource["pod.id"] == monitor.pod_id
    assert span.resource["process.pid"] == monitor.pid and span.resource["host.name"] == socket.gethostname()
    assert span.status_code == 2 and "NOT_FOUND" in span.status_message
    messages = [event["log.message"] for event in span.log_events()]
    assert any("container_state failed: NOT_FOUND" in m for m in messages), messages
    assert all(event["id"] == "req-1" for event in span.log_events())
    # the log line of that request carries the span's ids
    lines = [line for line in monitor.log_file.read_text().splitlines() if "container_state failed" in line]
    assert lines and f"trace_id={trace_id}" in lines[0] and f"span_id={span.span_id}" in lines[0]


def test_tracing_is_off_without_grpc_and_configure_tracing_turns_it_on(monitors: Any, receiver: OTLPReceiver) -> None:
    monitor = monitors()
    assert monitor.daemonize().returncode == 0
    assert not _loaded(monitor.pid, "cygrpc")  # neither gRPC nor the OTLP exporter was imported
    traced = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}
    assert monitor.call(version_request(**traced)).code == OK
    on = pb.ConfigureTracingRequest(
        tracing=pb.TracingSettings(enabled=True, endpoint=receiver.endpoint, sampling_rate_per_million=1_000_000)
    )
    assert monitor.call(pb.Request(configure_tracing=on)).code == OK
    assert _loaded(monitor.pid, "cygrpc")
    assert monitor.call(version_request()).code == OK  # rate 1e6: a root span
    bad = pb.ConfigureTracingRequest(tracing=pb.TracingSettings(enabled=True, endpoint="http://x:1/"))
    answer = monitor.call(pb.Request(configure_tracing=bad))
    assert answer.code == INVALID_ARGUMENT and "host:port" in answer.error
    off = pb.ConfigureTracingRequest(tracing=pb.TracingSettings(enabled=False))
    assert monitor.call(pb.Request(configure_tracing=off)).code == OK
    assert monitor.call(version_request(**traced)).code == OK  # off again: no span
    assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
    assert monitor.wait_exit() == 0
    names = [s.name for s in receiver.settle(quiet=1.0, timeout=5) if s.service == "pycrio-monitor"]
    assert sorted(names) == ["configure_tracing", "version"], names


# -- end to end: the real pycrio-monitor with the real ContainerSupervisor and runc -------------

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "sleep", "cat", "true")
needs_runc = pytest.mark.skipif(not Path(RUNC).exists() or not Path(BUSYBOX).exists(), reason="needs runc and busybox")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs").resolve()
    (root / "bin").mkdir()
    import shutil

    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


def write_bundle(bundle: Path, rootfs: Path, args: list[str], cgroup: str) -> None:
    import json

    bundle.mkdir(parents=True)
    subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = args
    spec["process"]["terminal"] = False
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["linux"]["cgroupsPath"] = cgroup  # explicit: the test shell's own memory cgroup is not ours
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]
    (bundle / "config.json").write_text(json.dumps(spec))


def runc_list(root: Path) -> list[str]:
    out = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True, check=False)
    return out.stdout.split()


def real_monitor(monitors: Any, **kwargs: Any) -> Monitor:
    return monitors(command=[str(MONITOR)], **kwargs)


@needs_runc
@pytest.mark.parametrize("zygote", [False, True], ids=["daemonized", "zygote"])
def test_real_monitor_runs_a_container_from_create_to_delete(monitors: Any, rootfs: Path, zygote: bool) -> None:
    from pycrio.oci.cgroups import remove_cgroup

    parent = f"/pycrio-monitor-test-{uuid.uuid4().hex[:8]}"
    monitor = real_monitor(monitors, extra=["--runtime-path", RUNC, "--cgroup", f"{parent}/monitor"])
    if zygote:
        monitor.extra += ["--zygote-socket", str(monitor.base / "zygote.sock")]
    runc_root = monitor.base / "runc"
    try:
        assert monitor.daemonize().returncode == 0
        assert monitor.call(version_request()).version.pid == monitor.pid
        watcher = monitor.connect()
        framing.write_sync(watcher, pb.Request(watch_exits=pb.WatchExitsRequest()))
        assert framing.read_sync(watcher, pb.Response).code == OK  # type: ignore[union-attr]

        bundle = monitor.base / "bundle"
        write_bundle(bundle, rootfs, ["sh", "-c", "echo hello; echo oops >&2; exec sleep 1000"], f"{parent}/c1")
        log_path = monitor.base / "c1.log"
        created = monitor.call(pb.Request(uuid="create-1", create_container=pb.CreateContainerRequest(
            container_id="c1", bundle=str(bundle), log_path=str(log_path))))
        assert created.code == OK, created.error
        init = created.create_container.pid
        assert proc_status(init)["PPid"] == str(monitor.pid)  # runc exited: the init is the monitor's child
        state = monitor.call(pb.Request(container_state=pb.ContainerStateRequest(container_id="c1")))
        assert (state.container_state.state, state.container_state.pid) == ("created", init)

        assert monitor.call(pb.Request(start_container=pb.StartContainerRequest(container_id="c1"))).code == OK
        assert monitor.call(pb.Request(container_state=pb.ContainerStateRequest(container_id="c1"))).container_state.state == "running"

        echo = monitor.call(pb.Request(exec_sync=pb.ExecSyncRequest(container_id="c1", cmd=["sh", "-c", "echo hi; exit 4"])))
        assert echo.code == OK and echo.exec_sync.stdout == b"hi\n" and echo.exec_sync.exit_code == 4
        started = time.monotonic()
        slow = monitor.call(pb.Request(exec_sync=pb.ExecSyncRequest(container_id="c1", cmd=["sleep", "30"], timeout=0.5)))
        assert slow.code == OK and slow.exec_sync.timed_out and time.monotonic() - started < 5

        again = monitor.call(pb.Request(create_container=pb.CreateContainerRequest(
            container_id="c1", bundle=str(bundle), log_path=str(log_path))))
        assert again.code == 6  # ALREADY_EXISTS, from the supervisor through rpc's one conversion

        assert monitor.call(pb.Request(kill_container=pb.KillContainerRequest(container_id="c1", signal=9))).code == OK
        frame = framing.read_sync(watcher, pb.StreamFrame)
        assert frame is not None and frame.exit.container_id == "c1" and frame.exit.exit_code == 137
        stopped = monitor.call(pb.Request(container_state=pb.ContainerStateRequest(container_id="c1"))).container_state
        assert (stopped.state, stopped.exit_code, stopped.exited) == ("stopped", 137, True)
        assert (monitor.state_dir / "exits" / "c1.json").exists()
        log_text = log_path.read_text()
        assert " stdout F hello\n" in log_text and " stderr F oops\n" in log_text

        assert monitor.call(pb.Request(delete_container=pb.DeleteContainerRequest(container_id="c1"))).code == OK
        assert runc_list(runc_root) == []
        missing = monitor.call(pb.Request(container_state=pb.ContainerStateRequest(container_id="c1")))
        assert missing.code == NOT_FOUND
        assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
        assert monitor.wait_exit() == (None if zygote else 0)
        assert watcher.recv(1) == b""  # the exit stream ends with the monitor
        watcher.close()
    finally:
        monitor.kill()
        for cid in runc_list(runc_root):
            subprocess.run([RUNC, "--root", str(runc_root), "delete", "--force", cid], check=False)
        time.sleep(0.1)
        remove_cgroup(parent)


@needs_runc
def test_real_monitor_traces_create_with_its_steps_under_the_callers_span(
    monitors: Any, rootfs: Path, receiver: OTLPReceiver
) -> None:
    from pycrio.oci.cgroups import remove_cgroup

    parent = f"/pycrio-monitor-test-{uuid.uuid4().hex[:8]}"
    monitor = real_monitor(monitors, extra=["--runtime-path", RUNC, "--enable-tracing", "--tracing-endpoint", receiver.endpoint])
    runc_root = monitor.base / "runc"
    try:
        assert monitor.daemonize().returncode == 0
        bundle = monitor.base / "bundle"
        write_bundle(bundle, rootfs, ["sleep", "1000"], f"{parent}/c1")
        trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        traced = {"traceparent": f"00-{trace_id}-{client_span}-01"}
        created = monitor.call(pb.Request(uuid="create-1", trace=traced, create_container=pb.CreateContainerRequest(
            container_id="c1", bundle=str(bundle), log_path=str(monitor.base / "c1.log"))))
        assert created.code == OK, created.error
        assert monitor.call(pb.Request(trace=traced, start_container=pb.StartContainerRequest(container_id="c1"))).code == OK
        assert monitor.call(pb.Request(trace=traced, exec_sync=pb.ExecSyncRequest(container_id="c1", cmd=["true"]))).code == OK
        monitor.call(pb.Request(delete_container=pb.DeleteContainerRequest(container_id="c1")))
        assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
        assert monitor.wait_exit() == 0
        spans = {s.name: s for s in receiver.settle(quiet=0.5, timeout=5) if s.trace_id == trace_id}
        for name in ("create_container", "start_container", "exec_sync_container"):
            assert spans[name].parent_span_id == client_span and spans[name].kind == SPAN_KIND_SERVER
            assert spans[name].attributes["container_id"] == "c1"
        create = spans["create_container"]
        assert create.attributes["uuid"] == "create-1" and create.resource["service.name"] == "pycrio-monitor"
        assert spans["runtime_create"].parent_span_id == create.span_id
        assert spans["log_pipe_setup"].parent_span_id == spans["runtime_create"].span_id
        assert spans["runtime_start"].parent_span_id == spans["start_container"].span_id
        assert spans["exec_wait"].parent_span_id == spans["exec_sync_container"].span_id
        assert any("created, init pid" in e["log.message"] for e in create.log_events())
        assert "delete_container" not in spans  # no caller trace at rate 0: no span
    finally:
        monitor.kill()
        for cid in runc_list(runc_root):
            subprocess.run([RUNC, "--root", str(runc_root), "delete", "--force", cid], check=False)
        time.sleep(0.1)
        remove_cgroup(parent)


def test_real_monitor_with_tracing_off_loads_no_grpc(monitors: Any) -> None:
    monitor = real_monitor(monitors)
    assert monitor.daemonize().returncode == 0
    assert monitor.call(version_request()).code == OK
    maps = Path(f"/proc/{monitor.pid}/maps").read_text()
    assert "cygrpc" not in maps and "_ssl" not in maps
    assert len(os.listdir(f"/proc/{monitor.pid}/task")) == 1  # one thread: the asyncio loop


def test_a_hung_collector_neither_slows_requests_nor_holds_the_exit(monitors: Any, black_hole: str) -> None:
    monitor = monitors(extra=["--enable-tracing", "--tracing-endpoint", black_hole, "--tracing-sampling-rate-per-million", "1000000"])
    assert monitor.daemonize().returncode == 0
    started = time.monotonic()
    for _ in range(20):
        assert monitor.call(version_request()).code == OK
    assert time.monotonic() - started < 2.0
    started = time.monotonic()
    assert monitor.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
    assert monitor.wait_exit() == 0
    assert time.monotonic() - started < 6.0  # the span flush gives up after its bound
    assert "not flushed" in monitor.log_file.read_text()


# -- the zygote: monitors forked from one pre-imported process ---------------------------------


def private_kib(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return int(fields["Private_Clean"].split()[0]) + int(fields["Private_Dirty"].split()[0])


def test_zygote_forks_monitors_that_share_its_pages(monitors: Any, receiver: OTLPReceiver) -> None:
    first = real_monitor(monitors)
    zygote_socket = first.base / "zygote.sock"
    first.extra = ["--zygote-socket", str(zygote_socket)]
    second = real_monitor(monitors, extra=["--zygote-socket", str(zygote_socket), "--enable-tracing",
                                           "--tracing-endpoint", receiver.endpoint])
    alone = real_monitor(monitors)
    for monitor in (first, second, alone):
        result = monitor.daemonize()
        assert result.returncode == 0, result.stderr
    zygote = int(proc_status(first.pid)["PPid"])
    assert int(proc_status(second.pid)["PPid"]) == zygote != first.pid
    assert b"pycrio.monitor.zygote" in Path(f"/proc/{zygote}/cmdline").read_bytes()
    assert stat.S_IMODE(os.stat(zygote_socket).st_mode) == 0o600
    for monitor in (first, second):
        assert monitor.call(version_request()).version.pid == monitor.pid
        stat_fields = Path(f"/proc/{monitor.pid}/stat").read_text().rpartition(")")[2].split()
        assert int(stat_fields[3]) == monitor.pid  # a session of its own, as a daemonized one
    alone.call(version_request())
    # what a forked monitor does not share with the zygote is a fraction of an exec'd one's
    assert private_kib(first.pid) < private_kib(alone.pid) / 2, (private_kib(first.pid), private_kib(alone.pid))
    # the second traces (it loaded gRPC itself, the zygote did not); its resource is its own pid
    # gRPC and the OTLP exporter are pre-imported for tracing monitors, never started: the zygote
    # and a monitor with tracing off each run one thread (no gRPC core threads to fork)
    assert _loaded(zygote, "cygrpc")
    assert len(os.listdir(f"/proc/{zygote}/task")) == 1
    assert len(os.listdir(f"/proc/{first.pid}/task")) == 1
    traced = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}
    assert second.call(version_request(**traced)).code == OK
    assert second.call(pb.Request(shutdown=pb.ShutdownRequest())).code == OK
    assert second.wait_exit() is None and not second.socket.exists()
    spans = receiver.wait_for(lambda s: s.service == "pycrio-monitor", timeout=5)
    assert spans and spans[0].resource["process.pid"] == second.pid and spans[0].resource["pod.id"] == second.pod_id
    assert first.call(version_request()).code == OK


def test_a_killed_zygote_leaves_its_monitors_serving_and_the_next_command_starts_one(monitors: Any) -> None:
    first = real_monitor(monitors)
    zygote_socket = first.base / "zygote.sock"
    first.extra = ["--zygote-socket", str(zygote_socket)]
    assert first.daemonize().returncode == 0
    zygote = int(proc_status(first.pid)["PPid"])
    os.kill(zygote, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(zygote, 0)  # re-parented to this (subreaper) test process
    assert first.call(version_request()).version.pid == first.pid  # the monitor does not depend on it
    assert zygote_socket.exists()  # left behind by the kill: replaced by the next zygote
    second = real_monitor(monitors, extra=["--zygote-socket", str(zygote_socket)])
    result = second.daemonize()
    assert result.returncode == 0, result.stderr
    assert int(proc_status(second.pid)["PPid"]) not in (zygote, 1)
    assert second.call(version_request()).version.pid == second.pid
    # a start failure in a forked monitor is the command's exit 1 with the reason, as daemonized
    third = real_monitor(monitors, extra=["--zygote-socket", str(zygote_socket)])
    third.socket = third.base / "missing" / "monitor.sock"
    result = third.daemonize()
    assert result.returncode == 1 and "does not exist" in result.stderr and third.pod_id in result.stderr

"""Streaming exec, attach and port-forward of the "oci" runtime, driven through SessionIO (no HTTP)
against real runc and conmon containers: tiny busybox bundles as in test_runtime_oci.

Each test has its own runc root, bundles and state under tmp_path; afterwards no runc container,
conmon, exec'd process or cgroup of it may be left.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from pycrio.errors import FailedPrecondition, NotFound, Unavailable, Unimplemented
from pycrio.network.namespaces import pin_namespaces, run_in_netns, unpin_namespaces
from pycrio.oci import ContainerHandle, OCIRuntime, Runtime, streams_oci
from pycrio.procfs import all_pids, argv, stat_fields
from pycrio.streaming.session import SessionIO, TerminalSize
from tests.fd_census import fd_targets, leaked_fds
from tests.registry_fixture import free_port
from tests.test_runtime_oci import (
    BUSYBOX,
    RUNC,
    leftover_cgroups,
    leftover_processes,
    remove_cgroup,
    runc_list,
    write_bundle,
)

APPLETS = ("sh", "echo", "sleep", "cat", "true", "tty", "stty", "httpd", "kill")
CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT = 20.0  # upper bound of any one session in these tests

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(RUNC).exists() or shutil.which("conmon") is None,
    reason="needs root, runc and conmon",
)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streams-rootfs").resolve()
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www").mkdir()
    (root / "www" / "index.html").write_text("hello from the pod\n")
    return root


@dataclass
class Env:
    runtime: OCIRuntime
    base: Path
    rootfs: Path
    ids: list[str] = field(default_factory=list)

    def run(
        self,
        args: list[str],
        *,
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
        netns: Path | None = None,
        start: bool = True,
    ) -> ContainerHandle:
        """Create and start a container (its own network namespace, or the one pinned at `netns`)."""
        cid = f"s{uuid.uuid4().hex[:12]}"
        self.ids.append(cid)
        bundle = self.base / "bundles" / cid
        write_bundle(bundle, self.rootfs, cid, args, terminal=terminal, memory_limit=None)
        if netns is not None:
            spec = json.loads((bundle / "config.json").read_text())
            for namespace in spec["linux"]["namespaces"]:
                if namespace["type"] == "network":
                    namespace["path"] = str(netns)
            (bundle / "config.json").write_text(json.dumps(spec))
        handle = self.runtime.container_handle(
            cid, bundle, self.base / "logs" / f"{cid}.log", terminal=terminal, stdin=stdin, stdin_once=stdin_once
        )
        self.runtime.create(handle)
        if start:
            self.runtime.start(handle)
        return handle


@pytest.fixture
def env(tmp_path: Path, rootfs: Path) -> Iterator[Env]:
    runc_root = tmp_path / "runc"
    env = Env(OCIRuntime("runc", RUNC, runc_root), tmp_path, rootfs)
    yield env
    containers = runc_list(runc_root)
    for cid in containers:
        subprocess.run([RUNC, "--root", str(runc_root), "delete", "--force", cid], check=False)
    processes = leftover_processes(tmp_path)
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    if processes:
        time.sleep(0.2)
    cgroups = leftover_cgroups(env.ids)
    for path in cgroups:
        remove_cgroup(path)
    assert processes == [], f"processes left: {processes}"
    assert cgroups == [], f"cgroups left: {cgroups}"


def finish(env: Env, handle: ContainerHandle) -> None:
    """Remove a container the test is done with (the fixture checks that nothing is left)."""
    env.runtime.delete(handle)


class Sink:
    """One output stream as the client receives it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()

    async def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        self.changed.set()

    async def wait_for(self, needle: bytes | re.Pattern[bytes], timeout: float = WAIT) -> None:
        async def seen() -> None:
            while not (needle.search(self.data) if isinstance(needle, re.Pattern) else needle in self.data):
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            raise AssertionError(f"{needle!r} not received within {timeout}s; got {bytes(self.data)!r}") from None


def session(*, tty: bool = False, stdin: bool = False) -> tuple[SessionIO, Sink, Sink]:
    out, err = Sink(), Sink()
    io = SessionIO(
        tty=tty, stdin_enabled=stdin, stdout_enabled=True, stderr_enabled=True, stdout_sink=out, stderr_sink=err
    )
    return io, out, err


def run(coro: Awaitable[Any], timeout: float = WAIT) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def processes_with(marker: str, program: bytes | None = None) -> list[int]:
    """Live or zombie processes whose command line holds `marker` (and that run `program`)."""
    found = []
    for pid in all_pids():
        args = argv(pid)
        if marker.encode() in b" ".join(args) and (program is None or args[:1] == [program]):
            found.append(pid)
    return found


def zombies_of(pid: int) -> list[int]:
    return [p for p in all_pids() if (f := stat_fields(p)) and f[0] == "Z" and int(f[1]) == pid]


# -- exec without a tty ----------------------------------------------------------------------


def test_exec_separates_stdout_and_stderr_and_returns_the_exit_code(env: Env) -> None:
    handle = env.run(["sleep", "1000"])
    io, out, err = session()
    code = run(env.runtime.exec_stream(handle, ["sh", "-c", "echo out; echo err >&2; exit 3"], io))
    assert (code, bytes(out.data), bytes(err.data)) == (3, b"out\n", b"err\n")
    assert io.counters.bytes_out == 8
    finish(env, handle)


def test_exec_piped_stdin_ends_at_eof(env: Env) -> None:
    handle = env.run(["sleep", "1000"])

    async def scenario() -> int:
        io, out, _ = session(stdin=True)
        task = asyncio.ensure_future(env.runtime.exec_stream(handle, ["cat"], io))
        io.feed_stdin(b"hello\n")
        await out.wait_for(b"hello\n")  # copied while cat still runs
        io.feed_stdin(b"world\n")
        io.feed_stdin(b"")  # `echo ... | crictl exec -i c cat`: the client's EOF ends cat
        code = await task
        assert bytes(out.data) == b"hello\nworld\n"
        return code

    assert run(scenario()) == 0
    finish(env, handle)


def test_exec_without_stdin_reads_dev_null(env: Env) -> None:
    handle = env.run(["sleep", "1000"])
    io, out, _ = session()
    assert run(env.runtime.exec_stream(handle, ["sh", "-c", "cat; echo done"], io)) == 0
    assert bytes(out.data) == b"done\n"
    finish(env, handle)


def test_exec_signalled_command_reports_128_plus_signal(env: Env) -> None:
    handle = env.run(["sleep", "1000"])
    io, _, _ = session()
    assert run(env.runtime.exec_stream(handle, ["sh", "-c", "kill -TERM $$"], io)) == 128 + signal.SIGTERM
    finish(env, handle)


def test_exec_of_a_missing_binary_says_why(env: Env) -> None:
    handle = env.run(["sleep", "1000"])
    io, _, err = session()
    assert run(env.runtime.exec_stream(handle, ["/nope"], io)) == 255
    assert b"/nope" in err.data and b"no such file" in err.data
    finish(env, handle)


def test_exec_output_waits_for_a_slow_client(env: Env) -> None:
    """Back-pressure: a client that reads slowly loses nothing (the command blocks instead)."""
    handle = env.run(["sleep", "1000"])
    received = bytearray()

    async def slow(chunk: bytes) -> None:
        await asyncio.sleep(0.002)
        received.extend(chunk)

    io = SessionIO(tty=False, stdin_enabled=False, stdout_enabled=True, stderr_enabled=False, stdout_sink=slow)
    script = "i=0; while [ $i -lt 2000 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done"
    assert run(env.runtime.exec_stream(handle, ["sh", "-c", script], io), timeout=60) == 0
    lines = bytes(received).splitlines()
    assert len(lines) == 2000 and lines[-1].startswith(b"line-1999-")
    finish(env, handle)


def test_exec_ends_with_its_command_when_a_background_child_let_go_of_the_output(env: Env) -> None:
    """runc copies the command's output until every holder closed it (a background child that
    keeps it holds the session, as with CRI-O); one that let go of it does not."""
    handle = env.run(["sleep", "1000"])
    fds = fd_targets()
    io, out, _ = session()
    started = time.monotonic()
    assert run(env.runtime.exec_stream(handle, ["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo hi"], io)) == 0
    assert bytes(out.data) == b"hi\n"
    assert time.monotonic() - started < 5
    assert leaked_fds(fds) == {}
    finish(env, handle)


def test_exec_streams_the_client_did_not_ask_for_are_dropped(env: Env) -> None:
    handle = env.run(["sleep", "1000"])
    out = Sink()
    io = SessionIO(tty=False, stdin_enabled=False, stdout_enabled=True, stderr_enabled=False, stdout_sink=out)
    assert run(env.runtime.exec_stream(handle, ["sh", "-c", "echo visible; echo hidden >&2; echo end"], io)) == 0
    assert bytes(out.data) == b"visible\nend\n"
    finish(env, handle)


def test_exec_in_a_stopped_container_is_refused(env: Env) -> None:
    handle = env.run(["true"])
    assert env.runtime.wait_stopped(handle, 10)
    io, _, _ = session()
    with pytest.raises(FailedPrecondition, match="not running"):
        run(env.runtime.exec_stream(handle, ["true"], io))
    finish(env, handle)


# -- exec with a tty -------------------------------------------------------------------------


def terminal_text(data: bytearray) -> bytes:
    """What a terminal shows: runc clears ONLCR on the container's pty only once the process runs,
    so its first lines may come as "\\r\\r\\n" (both ptys add a CR), which displays as "\\r\\n"."""
    return re.sub(rb"\r+\n", b"\r\n", bytes(data))


def test_tty_exec_gets_a_pts_and_the_first_size(env: Env) -> None:
    handle = env.run(["sleep", "1000"])
    io, out, err = session(tty=True)
    assert run(env.runtime.exec_stream(handle, ["tty"], io)) == 0
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", terminal_text(out.data)), bytes(out.data)

    for _ in range(5):  # the size is set before the process runs: never a 0 0 first
        io, out, err = session(tty=True)
        io.resizes.put_nowait(TerminalSize(width=100, height=30))  # sent before the process runs
        assert run(env.runtime.exec_stream(handle, ["sh", "-c", "stty size; echo oops >&2"], io)) == 0
        assert terminal_text(out.data) == b"30 100\r\noops\r\n"  # a terminal merges stderr into its output
        assert bytes(err.data) == b""
    finish(env, handle)


def test_tty_exec_follows_a_resize(env: Env) -> None:
    handle = env.run(["sleep", "1000"])

    async def scenario() -> int:
        io, out, _ = session(tty=True, stdin=True)
        io.resizes.put_nowait(TerminalSize(width=80, height=24))
        task = asyncio.ensure_future(env.runtime.exec_stream(handle, ["sh", "-c", "stty size; read x; stty size"], io))
        await out.wait_for(re.compile(rb"24 80\r+\n"))
        io.resizes.put_nowait(TerminalSize(width=132, height=50))
        await asyncio.sleep(0.3)  # runc copies the new size on SIGWINCH
        io.feed_stdin(b"go\r")
        code = await task
        assert terminal_text(out.data).endswith(b"50 132\r\n"), bytes(out.data)
        return code

    assert run(scenario()) == 0
    finish(env, handle)


def test_tty_exec_stdin_eof_ends_input_like_ctrl_d(env: Env) -> None:
    handle = env.run(["sleep", "1000"])

    async def scenario() -> int:
        io, out, _ = session(tty=True, stdin=True)
        task = asyncio.ensure_future(env.runtime.exec_stream(handle, ["sh", "-c", "cat; echo cat-done"], io))
        io.feed_stdin(b"partial")  # no newline: one ^D hands the line over, a second one ends it
        io.feed_stdin(b"")
        code = await task
        assert b"cat-done" in out.data, bytes(out.data)
        return code

    assert run(scenario()) == 0
    finish(env, handle)


# -- a client that goes away -----------------------------------------------------------------


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
def test_client_gone_kills_the_exec_and_leaves_nothing(env: Env, tty: bool) -> None:
    handle = env.run(["sleep", "1000"])
    marker = str(100000 + uuid.uuid4().int % 100000)

    async def scenario() -> None:
        io, _, _ = session(tty=tty, stdin=True)
        task = asyncio.ensure_future(
            env.runtime.exec_stream(handle, ["sh", "-c", f"sleep {marker}; echo never"], io)
        )
        deadline = time.monotonic() + WAIT
        while not processes_with(f"sleep {marker}", b"sleep"):
            assert time.monotonic() < deadline, "the exec never started"
            await asyncio.sleep(0.05)
        runc_execs = [p for p in processes_with(handle.id) if b"exec" in argv(p)]
        assert runc_execs
        started = time.monotonic()
        io.client_gone.set()
        await task  # ends once its processes are gone
        assert time.monotonic() - started < 3
        assert processes_with(f"sleep {marker}") == []
        assert not any(p in all_pids() for p in runc_execs)

    run(scenario())
    init_pid = env.runtime.status(handle).pid
    assert zombies_of(init_pid) == [] and zombies_of(os.getpid()) == []
    assert list(handle.state_dir.glob("exec-*")) == []  # pid and process files removed
    assert env.runtime.status(handle).state == "running"  # the container itself is untouched
    finish(env, handle)


def test_cancelled_exec_kills_its_process(env: Env) -> None:
    """The stream server stopping (its tasks cancelled) must not leave the exec running."""
    handle = env.run(["sleep", "1000"])
    marker = str(200000 + uuid.uuid4().int % 100000)

    async def scenario() -> None:
        io, _, _ = session()
        task = asyncio.ensure_future(env.runtime.exec_stream(handle, ["sleep", marker], io))
        while not processes_with(f"sleep {marker}", b"sleep"):
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert processes_with(f"sleep {marker}") == []
    finish(env, handle)


def test_sessions_leave_no_fd_thread_or_process(env: Env) -> None:
    handle = env.run(["sleep", "1000"])

    async def sessions() -> list[int]:
        codes = []
        for tty in (False, True, False, True):
            io, _, _ = session(tty=tty, stdin=True)
            io.feed_stdin(b"x\n")
            io.feed_stdin(b"")
            codes.append(await env.runtime.exec_stream(handle, ["sh", "-c", "cat >/dev/null; exit 7"], io))
        # and 20 at once
        ios = [session()[0] for _ in range(20)]
        runs = (env.runtime.exec_stream(handle, ["sh", "-c", f"exit {i}"], io) for i, io in enumerate(ios))
        codes += await asyncio.gather(*runs)
        return codes

    run(sessions(), timeout=60)  # warm up: the loop and the child watcher make their first fds once
    fds, threads = fd_targets(), threading.active_count()
    assert run(sessions(), timeout=60) == [7, 7, 7, 7, *range(20)]
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)  # the child watcher's waitpid threads end with their processes
    assert leaked_fds(fds) == {}
    assert threading.active_count() <= threads
    assert zombies_of(os.getpid()) == []
    assert [p for p in processes_with(handle.id) if b"exec" in argv(p)] == []
    finish(env, handle)


def test_exec_on_a_loop_in_another_thread(env: Env) -> None:
    """The stream server runs its loop in a thread of its own: subprocesses work there too."""
    handle = env.run(["sleep", "1000"])
    result: list[Any] = []

    def serve() -> None:
        io, out, _ = session()
        code = run(env.runtime.exec_stream(handle, ["echo", "from-thread"], io))
        result.append((code, bytes(out.data)))

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(WAIT)
    assert result == [(0, b"from-thread\n")]
    finish(env, handle)


# -- attach ----------------------------------------------------------------------------------

READ_LOOP = ["sh", "-c", "while read l; do echo got $l; echo err $l >&2; done; echo stdin-closed"]


def test_attach_sends_stdin_and_separates_output(env: Env) -> None:
    handle = env.run(READ_LOOP, stdin=True)

    async def scenario() -> None:
        io, out, err = session(stdin=True)
        task = asyncio.ensure_future(env.runtime.attach_stream(handle, io))
        await asyncio.sleep(0.2)  # conmon accepts the connection (output sent before that is not ours)
        io.feed_stdin(b"hello\n")
        await out.wait_for(b"got hello\n")
        await err.wait_for(b"err hello\n")
        assert b"err" not in out.data and b"got" not in err.data
        io.client_gone.set()
        await task

    run(scenario())
    # stdin stays open (not stdin_once): a second attach still reaches the same loop
    async def again() -> None:
        io, out, _ = session(stdin=True)
        task = asyncio.ensure_future(env.runtime.attach_stream(handle, io))
        await asyncio.sleep(0.2)
        io.feed_stdin(b"again\n")
        await out.wait_for(b"got again\n")
        io.feed_stdin(b"")  # stdin kept open for the next attach: the session ends here (as CRI-O)
        await task

    run(again())
    assert env.runtime.status(handle).state == "running"
    assert b"got hello" in handle.log_path.read_bytes()  # conmon logged it too
    finish(env, handle)


def test_attach_large_input_and_output(env: Env) -> None:
    """Input is sent in packets conmon reads whole; output comes in conmon's 8 KiB packets."""
    handle = env.run(READ_LOOP, stdin=True)
    line = b"x" * 50000

    async def scenario() -> None:
        io, out, _ = session(stdin=True)
        task = asyncio.ensure_future(env.runtime.attach_stream(handle, io))
        await asyncio.sleep(0.2)
        io.feed_stdin(line + b"\n")
        await out.wait_for(b"got " + line + b"\n")
        io.client_gone.set()
        await task

    run(scenario())
    finish(env, handle)


def test_attach_to_a_created_container_sees_its_first_output(env: Env) -> None:
    """kubectl run -it: the attach can come before the start; conmon listens from create on."""
    handle = env.run(["sh", "-c", "echo first; echo second"], start=False)

    async def scenario() -> None:
        io, out, _ = session()
        task = asyncio.ensure_future(env.runtime.attach_stream(handle, io))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(env.runtime.start, handle)
        await task
        assert bytes(out.data) == b"first\nsecond\n"

    run(scenario())
    finish(env, handle)


def test_attach_stdin_once_closes_the_container_stdin(env: Env) -> None:
    handle = env.run(READ_LOOP, stdin=True, stdin_once=True)

    async def scenario() -> None:
        io, out, _ = session(stdin=True)
        task = asyncio.ensure_future(env.runtime.attach_stream(handle, io))
        await asyncio.sleep(0.2)
        io.feed_stdin(b"one\n")
        io.feed_stdin(b"")  # conmon closes the container's stdin: the loop ends, the container exits
        await task  # ends by itself: conmon closed the socket
        assert bytes(out.data) == b"got one\nstdin-closed\n"

    run(scenario())
    assert env.runtime.wait_stopped(handle, 10)
    assert env.runtime.status(handle).exit_code == 0
    finish(env, handle)


def test_attach_without_stdin_streams_output_until_the_container_exits(env: Env) -> None:
    handle = env.run(["sh", "-c", "sleep 0.5; echo tick; sleep 0.5; echo last"])

    async def scenario() -> None:
        io, out, _ = session()
        await env.runtime.attach_stream(handle, io)  # returns when the container's output ends
        assert bytes(out.data) == b"tick\nlast\n"

    run(scenario())
    finish(env, handle)


def test_attach_tty_resizes_through_the_ctl_fifo(env: Env) -> None:
    handle = env.run(["sh", "-c", "while read l; do stty size; done"], terminal=True, stdin=True)

    async def scenario() -> None:
        io, out, _ = session(tty=True, stdin=True)
        task = asyncio.ensure_future(env.runtime.attach_stream(handle, io))
        await asyncio.sleep(0.2)
        io.resizes.put_nowait(TerminalSize(width=91, height=27))
        await asyncio.sleep(0.2)
        io.feed_stdin(b"x\n")
        await out.wait_for(b"27 91\r\n")
        io.client_gone.set()
        await task

    run(scenario())
    finish(env, handle)


def test_attach_to_a_stopped_container_is_refused(env: Env) -> None:
    handle = env.run(["true"])
    assert env.runtime.wait_stopped(handle, 10)
    io, _, _ = session()
    with pytest.raises(FailedPrecondition, match="not running"):
        run(env.runtime.attach_stream(handle, io))
    finish(env, handle)


# -- port-forward ----------------------------------------------------------------------------


@pytest.fixture
def pod_netns(tmp_path: Path) -> Iterator[Path]:
    """A pinned network namespace with lo up, as a pod has."""
    directory = tmp_path / "ns"
    pins = pin_namespaces(directory, ["net"])
    up = run_in_netns(pins["net"], ["ip", "link", "set", "lo", "up"])
    assert up.returncode == 0, up.stderr
    yield pins["net"]
    unpin_namespaces(directory)


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


def test_dial_port_in_the_pod_netns(env: Env, pod_netns: Path) -> None:
    handle = env.run(["httpd", "-f", "-p", "8080", "-h", "/www"], netns=pod_netns)
    loop_netns = os.readlink("/proc/thread-self/ns/net")

    async def fetch() -> bytes:
        return await http_get(*await env.runtime.dial_port(str(pod_netns), 8080))

    async def scenario() -> list[bytes]:
        for _ in range(100):  # httpd binds right after start
            try:
                first = await fetch()
                break
            except Unavailable:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("httpd never listened")
        return [first, *await asyncio.gather(*(fetch() for _ in range(5)))]

    threads = threading.active_count()
    responses = run(scenario())
    for response in responses:
        assert response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n", 1)[0]
        assert response.endswith(b"hello from the pod\n")
    assert os.readlink("/proc/thread-self/ns/net") == loop_netns  # this thread never moved
    # nothing listens on the host's 8080 for this: the connection was made in the pod
    assert threading.active_count() <= threads  # the namespace threads ended
    finish(env, handle)


def test_dial_port_falls_back_to_ipv6_loopback(pod_netns: Path) -> None:
    """CRI-O dials "localhost": a server listening only on ::1 in the pod is reached too."""
    if not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 on this host")

    def listener() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("::1", 0))
        sock.listen()
        sock.setblocking(False)
        return sock

    async def scenario() -> bytes:
        server = await streams_oci._in_netns(str(pod_netns), listener)  # made inside the pod's netns
        try:
            port = server.getsockname()[1]
            loop = asyncio.get_running_loop()
            reader, writer = await dial(str(pod_netns), port)
            peer, _ = await loop.sock_accept(server)
            with peer:
                writer.write(b"over v6")
                await writer.drain()
                data = await loop.sock_recv(peer, 100)
            writer.close()
            return data
        finally:
            server.close()

    assert run(scenario()) == b"over v6"


def test_dial_port_refused_says_where(pod_netns: Path) -> None:
    with pytest.raises(Unavailable) as caught:
        run(dial(str(pod_netns), 9))
    message = caught.value.message
    assert "port 9" in message and str(pod_netns) in message
    assert "127.0.0.1: connection refused" in message


def test_dial_port_on_the_host_network() -> None:
    port = free_port()

    async def scenario() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"echo:" + await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", port)
        async with server:
            reader, writer = await dial(None, port)
            writer.write(b"ping\n")
            await writer.drain()
            data = await reader.read()
            writer.close()
            return data

    assert run(scenario()) == b"echo:ping\n"


def test_dial_port_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="network namespace .* is gone"):
        run(dial(str(tmp_path / "no-such-netns"), 80))
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    with pytest.raises(FailedPrecondition, match="cannot enter the network namespace"):
        run(dial(str(not_a_netns), 80))


def dial(netns: str | None, port: int) -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return OCIRuntime("runc", RUNC, Path("/nonexistent")).dial_port(netns, port)


# -- the interface -----------------------------------------------------------------------------


def test_runtime_interface_defaults_are_unimplemented() -> None:
    methods: dict[str, Callable[..., Any]] = {name: lambda *a, **k: None for name in Runtime.__abstractmethods__}
    bare = type("BareRuntime", (Runtime,), {"name": "bare", **methods})()
    handle = ContainerHandle("c", Path("/b"), Path("/l"), Path("/s"))
    io, _, _ = session()
    for call in (bare.exec_stream(handle, ["true"], io), bare.attach_stream(handle, io), bare.dial_port(None, 80)):
        with pytest.raises(Unimplemented, match="runtime bare cannot"):
            run(call)

"""pycrio-monitor's container side (ChildReaper, ContainerLog, ContainerSupervisor) driven directly
in an asyncio loop, no socket, against the real runc with tiny busybox bundles.

Each test has its own runc root, state dir and cgroup parent (/pycrio-monitor-f2-<id>); afterwards
no runc container, container process, zombie or cgroup of it may be left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Iterator

import pytest

from pycrio.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pycrio.monitor import monitor_pb2
from pycrio.monitor.child_reaper import ChildReaper
from pycrio.monitor.container_log import STDERR, STDOUT, ContainerLog, format_lines
from pycrio.monitor.containers import ContainerSupervisor
from pycrio.oci.runtime import RuntimeCommandError
from pycrio.procfs import all_pids, stat_fields
from pycrio.streaming.session import SessionIO, TerminalSize
from tests.fd_census import fd_targets, leaked_fds
from tests.test_runtime_oci import BUSYBOX, RUNC, runc_list, write_bundle

APPLETS = ("sh", "echo", "sleep", "cat", "true", "stty", "head", "tr", "printf", "yes", "kill", "tty")
CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT = 30.0
LOG_LINE = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) (F|P) (.*)$")

needs_runc = pytest.mark.skipif(os.geteuid() != 0 or not Path(RUNC).exists(), reason="needs root and runc")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("monitor-rootfs").resolve()
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


@dataclass
class Env:
    base: Path
    rootfs: Path
    cgroup_parent: str = field(default_factory=lambda: f"pycrio-monitor-f2-{uuid.uuid4().hex[:10]}")
    ids: list[str] = field(default_factory=list)

    @property
    def runc_root(self) -> Path:
        return self.base / "runc"

    @property
    def state_dir(self) -> Path:
        return self.base / "monitor"

    def log_path(self, cid: str) -> Path:
        return self.base / "logs" / f"{cid}.log"

    def request(
        self,
        args: list[str],
        *,
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
        memory_limit: int | None = None,
        log_size_max: int = 0,
    ) -> monitor_pb2.CreateContainerRequest:
        """A fresh container id with its bundle written (a cgroup under this test's parent)."""
        cid = f"m{uuid.uuid4().hex[:12]}"
        self.ids.append(cid)
        bundle = self.base / "bundles" / cid
        write_bundle(bundle, self.rootfs, cid, args, terminal=terminal, memory_limit=memory_limit)
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = f"/{self.cgroup_parent}/{cid}"
        (bundle / "config.json").write_text(json.dumps(spec))
        return monitor_pb2.CreateContainerRequest(
            container_id=cid, bundle=str(bundle), log_path=str(self.log_path(cid)), terminal=terminal,
            stdin=stdin, stdin_once=stdin_once, log_size_max=log_size_max,
        )  # fmt: skip


def container_processes(env: Env) -> list[int]:
    """Processes in the containers' cgroups (any hierarchy)."""
    pids: set[int] = set()
    for procs in CGROUP_ROOT.glob(f"*/{env.cgroup_parent}/*/cgroup.procs"):
        pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def our_zombies() -> list[int]:
    me = os.getpid()
    return [p for p in all_pids() if (f := stat_fields(p)) and f[0] == "Z" and int(f[1]) == me]


def reap_leftovers() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture
def env(tmp_path: Path, rootfs: Path) -> Iterator[Env]:
    env = Env(tmp_path, rootfs)
    yield env
    containers = runc_list(env.runc_root)
    for cid in containers:
        subprocess.run([RUNC, "--root", str(env.runc_root), "delete", "--force", cid], check=False)
    processes = container_processes(env)
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    if processes:
        time.sleep(0.2)
    reap_leftovers()
    cgroups = [p for p in CGROUP_ROOT.glob(f"*/{env.cgroup_parent}") if p.is_dir()]
    for path in cgroups:
        for child in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
            child.rmdir()
        path.rmdir()
    assert containers == [], f"runc containers left: {containers}"
    assert processes == [], f"container processes left: {processes}"


def run(coro: Awaitable[Any], timeout: float = WAIT * 2) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@asynccontextmanager
async def monitor(env: Env) -> AsyncIterator[ContainerSupervisor]:
    """A ChildReaper and a ContainerSupervisor on the running loop, as pycrio-monitor makes them."""
    reaper = ChildReaper(asyncio.get_running_loop())
    supervisor = ContainerSupervisor("pod-f2", env.state_dir, RUNC, env.runc_root, reaper)
    try:
        await supervisor.restore()
        yield supervisor
    finally:
        await supervisor.shutdown()
        reaper.close()


async def next_exit(supervisor: ContainerSupervisor, timeout: float = WAIT) -> monitor_pb2.ContainerState:
    watch = supervisor.watch_exits()
    try:
        return await asyncio.wait_for(watch.__anext__(), timeout)
    finally:
        await watch.aclose()


async def wait_stopped(supervisor: ContainerSupervisor, cid: str, timeout: float = WAIT) -> monitor_pb2.ContainerState:
    deadline = time.monotonic() + timeout
    while (state := supervisor.state(cid)).state != "stopped":
        assert time.monotonic() < deadline, f"{cid} did not stop: {state}"
        await asyncio.sleep(0.02)
    return state


async def wait_for_log(path: Path, needle: bytes, timeout: float = WAIT) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        if needle in data:
            return data
        assert time.monotonic() < deadline, f"{needle!r} not in {path}: {data!r}"
        await asyncio.sleep(0.02)


def log_lines(path: Path) -> list[tuple[str, str, bytes]]:
    """(stream, tag, text) of each CRI log line; every line must be well formed."""
    lines = []
    data = path.read_bytes()
    assert data.endswith(b"\n") or not data
    for line in data.split(b"\n")[:-1]:  # not splitlines(): a tty's lines end in \r\n
        match = LOG_LINE.match(line)
        assert match, f"bad log line: {line!r}"
        lines.append((match[2].decode(), match[3].decode(), match[4]))
    return lines


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()

    async def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        self.changed.set()

    async def wait_for(self, needle: bytes, timeout: float = WAIT) -> None:
        async def seen() -> None:
            while needle not in self.data:
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            raise AssertionError(f"{needle!r} not received; got {bytes(self.data)!r}") from None


# -- ChildReaper -----------------------------------------------------------------------------


def test_reaper_codes_kept_statuses_and_asyncio_subprocesses() -> None:
    async def scenario() -> None:
        reaper = ChildReaper(asyncio.get_running_loop())
        try:
            # a status reaped before anyone waited is kept for the waiter
            quick = subprocess.Popen(["true"])
            pid = quick.pid
            quick.returncode = 0  # Popen must not reap it itself: the reaper does
            await asyncio.sleep(0.3)
            assert stat_fields(pid) is None  # reaped already
            assert await asyncio.wait_for(reaper.wait(pid), 5) == 0
            # a signal n is 128 + n
            slow = subprocess.Popen(["sleep", "100"])
            slow.returncode = 0
            waiting = reaper.wait(slow.pid)
            os.kill(slow.pid, signal.SIGKILL)
            assert await asyncio.wait_for(waiting, 5) == 128 + signal.SIGKILL
            # asyncio's subprocesses still get their own codes (the reaper is their watcher)
            proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 7")
            assert await asyncio.wait_for(proc.wait(), 5) == 7
            proc = await asyncio.create_subprocess_exec("sh", "-c", "kill -TERM $$")
            assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGTERM
            out = await asyncio.create_subprocess_exec("echo", "hi", stdout=asyncio.subprocess.PIPE)
            assert (await out.communicate())[0] == b"hi\n" and out.returncode == 0
            # a pid that is not our child fails its waiter instead of hanging it
            with pytest.raises(ChildProcessError):
                await asyncio.wait_for(reaper.wait(1), 5)
            assert our_zombies() == []
        finally:
            reaper.close()

    run(scenario())


def test_reaper_reaps_orphans_as_a_subreaper() -> None:
    async def scenario() -> None:
        reaper = ChildReaper(asyncio.get_running_loop())
        try:
            # the shell's background child is orphaned when the shell exits: it becomes ours
            proc = await asyncio.create_subprocess_exec(
                "sh", "-c", "sleep 0.5 >/dev/null & echo $!", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            orphan = int(out)
            assert int(stat_fields(orphan)[1]) == os.getpid()  # type: ignore[index]
            assert await asyncio.wait_for(reaper.wait(orphan), 5) == 0
            assert our_zombies() == []
        finally:
            reaper.close()

    run(scenario())


# -- ContainerLog ----------------------------------------------------------------------------


def test_log_lines_partial_flags_and_timestamps(tmp_path: Path) -> None:
    lines = format_lines(STDOUT, b"one\ntwo\nthr", 1_700_000_000_123_456_789)
    assert lines == [
        b"2023-11-14T22:13:20.123456789Z stdout F one\n",
        b"2023-11-14T22:13:20.123456789Z stdout F two\n",
        b"2023-11-14T22:13:20.123456789Z stdout P thr\n",
    ]
    log = ContainerLog(tmp_path / "c.log")
    log.open()
    log.write(STDERR, b"ab")
    log.write(STDERR, b"cd\n\n")
    log.close()
    assert log_lines(tmp_path / "c.log") == [("stderr", "P", b"ab"), ("stderr", "F", b"cd"), ("stderr", "F", b"")]


def test_log_size_cap_truncates_as_conmon(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(path, max_size=150)
    log.open()
    log.write(STDOUT, b"a\nb\nc\n")  # 3 lines of 42 bytes
    log.write(STDOUT, b"d\ne\n")  # d would make 168 > 150: the file starts over at d
    assert [text for _, _, text in log_lines(path)] == [b"d", b"e"]
    assert log.size == path.stat().st_size == 84
    log.write(STDOUT, b"x" * 500 + b"\n")  # longer than the cap: written whole after a truncation
    assert [text for _, _, text in log_lines(path)] == [b"x" * 500]
    log.close()


def test_log_reopen_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(path)
    log.open()
    log.write(STDOUT, b"before\n")
    path.rename(tmp_path / "c.log.1")
    log.write(STDOUT, b"still old\n")  # until the reopen the renamed file gets the output
    log.reopen()
    log.write(STDOUT, b"after\n")
    log.close()
    assert [t for _, _, t in log_lines(tmp_path / "c.log.1")] == [b"before", b"still old"]
    assert [t for _, _, t in log_lines(path)] == [b"after"]
    assert not (tmp_path / "c.log.tmp").exists()


# -- lifecycle and logs ----------------------------------------------------------------------


@needs_runc
def test_create_start_logs_and_exit_code(env: Env) -> None:
    req = env.request(["sh", "-c", "echo out; echo err >&2; exit 3"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            pid = await supervisor.create(req)
            created = supervisor.state(req.container_id)
            assert (created.state, created.pid, created.exited) == ("created", pid, False)
            assert created.pid_start_time > 0
            assert int(stat_fields(pid)[1]) == os.getpid()  # type: ignore[index]  # reparented to us
            with pytest.raises(AlreadyExists):
                await supervisor.create(req)
            watch = supervisor.watch_exits()
            before = time.time_ns()
            await supervisor.start(req.container_id)
            exit_state = await asyncio.wait_for(watch.__anext__(), WAIT)
            await watch.aclose()
            assert (exit_state.container_id, exit_state.state, exit_state.exit_code) == (req.container_id, "stopped", 3)
            state = supervisor.state(req.container_id)
            assert (state.state, state.exited, state.exit_code, state.oom_killed) == ("stopped", True, 3, False)
            assert before <= state.started_at <= state.finished_at <= time.time_ns()
            # the exit is on disk before it is reported
            record = json.loads((env.state_dir / "exits" / f"{req.container_id}.json").read_text())
            assert record == {"exit_code": 3, "finished_at": state.finished_at, "oom_killed": False,
                              "started_at": state.started_at}  # fmt: skip
            assert sorted(log_lines(env.log_path(req.container_id))) == [("stderr", "F", b"err"), ("stdout", "F", b"out")]
            with pytest.raises(FailedPrecondition, match="stopped"):
                await supervisor.kill(req.container_id, signal.SIGTERM)
            await supervisor.delete(req.container_id)
            with pytest.raises(NotFound):
                supervisor.state(req.container_id)
            assert not (env.state_dir / "exits" / f"{req.container_id}.json").exists()
            await supervisor.delete(req.container_id)  # twice is fine

    run(scenario())
    assert our_zombies() == []


def _runc_status(env: Env, cid: str) -> str:
    done = subprocess.run([RUNC, "--root", str(env.runc_root), "state", cid], capture_output=True, text=True)
    return json.loads(done.stdout)["status"] if done.returncode == 0 else done.stderr


def _runc_commands(caplog: pytest.LogCaptureFixture, subcommand: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("running: ") and
            f" {subcommand} " in r.getMessage()]  # fmt: skip


@needs_runc
def test_start_takes_the_init_off_runcs_exec_fifo_and_runc_agrees_it_runs(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    plain = env.request(["sh", "-c", "echo started; sleep 100"])
    hooked = env.request(["sh", "-c", "echo hooked; sleep 100"])
    spec_path = Path(hooked.bundle) / "config.json"
    spec = json.loads(spec_path.read_text())
    spec["hooks"] = {"createRuntime": [{"path": "/bin/true", "args": ["true"]}]}
    spec_path.write_text(json.dumps(spec))
    doomed = env.request(["sleep", "100"])
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            for req in (plain, hooked, doomed):
                await supervisor.create(req)
            fifo = env.runc_root / plain.container_id / "exec.fifo"
            assert fifo.exists() and _runc_status(env, plain.container_id) == "created"
            await supervisor.start(plain.container_id)
            assert supervisor.state(plain.container_id).state == "running"
            assert not fifo.exists()
            assert _runc_status(env, plain.container_id) == "running"
            await wait_for_log(env.log_path(plain.container_id), b"started")
            assert _runc_commands(caplog, "start") == []  # no runc process for it
            with pytest.raises(FailedPrecondition, match="not created"):
                await supervisor.start(plain.container_id)
            # a spec with hooks is started by runc itself (newer runc runs poststart hooks there)
            await supervisor.start(hooked.container_id)
            await wait_for_log(env.log_path(hooked.container_id), b"hooked")
            assert [c.split()[-1] for c in _runc_commands(caplog, "start")] == [hooked.container_id]
            assert _runc_status(env, hooked.container_id) == "running"
            # an init that died while waiting to be started: a clear error, not a hang
            # (started at once: the exit may or may not have been handled yet)
            os.kill(supervisor.state(doomed.container_id).pid, signal.SIGKILL)
            with pytest.raises(FailedPrecondition, match="exited before it was started|not created"):
                await supervisor.start(doomed.container_id)
            assert (await wait_stopped(supervisor, doomed.container_id)).exit_code == 128 + signal.SIGKILL
            for req in (plain, hooked, doomed):
                await supervisor.delete(req.container_id)

    run(scenario())
    assert our_zombies() == []


@needs_runc
def test_long_line_and_cut_line_are_partial(env: Env) -> None:
    # 20000 bytes on one line (more than a read), then a line the output ends without its newline
    req = env.request(["sh", "-c", "head -c 20000 /dev/zero | tr '\\0' a; echo; printf tail"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            await wait_stopped(supervisor, req.container_id)
            lines = log_lines(env.log_path(req.container_id))
            tags = [tag for _, tag, _ in lines]
            assert tags[-1] == "P" and lines[-1][2] == b"tail"  # cut at EOF
            long = lines[:-1]
            assert len(long) >= 3 and [t for _, t, _ in long[:-1]] == ["P"] * (len(long) - 1) and long[-1][1] == "F"
            assert b"".join(text for _, _, text in long) == b"a" * 20000
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_reopen_log_after_rotation(env: Env) -> None:
    req = env.request(["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.05; done"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            path = env.log_path(req.container_id)
            await wait_for_log(path, b"tick-2\n")
            rotated = path.with_name(path.name + ".1")
            path.rename(rotated)
            await supervisor.reopen_log(req.container_id)
            await wait_for_log(path, b"tick-")
            old = [int(t.split(b"-")[1]) for _, _, t in log_lines(rotated)]
            new = [int(t.split(b"-")[1]) for _, _, t in log_lines(path)]
            assert old == list(range(len(old))) and new[0] > old[-1]  # nothing lost, nothing twice
            await supervisor.kill(req.container_id, signal.SIGKILL)
            assert (await wait_stopped(supervisor, req.container_id)).exit_code == 128 + signal.SIGKILL
            with pytest.raises(FailedPrecondition, match="not running"):
                await supervisor.reopen_log(req.container_id)
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_log_size_max(env: Env) -> None:
    req = env.request(["sh", "-c", "i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); done"], log_size_max=2000)

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            await wait_stopped(supervisor, req.container_id)
            path = env.log_path(req.container_id)
            assert path.stat().st_size <= 2000
            texts = [t for _, _, t in log_lines(path)]
            assert texts[-1] == b"line-299" and texts[0] != b"line-0"  # truncated, then the latest lines
            numbers = [int(t.split(b"-")[1]) for t in texts]
            assert numbers == list(range(numbers[0], 300))
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_oom_killed(env: Env) -> None:
    grow = "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"
    req = env.request(["sh", "-c", grow], memory_limit=16 * 1024 * 1024)

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            state = await next_exit(supervisor)
            assert (state.exit_code, state.oom_killed) == (128 + signal.SIGKILL, True)
            assert supervisor.state(req.container_id).oom_killed
            record = json.loads((env.state_dir / "exits" / f"{req.container_id}.json").read_text())
            assert record["oom_killed"] is True
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_create_failure_says_why_and_leaves_nothing(env: Env) -> None:
    req = env.request(["/nope/missing-binary"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            fds = fd_targets()
            with pytest.raises(RuntimeCommandError) as caught:
                await supervisor.create(req)
            assert "/nope/missing-binary" in caught.value.message
            assert caught.value.message.startswith(f"create container {req.container_id}: `")
            with pytest.raises(NotFound):
                supervisor.state(req.container_id)
            assert runc_list(env.runc_root) == []
            assert leaked_fds(fds) == {}
            with pytest.raises(InvalidArgument):
                await supervisor.create(monitor_pb2.CreateContainerRequest(container_id="../x", bundle="/", log_path="/l"))

    run(scenario())
    assert our_zombies() == []


@needs_runc
def test_cancelled_create_leaves_nothing(env: Env) -> None:
    reqs = [env.request(["sleep", "1000"]) for _ in range(3)]

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            for delay, req in zip((0.0, 0.01, 0.025), reqs):  # runc create takes ~40 ms here
                task = asyncio.ensure_future(supervisor.create(req))
                await asyncio.sleep(delay)
                if task.done():  # a slow machine's create may not have begun yet, a fast one's be over
                    await supervisor.delete(req.container_id)
                    continue
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.3)  # the shielded cleanup
                with pytest.raises(NotFound):
                    supervisor.state(req.container_id)
            assert runc_list(env.runc_root) == []
            assert container_processes(env) == []

    run(scenario())
    assert our_zombies() == []


# -- exec ------------------------------------------------------------------------------------


@needs_runc
def test_exec_sync_output_exit_code_and_limit(env: Env) -> None:
    req = env.request(["sleep", "1000"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            with pytest.raises(FailedPrecondition, match="not running"):
                await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(container_id=req.container_id, cmd=["true"]))
            await supervisor.start(req.container_id)
            result = await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(
                container_id=req.container_id, cmd=["sh", "-c", "echo o; echo e >&2; exit 5"], timeout=10))  # fmt: skip
            assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (5, b"o\n", b"e\n", False)
            capped = await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(
                container_id=req.container_id, cmd=["sh", "-c", "yes | head -c 100000; echo short >&2"],
                output_limit=1000))  # fmt: skip
            assert (len(capped.stdout), capped.stdout_truncated) == (1000, True)
            assert (capped.stderr, capped.stderr_truncated, capped.exit_code) == (b"short\n", False, 0)
            missing = await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(container_id=req.container_id, cmd=["/nope"]))
            assert missing.exit_code != 0 and b"/nope" in missing.stderr
            await supervisor.delete(req.container_id)

    run(scenario())
    assert our_zombies() == []


@needs_runc
def test_exec_sync_timeout_kills_the_tree_and_reaps_it(env: Env) -> None:
    req = env.request(["sleep", "1000"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            started = time.monotonic()
            result = await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(
                container_id=req.container_id, cmd=["sh", "-c", "echo before; sleep 100; echo after"],
                timeout=0.5))  # fmt: skip
            elapsed = time.monotonic() - started
            assert result.timed_out and result.exit_code == -1
            assert result.stdout.startswith(b"before\n")
            assert 0.5 <= elapsed < 5, elapsed
            # only the init is left in the container's cgroup, and nothing of the exec is a zombie
            assert container_processes(env) == [supervisor.state(req.container_id).pid]
            assert our_zombies() == []
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_exec_stream_pipes(env: Env) -> None:
    req = env.request(["sleep", "1000"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            out, err = Sink(), Sink()
            io = SessionIO(tty=False, stdin_enabled=True, stdout_enabled=True, stderr_enabled=True,
                           stdout_sink=out, stderr_sink=err)  # fmt: skip
            stream = monitor_pb2.ServeExecRequest(container_id=req.container_id, cmd=["sh", "-c", "cat; echo e >&2; exit 4"],
                                                  stdin=True, stdout=True, stderr=True)  # fmt: skip
            task = asyncio.ensure_future(supervisor.exec_stream(stream, io))
            io.feed_stdin(b"hello\n")
            await out.wait_for(b"hello\n")
            io.feed_stdin(b"")
            assert await asyncio.wait_for(task, WAIT) == 4
            assert (bytes(out.data), bytes(err.data)) == (b"hello\n", b"e\n")
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_exec_stream_tty_first_size_and_resize(env: Env) -> None:
    req = env.request(["sleep", "1000"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            out = Sink()
            io = SessionIO(tty=True, stdin_enabled=True, stdout_enabled=True, stderr_enabled=False, stdout_sink=out)
            io.resizes.put_nowait(TerminalSize(width=80, height=24))
            stream = monitor_pb2.ServeExecRequest(container_id=req.container_id, cmd=["sh", "-c", "stty size; read x; stty size"],
                                                  tty=True, stdin=True, stdout=True)  # fmt: skip
            task = asyncio.ensure_future(supervisor.exec_stream(stream, io))
            await out.wait_for(b"24 80")
            io.resizes.put_nowait(TerminalSize(width=132, height=50))
            await asyncio.sleep(0.3)
            io.feed_stdin(b"go\r")
            assert await asyncio.wait_for(task, WAIT) == 0
            assert b"50 132" in out.data, bytes(out.data)
            await supervisor.delete(req.container_id)

    run(scenario())
    assert our_zombies() == []


# -- tty, attach -----------------------------------------------------------------------------


@needs_runc
def test_tty_container_window_size(env: Env) -> None:
    req = env.request(["sh", "-c", "read x; stty size; echo bye"], terminal=True, stdin=True)

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            await supervisor.set_window_size(req.container_id, 123, 45)
            out = Sink()
            io = SessionIO(tty=True, stdin_enabled=True, stdout_enabled=True, stderr_enabled=False, stdout_sink=out)
            attach = asyncio.ensure_future(supervisor.attach_stream(
                monitor_pb2.ServeAttachRequest(container_id=req.container_id, tty=True, stdin=True, stdout=True), io))
            await asyncio.sleep(0.1)
            io.feed_stdin(b"go\r")
            await out.wait_for(b"bye")
            await asyncio.wait_for(attach, WAIT)  # the container's output ended
            state = await wait_stopped(supervisor, req.container_id)
            assert state.exit_code == 0
            texts = [t for _, _, t in log_lines(env.log_path(req.container_id))]
            assert b"45 123\r" in texts and b"bye\r" in texts, texts  # ONLCR: \r\n, as conmon's
            assert {s for s, _, _ in log_lines(env.log_path(req.container_id))} == {"stdout"}
            assert b"45 123" in out.data
            await supervisor.delete(req.container_id)
            plain = env.request(["sleep", "1000"])
            await supervisor.create(plain)
            with pytest.raises(FailedPrecondition, match="no terminal"):
                await supervisor.set_window_size(plain.container_id, 80, 24)
            await supervisor.delete(plain.container_id)

    run(scenario())


@needs_runc
def test_attach_stdin_in_stdout_out_and_stdin_once(env: Env) -> None:
    req = env.request(["sh", "-c", "while read line; do echo got-$line; echo err-$line >&2; done; echo eof"],
                      stdin=True, stdin_once=True)  # fmt: skip

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            # attach before start (CRI-O allows it): nothing is missed
            out, err = Sink(), Sink()
            io = SessionIO(tty=False, stdin_enabled=True, stdout_enabled=True, stderr_enabled=True,
                           stdout_sink=out, stderr_sink=err)  # fmt: skip
            watcher = Sink()
            other = SessionIO(tty=False, stdin_enabled=False, stdout_enabled=True, stderr_enabled=False, stdout_sink=watcher)
            attach_req = monitor_pb2.ServeAttachRequest(container_id=req.container_id, stdin=True, stdout=True, stderr=True)
            first = asyncio.ensure_future(supervisor.attach_stream(attach_req, io))
            second = asyncio.ensure_future(supervisor.attach_stream(attach_req, other))  # a second viewer
            await asyncio.sleep(0.05)
            await supervisor.start(req.container_id)
            io.feed_stdin(b"one\n")
            await out.wait_for(b"got-one\n")
            await err.wait_for(b"err-one\n")
            io.feed_stdin(b"two\n")
            io.feed_stdin(b"")  # stdin_once: the first session's EOF closes the container's stdin
            await out.wait_for(b"eof\n")
            await asyncio.wait_for(asyncio.gather(first, second), WAIT)
            assert bytes(out.data) == b"got-one\ngot-two\neof\n"
            assert bytes(watcher.data) == bytes(out.data)
            assert (await wait_stopped(supervisor, req.container_id)).exit_code == 0
            assert ("stdout", "F", b"got-two") in log_lines(env.log_path(req.container_id))
            await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_attach_resize_and_stdin_left_open_between_sessions(env: Env) -> None:
    tty = env.request(["sh", "-c", "read x; stty size; read y"], terminal=True, stdin=True)
    piped = env.request(["cat"], stdin=True)  # stdin_once off: each session's EOF leaves it open

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            for req in (tty, piped):
                await supervisor.create(req)
                await supervisor.start(req.container_id)
            out = Sink()
            io = SessionIO(tty=True, stdin_enabled=True, stdout_enabled=True, stderr_enabled=False, stdout_sink=out)
            attach = asyncio.ensure_future(supervisor.attach_stream(
                monitor_pb2.ServeAttachRequest(container_id=tty.container_id, tty=True, stdin=True, stdout=True), io))
            io.resizes.put_nowait(TerminalSize(width=99, height=33))
            await asyncio.sleep(0.1)
            io.feed_stdin(b"a\r")
            await out.wait_for(b"33 99")
            io.client_gone.set()
            await asyncio.wait_for(attach, WAIT)
            assert supervisor.state(tty.container_id).state == "running"

            for word in (b"first", b"second"):
                out = Sink()
                io = SessionIO(tty=False, stdin_enabled=True, stdout_enabled=True, stderr_enabled=True, stdout_sink=out)
                attach = asyncio.ensure_future(supervisor.attach_stream(
                    monitor_pb2.ServeAttachRequest(container_id=piped.container_id, stdin=True, stdout=True), io))
                io.feed_stdin(word + b"\n")
                await out.wait_for(word + b"\n")
                io.feed_stdin(b"")
                await asyncio.wait_for(attach, WAIT)  # the session ends with its stdin
                assert supervisor.state(piped.container_id).state == "running"  # cat still reads
            # a created container can be killed before it ever starts
            early = env.request(["sleep", "1000"])
            await supervisor.create(early)
            await supervisor.kill(early.container_id, signal.SIGKILL)
            state = await wait_stopped(supervisor, early.container_id)
            assert (state.exit_code, state.started_at) == (128 + signal.SIGKILL, 0)
            with pytest.raises(FailedPrecondition, match="not created"):
                await supervisor.start(early.container_id)
            for req in (tty, piped, early):
                await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_attach_ends_when_the_client_goes(env: Env) -> None:
    req = env.request(["sh", "-c", "while true; do echo tick; sleep 0.05; done"])

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)

            async def stuck(chunk: bytes) -> None:
                await asyncio.sleep(3600)  # a client that never reads

            io = SessionIO(tty=False, stdin_enabled=False, stdout_enabled=True, stderr_enabled=False, stdout_sink=stuck)
            attach = asyncio.ensure_future(supervisor.attach_stream(
                monitor_pb2.ServeAttachRequest(container_id=req.container_id, stdout=True), io))
            path = env.log_path(req.container_id)
            size = len((await wait_for_log(path, b"tick")))
            await asyncio.sleep(0.5)
            assert path.stat().st_size > size  # the stuck session does not hold the log
            io.client_gone.set()
            await asyncio.wait_for(attach, WAIT)
            await supervisor.delete(req.container_id)

    run(scenario())


# -- restore, delete, shutdown ---------------------------------------------------------------


@needs_runc
def test_exit_record_survives_a_new_supervisor(env: Env) -> None:
    req = env.request(["sh", "-c", "exit 9"])

    async def first_monitor() -> None:
        async with monitor(env) as supervisor:
            await supervisor.create(req)
            await supervisor.start(req.container_id)
            await wait_stopped(supervisor, req.container_id)  # nobody watched it

    async def second_monitor() -> None:
        async with monitor(env) as supervisor:
            state = supervisor.state(req.container_id)
            assert (state.state, state.exited, state.exit_code) == ("stopped", True, 9)
            assert state.started_at > 0 and state.finished_at >= state.started_at
            # the exit nobody was told about comes first to the next watcher; a watcher that
            # closes before asking for more has not taken it (at least once: it comes again)
            assert (await next_exit(supervisor)).exit_code == 9
            watch = supervisor.watch_exits()
            assert (await asyncio.wait_for(watch.__anext__(), WAIT)).exit_code == 9
            with pytest.raises(TimeoutError):  # asking for the next one took it
                await asyncio.wait_for(watch.__anext__(), 0.3)
            with pytest.raises(TimeoutError):
                await next_exit(supervisor, timeout=0.3)
            with pytest.raises(FailedPrecondition):
                await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(container_id=req.container_id, cmd=["true"]))
            await supervisor.delete(req.container_id)  # runc's stopped container and the record go
            assert runc_list(env.runc_root) == []

    run(first_monitor())
    run(second_monitor())
    assert not (env.state_dir / "exits" / f"{req.container_id}.json").exists()


@needs_runc
def test_several_watchers_see_each_exit(env: Env) -> None:
    reqs = [env.request(["sh", "-c", f"sleep 0.{i}; exit {i}"]) for i in range(1, 4)]

    async def scenario() -> None:
        async with monitor(env) as supervisor:
            async def collect() -> list[tuple[str, int]]:
                seen = []
                async for state in supervisor.watch_exits():
                    seen.append((state.container_id, state.exit_code))
                    if len(seen) == len(reqs):
                        return seen
                return seen

            watchers = [asyncio.ensure_future(collect()) for _ in range(2)]
            await asyncio.sleep(0)
            for req in reqs:
                await supervisor.create(req)
                await supervisor.start(req.container_id)
            results = await asyncio.wait_for(asyncio.gather(*watchers), WAIT)
            expected = sorted((req.container_id, i) for i, req in enumerate(reqs, 1))
            assert [sorted(r) for r in results] == [expected, expected]
            for req in reqs:
                await supervisor.delete(req.container_id)

    run(scenario())


@needs_runc
def test_nothing_left_after_delete_and_shutdown(env: Env) -> None:
    plain = env.request(["sh", "-c", "echo hi; sleep 1000"], stdin=True)
    tty = env.request(["sleep", "1000"], terminal=True)

    async def scenario() -> None:
        fds = fd_targets()
        async with monitor(env) as supervisor:
            for req in (plain, tty):
                await supervisor.create(req)
                await supervisor.start(req.container_id)
            await wait_for_log(env.log_path(plain.container_id), b"hi")
            result = await supervisor.exec_sync(monitor_pb2.ExecSyncRequest(container_id=tty.container_id, cmd=["true"]))
            assert result.exit_code == 0
            for req in (plain, tty):
                await supervisor.delete(req.container_id)  # running: killed and removed
            assert runc_list(env.runc_root) == []
            assert container_processes(env) == []
            assert list((env.state_dir / "containers").iterdir()) == []
            assert list((env.state_dir / "exits").iterdir()) == []
        assert leaked_fds(fds) == {}

    run(scenario())
    assert our_zombies() == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""The "oci" runtime: one conmon per container supervising a runc (or runc-compatible) container.

conmon double-forks and stays behind as the container's subreaper: it writes the CRI log file,
the exit file (`<state_dir>/exits/<id>`, content = exit code, mtime = finish time) and the OOM
marker, so a container's exit code survives a daemon restart. runc is asked about everything else.

Exits are reported as they happen: one inotify instance per runtime watches the exit directory
of every container it supervises (CRI-O's exit monitor watches its one exits directory the same
way) and hands each new exit file to the exit callback.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import select
import selectors
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from pycrio.errors import FailedPrecondition, InvalidArgument, NotFound
from pycrio.oci import cgroups
from pycrio.oci.runtime import (
    EXEC_OUTPUT_LIMIT,
    STATE_CREATED,
    STATE_RUNNING,
    STATE_STOPPED,
    STATE_UNKNOWN,
    ContainerHandle,
    ExecResult,
    ExitCallback,
    Runtime,
    RuntimeCommandError,
    RuntimeStatus,
    log,
    log_command,
    run_command,
    runtime_error_text,
)
from pycrio.procfs import all_pids, process_start_time, stat_fields
from pycrio.tracing import step_span

if TYPE_CHECKING:
    from pycrio.streaming.session import SessionIO

CGROUP_ROOT = Path("/sys/fs/cgroup")
AVAILABLE_TTL = 30.0
_CREATE_TIMEOUT = 120.0
_COMMAND_TIMEOUT = 120.0
_EXIT_FILE_WAIT = 2.0
_CONMON_EXIT_WAIT = 5.0
_REOPEN_WAIT = 5.0
_EXEC_DRAIN_WAIT = 2.0
_EXEC_PIDFILE_WAIT = 1.0
_EXEC_REAP_WAIT = 0.5
_REOPEN_LOGS_EVENT = b"2 0 0\n"  # conmon's ctl fifo: "<type> <height> <width>", type 2 = reopen logs

# runc error texts that mean "no such container" / "not in a state for this"
_NOT_FOUND_HINTS = ("does not exist",)
_PRECONDITION_HINTS = ("not running", "has stopped", "stopped container", "already running", "paused")


@dataclass(frozen=True)
class _Paths:
    """Where conmon and we keep one container's files."""

    handle: ContainerHandle

    @property
    def state_dir(self) -> Path:
        return self.handle.state_dir

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "pidfile"

    @property
    def conmon_pidfile(self) -> Path:
        return self.state_dir / "conmon.pid"

    @property
    def conmon_start_file(self) -> Path:
        # conmon's start time (process_start_time) when it was spawned: a recycled pid is not it
        return self.state_dir / "conmon.start"

    @property
    def conmon_log(self) -> Path:
        return self.state_dir / "conmon.log"

    @property
    def exit_dir(self) -> Path:
        return self.state_dir / "exits"

    @property
    def exit_file(self) -> Path:
        return self.exit_dir / self.handle.id

    @property
    def persist_dir(self) -> Path:
        return self.state_dir / "persist"

    @property
    def attach_dir(self) -> Path:
        return self.state_dir / "attach"

    @property
    def started_file(self) -> Path:
        return self.state_dir / "started"

    @property
    def ctl_fifo(self) -> Path:
        # conmon puts its fifos and (with --full-attach) the attach socket in the bundle
        return self.handle.bundle / "ctl"

    @property
    def conmon_bundle_files(self) -> tuple[Path, ...]:
        bundle = self.handle.bundle
        return (bundle / "ctl", bundle / "winsz", bundle / "attach")

    @property
    def oom_files(self) -> tuple[Path, ...]:
        # conmon touches <persist>/oom and "oom" in its working directory (the state dir)
        return (self.persist_dir / "oom", self.state_dir / "oom")

    def make(self) -> None:
        for directory in (self.exit_dir, self.persist_dir, self.attach_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.handle.log_path.parent.mkdir(parents=True, exist_ok=True)


class OCIRuntime(Runtime):
    """conmon + an OCI runtime CLI (runc; crun where the host allows it)."""

    def __init__(
        self,
        name: str,
        runtime_path: str,
        runtime_root: Path,
        conmon_path: str = "conmon",
        conmon_cgroup: str = "",
    ) -> None:
        self.name = name
        self.runtime_path = runtime_path
        self.runtime_root = Path(runtime_root)
        self.conmon_path = conmon_path
        self.conmon_cgroup = conmon_cgroup  # cgroupfs path every conmon joins ("" = stay in ours)
        self.create_timeout = _CREATE_TIMEOUT
        self.command_timeout = _COMMAND_TIMEOUT
        self._available: tuple[float, tuple[bool, str]] | None = None
        self._watcher: _ExitWatcher | None = None
        self._watcher_lock = threading.Lock()

    # -- handles and exits -----------------------------------------------------------------

    def container_handle(
        self,
        container_id: str,
        bundle: Path,
        log_path: Path,
        *,
        pod_id: str = "",
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
    ) -> ContainerHandle:
        """conmon's files for the container live in `<bundle>/conmon` (see _Paths)."""
        return ContainerHandle(
            id=container_id, bundle=bundle, log_path=log_path, state_dir=bundle / "conmon",
            terminal=terminal, stdin=stdin, stdin_once=stdin_once, pod_id=pod_id,
        )  # fmt: skip

    def report_exits(self, callback: ExitCallback | None) -> None:
        super().report_exits(callback)
        if callback is None:
            with self._watcher_lock:
                watcher, self._watcher = self._watcher, None
            if watcher is not None:
                watcher.close()

    def restore(self, handle: ContainerHandle) -> None:
        self._watch(handle)

    def _watch(self, handle: ContainerHandle) -> None:
        """Report the exit of `handle` (when exits are reported at all)."""
        if self._exit_callback is None:
            return
        try:
            with self._watcher_lock:
                if self._watcher is None:
                    self._watcher = _ExitWatcher(self.name, self._report_exit)
                watcher = self._watcher
            watcher.watch(handle.id, _Paths(handle).exit_dir)
        except OSError as exc:  # e.g. ENOSPC: fs.inotify.max_user_watches; the safety re-check remains
            log.warning("cannot watch the exit of container %s: %s", handle.id, exc)

    def _unwatch(self, handle: ContainerHandle) -> None:
        watcher = self._watcher
        if watcher is not None:
            watcher.unwatch(handle.id)

    # -- Runtime ---------------------------------------------------------------------------

    def create(self, handle: ContainerHandle) -> int:
        with step_span("runtime_create", **{"container.id": handle.id}):
            paths = _Paths(handle)
            paths.make()
            for stale in (paths.exit_file, paths.started_file, paths.conmon_start_file, *paths.oom_files):
                stale.unlink(missing_ok=True)
            self._watch(handle)  # before conmon runs: no exit can come before the watch
            argv = self._conmon_argv(handle, paths)
            try:
                pid = self._spawn_conmon(handle, paths, argv)
            except BaseException:
                self._cleanup_failed_create(handle, paths)
                self._unwatch(handle)
                raise
            conmon = _read_int(paths.conmon_pidfile)
            if conmon:
                _write_atomic(paths.conmon_start_file, str(process_start_time(conmon)))
            return pid

    def start(self, handle: ContainerHandle) -> None:
        with step_span("runtime_start", **{"container.id": handle.id}):
            # taken before the call: a short-lived container may finish before runc start returns
            started_at = time.time_ns()
            self._runc("start", handle.id, what=f"start container {handle.id}")
            _write_atomic(_Paths(handle).started_file, str(started_at))

    def kill(self, handle: ContainerHandle, sig: int) -> None:
        with step_span("runtime_kill", **{"container.id": handle.id, "signal": int(sig)}):
            self._runc("kill", handle.id, str(int(sig)), what=f"signal {int(sig)} to container {handle.id}")

    def delete(self, handle: ContainerHandle) -> None:
        with step_span("runtime_delete", **{"container.id": handle.id}):
            paths = _Paths(handle)
            self._runc("delete", "--force", handle.id, what=f"delete container {handle.id}")
            self._wait_conmon_gone(paths)
            self._unwatch(handle)
            for path in (paths.pidfile, paths.conmon_pidfile, paths.conmon_start_file, *paths.conmon_bundle_files):
                path.unlink(missing_ok=True)

    def status(self, handle: ContainerHandle) -> RuntimeStatus:
        paths = _Paths(handle)
        exited = _read_exit_file(paths.exit_file)
        if exited is not None:
            return self._stopped_status(handle, paths, exited)
        pid, start = _init_under_conmon(paths)
        if pid:
            # The common cases on a busy node, answered from /proc without a `runc state` (~12 ms,
            # which made ListContainers take seconds with a few hundred created containers).
            if paths.started_file.exists():
                return RuntimeStatus(STATE_RUNNING, pid=pid, pid_start_time=start, started_at=_read_started(paths))
            return RuntimeStatus(STATE_CREATED, pid=pid, pid_start_time=start)
        state = self._runc_state(handle.id)
        if state is None:
            if _conmon_alive(paths):
                return RuntimeStatus(STATE_UNKNOWN, message=f"{self.name} has no container {handle.id} yet")
            raise NotFound(f"container {handle.id} not found by runtime {self.name}")
        return self._status_from_state(handle, paths, state)

    def exec_sync(
        self, handle: ContainerHandle, cmd: list[str], timeout: float | None, output_limit: int = EXEC_OUTPUT_LIMIT
    ) -> ExecResult:
        with step_span("runtime_exec", **{"container.id": handle.id}):
            if not cmd:
                raise InvalidArgument("exec needs a command")
            current = self.status(handle)
            if current.state != STATE_RUNNING:
                raise FailedPrecondition(f"container {handle.id} is {current.state}, not running: cannot exec")
            pidfile = handle.state_dir / f"exec-{uuid.uuid4().hex}.pid"
            try:
                return self._run_exec(handle, cmd, timeout, pidfile, output_limit)
            finally:
                pidfile.unlink(missing_ok=True)

    def reopen_log(self, handle: ContainerHandle) -> None:
        paths = _Paths(handle)
        current = self.status(handle)
        if current.state != STATE_RUNNING:
            raise FailedPrecondition(f"container {handle.id} is {current.state}, not running: cannot reopen its log")
        try:
            fd = os.open(paths.ctl_fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            # ENXIO: no reader, conmon is gone; ENOENT: it never ran for this bundle
            raise FailedPrecondition(
                f"cannot reopen the log of container {handle.id}: its conmon is not running ({exc.strerror})"
            ) from exc
        try:
            os.write(fd, _REOPEN_LOGS_EVENT)
        finally:
            os.close(fd)
        _wait_for(handle.log_path.exists, _REOPEN_WAIT)

    def update_resources(self, handle: ContainerHandle, linux_resources: dict[str, Any]) -> None:
        body = json.dumps(linux_resources).encode()
        self._runc("update", "--resources", "-", handle.id, input=body, what=f"update container {handle.id}")

    def available(self) -> tuple[bool, str]:
        """Checked at most every AVAILABLE_TTL s: callers ask on every CRI call."""
        cached = self._available
        if cached is not None and time.monotonic() - cached[0] < AVAILABLE_TTL:
            return cached[1]
        result = self._check_available()
        self._available = (time.monotonic(), result)
        return result

    def _check_available(self) -> tuple[bool, str]:
        for binary in (self.runtime_path, self.conmon_path):
            usable, why = _binary_runs(binary)
            if not usable:
                return False, why
        if Path(self.runtime_path).name.startswith("crun") and cgroups.hybrid_with_v2_controllers():
            return False, (
                f"crun refuses cgroups in hybrid mode: this host mounts cgroups v1 controllers under "
                f"{CGROUP_ROOT} and a cgroup v2 hierarchy with controllers at {CGROUP_ROOT}/unified; "
                f"use runc, or boot with cgroups v2 only (systemd.unified_cgroup_hierarchy=1)"
            )
        return True, ""

    # -- streaming (async, on the stream server's loop; see streams_oci) ---------------------

    async def exec_stream(self, handle: ContainerHandle, cmd: list[str], io: SessionIO) -> int:
        from pycrio.oci import streams_oci  # it builds on this module

        return await streams_oci.exec_stream(self, handle, cmd, io)

    async def attach_stream(self, handle: ContainerHandle, io: SessionIO) -> None:
        from pycrio.oci import streams_oci

        await streams_oci.attach_stream(self, handle, io)

    async def dial_port(
        self, netns_path: str | None, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from pycrio.oci import streams_oci

        return await streams_oci.dial_port(netns_path, port)

    # -- create ----------------------------------------------------------------------------

    def _conmon_argv(self, handle: ContainerHandle, paths: _Paths) -> list[str]:
        argv = [
            _resolve(self.conmon_path), "--api-version", "1",
            "-c", handle.id, "-u", handle.id, "-n", handle.id,
            "-r", _resolve(self.runtime_path),
            "-b", str(handle.bundle),
            "-p", str(paths.pidfile),
            "--conmon-pidfile", str(paths.conmon_pidfile),
            "--exit-dir", str(paths.exit_dir),
            "--persist-dir", str(paths.persist_dir),
            "--full-attach", "--socket-dir-path", str(paths.attach_dir),
            "-l", f"k8s-file:{handle.log_path}",
            "--log-level", "info",
            "--runtime-arg", f"--root={self.runtime_root}",
        ]  # fmt: skip
        if handle.terminal:
            argv.append("--terminal")
        if handle.stdin:
            argv.append("--stdin")
            if not handle.stdin_once:
                argv.append("--leave-stdin-open")
        return argv

    def _spawn_conmon(self, handle: ContainerHandle, paths: _Paths, argv: list[str]) -> int:
        """Start conmon, let it go on, and return the pid it reports through the sync pipe."""
        sync_r, sync_w = os.pipe()
        start_r, start_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("_OCI_", "NOTIFY_SOCKET", "LISTEN_"))}
        env.update(_OCI_SYNCPIPE=str(sync_w), _OCI_STARTPIPE=str(start_r))
        log_command(argv)
        deadline = time.monotonic() + self.create_timeout
        try:
            with open(paths.conmon_log, "ab") as out:
                proc = subprocess.Popen(
                    argv, env=env, pass_fds=(sync_w, start_r), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, cwd=handle.state_dir,
                    start_new_session=True,  # conmon must outlive us and our signals
                )  # fmt: skip
            os.close(sync_w)
            os.close(start_r)
            sync_w = start_r = -1
            # conmon blocks on the start pipe until we have placed it in its cgroup
            self._place_conmon(proc, argv)
            os.write(start_w, b"0")
            os.close(start_w)
            start_w = -1
            message = _read_sync_message(sync_r, deadline)
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except (TimeoutError, subprocess.TimeoutExpired) as exc:
            raise RuntimeCommandError(
                argv, f"conmon reported nothing within {self.create_timeout:.0f}s", what=f"create container {handle.id}"
            ) from exc
        finally:
            for fd in (sync_r, sync_w, start_r, start_w):
                if fd >= 0:
                    os.close(fd)
        return self._pid_from_sync(handle, paths, argv, message)

    def _place_conmon(self, proc: subprocess.Popen[bytes], argv: list[str]) -> None:
        """Move the waiting conmon into `conmon_cgroup`; if that fails it must not go on."""
        if not self.conmon_cgroup:
            return
        try:
            join_cgroup(proc.pid, self.conmon_cgroup)
        except OSError as exc:
            proc.kill()  # before the start pipe closes: EOF there would let it proceed
            proc.wait()
            error = f"cannot move conmon into cgroup {self.conmon_cgroup}: {exc}"
            raise RuntimeCommandError(argv, error) from exc

    def _pid_from_sync(
        self, handle: ContainerHandle, paths: _Paths, argv: list[str], message: dict[str, Any] | None
    ) -> int:
        what = f"create container {handle.id}"
        if message is None:
            error = f"conmon exited without reporting a pid. {_tail(paths.conmon_log)}"
            raise RuntimeCommandError(argv, error, what=what)
        pid = int(message.get("data", message.get("pid", -1)))  # api-version 1 says "data"
        if pid <= 0:
            raise RuntimeCommandError(argv, str(message.get("message") or _tail(paths.conmon_log)), what=what)
        return pid

    def _cleanup_failed_create(self, handle: ContainerHandle, paths: _Paths) -> None:
        """Leave nothing behind a failed create: no runc container, no conmon."""
        try:
            self._runc("delete", "--force", handle.id)
        except Exception as exc:  # the create error matters more than this one
            log.warning("cleanup after failed create of %s: %s", handle.id, exc)
        self._wait_conmon_gone(paths)
        for path in (paths.pidfile, paths.conmon_pidfile, paths.conmon_start_file, *paths.conmon_bundle_files):
            path.unlink(missing_ok=True)

    # -- status ----------------------------------------------------------------------------

    def _runc_state(self, cid: str) -> dict[str, Any] | None:
        """`runc state` as a dict, or None when runc does not know the container."""
        try:
            result = self._runc("state", cid, what=f"state of container {cid}")
        except NotFound:
            return None
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    def _status_from_state(self, handle: ContainerHandle, paths: _Paths, state: dict[str, Any]) -> RuntimeStatus:
        runc_status = state.get("status", "")
        if runc_status == "stopped":
            # conmon writes the exit file right after reaping: give it a moment
            wait = _EXIT_FILE_WAIT if _conmon_alive(paths) else 0.0
            exited = _wait_for(lambda: _read_exit_file(paths.exit_file), wait)
            if exited is not None:
                return self._stopped_status(handle, paths, exited)
            return RuntimeStatus(
                STATE_STOPPED,
                started_at=_read_started(paths),
                oom_killed=self._oom_killed(handle, paths),
                message="exit code unknown: conmon wrote no exit file",
            )
        pid = int(state.get("pid") or 0)
        start = process_start_time(pid)
        if runc_status in ("created", "creating"):
            return RuntimeStatus(STATE_CREATED, pid=pid, pid_start_time=start)
        if runc_status in ("running", "paused"):
            message = "paused" if runc_status == "paused" else ""
            return RuntimeStatus(
                STATE_RUNNING, pid=pid, pid_start_time=start, started_at=_read_started(paths), message=message
            )
        return RuntimeStatus(
            STATE_UNKNOWN, pid=pid, pid_start_time=start, message=f"{self.name} reports status {runc_status!r}"
        )

    def _stopped_status(self, handle: ContainerHandle, paths: _Paths, exited: tuple[int, int]) -> RuntimeStatus:
        code, finished_at = exited
        # The exit file's mtime has the file system's coarse clock (a tick behind time_ns()):
        # a container that exits at once must not seem to finish before it started.
        started_at = min(_read_started(paths), finished_at)
        return RuntimeStatus(
            STATE_STOPPED,
            exit_code=code,
            started_at=started_at,
            finished_at=finished_at,
            oom_killed=self._oom_killed(handle, paths),
        )

    def _oom_killed(self, handle: ContainerHandle, paths: _Paths) -> bool:
        """conmon's OOM marker, else the cgroup's oom_kill counter while the cgroup exists."""
        if any(path.exists() for path in paths.oom_files):
            return True
        return _cgroup_oom_kills(handle.bundle) > 0

    # -- exec ------------------------------------------------------------------------------

    def _run_exec(
        self, handle: ContainerHandle, cmd: list[str], timeout: float | None, pidfile: Path, limit: int
    ) -> ExecResult:
        argv = [*self._runc_prefix(), "exec", "--pid-file", str(pidfile), handle.id, *cmd]
        log_command(argv)
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        output = _CappedOutput(proc, limit)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            finished = output.collect(deadline)
            if finished:
                try:
                    proc.wait(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    finished = False
            if not finished:
                return _abort_exec(proc, pidfile, output)
            return output.result(proc.returncode)
        finally:
            output.close()

    # -- helpers ---------------------------------------------------------------------------

    def _runc_prefix(self) -> list[str]:
        return [_resolve(self.runtime_path), "--root", str(self.runtime_root)]

    def _runc(self, *args: str, input: bytes | None = None, what: str = "") -> subprocess.CompletedProcess[bytes]:
        """Run a runtime subcommand; map its "no such container" / "wrong state" errors to CRI codes."""
        argv = [*self._runc_prefix(), *args]
        result = run_command(argv, input=input, timeout=self.command_timeout, what=what)
        if result.returncode == 0:
            return result
        detail = runtime_error_text(result.stderr)
        if any(hint in detail for hint in _NOT_FOUND_HINTS):
            raise NotFound(f"{what}: {self.name}: {detail}")
        if any(hint in detail for hint in _PRECONDITION_HINTS):
            raise FailedPrecondition(f"{what}: {self.name}: {detail}")
        raise RuntimeCommandError(argv, result.stderr, result.returncode, what)

    def _wait_conmon_gone(self, paths: _Paths) -> None:
        """conmon exits once its container is reaped; make sure it does, killing it if stuck."""
        if _wait_for(lambda: not _conmon_alive(paths), _CONMON_EXIT_WAIT):
            return
        pid = _read_int(paths.conmon_pidfile)
        if pid:
            log.warning("conmon %d of container %s did not exit: killing it", pid, paths.handle.id)
            _signal_pid(pid, signal.SIGKILL)
            _wait_for(lambda: not _conmon_alive(paths), _CONMON_EXIT_WAIT)


# -- conmon sync pipe ----------------------------------------------------------------------


def _read_sync_message(fd: int, deadline: float) -> dict[str, Any] | None:
    """conmon's first JSON line on the sync pipe ({"data": pid} or {"data": -1, "message": ...})."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("conmon reported no container pid in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0].strip()
    if not line:
        return None
    message: dict[str, Any] = json.loads(line)
    return message


# -- exec timeout --------------------------------------------------------------------------


def _abort_exec(proc: subprocess.Popen[bytes], pidfile: Path, output: "_CappedOutput") -> ExecResult:
    """Kill a timed-out exec and return only once its processes are gone, not left as zombies.

    The command is runc exec's child (runc clones it with CLONE_PARENT), so runc reaps it and then
    exits on its own: killing runc at the same time would orphan the command and leave it a zombie
    of whatever init adopts it, still seen by the container's next `pgrep`. So the command's
    descendants go first (their parent, still alive, can reap them), then the command, and runc
    is killed only if it does not finish by itself.
    """
    # runc writes the pid file just after starting the process: a very short timeout can beat it
    exec_pid = _wait_for(lambda: _read_int(pidfile), _EXEC_PIDFILE_WAIT if proc.poll() is None else 0.0)
    tree = _process_tree(exec_pid) if exec_pid else []
    descendants = tree[1:]
    for pid in descendants:
        _signal_pid(pid, signal.SIGKILL)
    _wait_for(lambda: not any(_exists(pid) for pid in descendants), _EXEC_REAP_WAIT if descendants else 0.0)
    if exec_pid:
        _signal_pid(exec_pid, signal.SIGKILL)
        try:
            proc.wait(timeout=_EXEC_DRAIN_WAIT)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    # orphans the command's parent could not reap are now the container init's: give it a moment
    _wait_for(lambda: not any(_exists(pid) for pid in tree), _EXEC_REAP_WAIT if tree else 0.0)
    # something in the container may still hold the pipes: then give up on the rest
    output.collect(time.monotonic() + _EXEC_REAP_WAIT)
    result = output.result(-1)
    result.timed_out = True
    return result


class _CappedOutput:
    """Reads a process's stdout and stderr as they come, keeping at most `limit` bytes of each
    (the rest is read and dropped, so the process never blocks on a full pipe)."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: int) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self._pipes = (proc.stdout, proc.stderr)
        self._limit = max(limit, 0)
        self._data = (bytearray(), bytearray())
        self._truncated = [False, False]
        self._selector = selectors.DefaultSelector()
        for index, pipe in enumerate(self._pipes):
            os.set_blocking(pipe.fileno(), False)
            self._selector.register(pipe.fileno(), selectors.EVENT_READ, index)

    def collect(self, deadline: float | None) -> bool:
        """Read until both streams end (True) or `deadline` (monotonic) passes (False)."""
        while self._selector.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return False
            for key, _ in self._selector.select(wait):
                index = key.data
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    self._selector.unregister(key.fd)
                    continue
                kept = self._data[index]
                room = self._limit - len(kept)
                if room > 0:
                    kept += chunk[:room]
                if len(chunk) > room:
                    self._truncated[index] = True
        return True

    def result(self, exit_code: int) -> ExecResult:
        out, err = self._data
        return ExecResult(
            exit_code, bytes(out), bytes(err), stdout_truncated=self._truncated[0], stderr_truncated=self._truncated[1]
        )

    def close(self) -> None:
        self._selector.close()
        for pipe in self._pipes:
            pipe.close()


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents before children (collected before any is killed:
    killed parents lose their children to another reaper)."""
    children: dict[int, list[int]] = {}
    for child in all_pids():
        ppid = _ppid(child)
        if ppid:
            children.setdefault(ppid, []).append(child)
    tree, index = [pid], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    return tree


def _exists(pid: int) -> bool:
    """Whether `pid` is still in the process table (zombies included)."""
    return Path(f"/proc/{pid}").exists()


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _ppid(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0


# -- exit monitor --------------------------------------------------------------------------

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
_libc: ctypes.CDLL | None = None


def _inotify() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check_errno(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class _ExitWatcher:
    """One inotify instance on the exit directories of a runtime's containers: conmon writes
    `<exit dir>/<id>` once it has reaped the container, and each such file is reported at once
    (from this watcher's thread) to `report`. An overflowed event queue reports every container."""

    def __init__(self, name: str, report: ExitCallback) -> None:
        self._report = report
        self._fd = _check_errno(_inotify().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        self._lock = threading.Lock()
        self._ids: dict[int, str] = {}  # watch descriptor -> container id
        self._wds: dict[str, int] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name=f"exit-monitor-{name}", daemon=True)
        self._thread.start()

    def watch(self, container_id: str, exit_dir: Path) -> None:
        mask = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_ONLYDIR
        wd = _check_errno(
            _inotify().inotify_add_watch(self._fd, os.fsencode(exit_dir), mask), f"inotify_add_watch {exit_dir}"
        )
        with self._lock:
            self._ids[wd] = container_id
            self._wds[container_id] = wd
        if (exit_dir / container_id).exists():  # it exited before the watch (a restored container)
            self._report(container_id)

    def unwatch(self, container_id: str) -> None:
        with self._lock:
            wd = self._wds.pop(container_id, None)
            if wd is not None:
                self._ids.pop(wd, None)
        if wd is not None:
            _inotify().inotify_rm_watch(self._fd, wd)  # EINVAL once the directory is gone: fine

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                self._handle(os.read(self._fd, 1 << 16))
            except BlockingIOError:
                continue
            except Exception as exc:  # noqa: BLE001 - keep watching; the safety re-check covers a miss
                log.warning("exit monitor: %s", exc)
                time.sleep(0.1)

    def _handle(self, data: bytes) -> None:
        offset, exited = 0, []
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode(errors="replace")
            offset += _EVENT.size + length
            with self._lock:
                if mask & _IN_Q_OVERFLOW:
                    log.warning("exit monitor: inotify queue overflowed: checking every container")
                    exited.extend(self._wds)
                elif mask & _IN_IGNORED:  # the directory is gone (the container was removed)
                    container_id = self._ids.pop(wd, None)
                    if container_id is not None and self._wds.get(container_id) == wd:
                        del self._wds[container_id]
                elif self._ids.get(wd) == name:  # conmon renames its finished exit file into place
                    exited.append(name)
        for container_id in dict.fromkeys(exited):
            self._report(container_id)


# -- processes -----------------------------------------------------------------------------


def _conmon_pid(paths: _Paths) -> int:
    """The pid of this container's conmon while it runs, else 0 (zombies and recycled pids do not count)."""
    pid = _read_int(paths.conmon_pidfile)
    fields = stat_fields(pid) if pid else None
    if fields is None or fields[0] in ("Z", "X"):
        return 0
    recorded = _read_int(paths.conmon_start_file)  # absent for conmons of older pycrio versions
    if recorded and int(fields[19]) != recorded:
        return 0
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return 0
    return pid if b"conmon" in cmdline and paths.handle.id.encode() in cmdline else 0


def _conmon_alive(paths: _Paths) -> bool:
    """Whether this container's conmon still runs."""
    return _conmon_pid(paths) != 0


def _init_under_conmon(paths: _Paths) -> tuple[int, int]:
    """The init pid (and its start time) of a container whose init process still runs as
    conmon's child, else (0, 0): created (`runc init` waiting to be started) or, once the start
    file exists, running.

    conmon reaps the init process and then writes the exit file, so a live (non-zombie) init that
    is conmon's child, with no exit file, is alive; checking the parent rules out recycled pids.
    """
    pid = _read_int(paths.pidfile)
    fields = stat_fields(pid) if pid else None
    if fields is None or fields[0] in ("Z", "X"):
        return 0, 0
    conmon = _conmon_pid(paths)
    return (pid, int(fields[19])) if conmon and int(fields[1]) == conmon else (0, 0)


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# -- files ---------------------------------------------------------------------------------


def _read_exit_file(path: Path) -> tuple[int, int] | None:
    """(exit code, finished ns) from conmon's exit file, or None while there is none."""
    try:
        text = path.read_text().strip()
        finished = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    if not text:
        return None  # conmon is still writing it
    return int(text), finished


def _read_started(paths: _Paths) -> int:
    return _read_int(paths.started_file)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    tmp.replace(path)


def _tail(path: Path, limit: int = 1000) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[-limit:]


_T = TypeVar("_T")


def _wait_for(check: Callable[[], _T], timeout: float, interval: float = 0.02) -> _T:
    """Poll `check()` until it returns something truthy or `timeout` s pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# -- binaries ------------------------------------------------------------------------------


def _resolve(binary: str) -> str:
    """An absolute path for `binary` (conmon execs the runtime without a PATH search)."""
    return shutil.which(binary) or binary


def _binary_runs(binary: str) -> tuple[bool, str]:
    path = shutil.which(binary)
    if path is None:
        return False, f"{binary} not found (not an executable file, nor in PATH)"
    try:
        result = run_command([path, "--version"], timeout=10)
    except RuntimeCommandError as exc:
        return False, str(exc)
    if result.returncode != 0:
        return False, f"`{path} --version` failed (exit {result.returncode}): {runtime_error_text(result.stderr)}"
    return True, ""


# -- cgroups (only what the monitor needs; container cgroups are the runtime's business) ----


def join_cgroup(pid: int, cgroup: str) -> None:
    """Move `pid` into the cgroupfs path `cgroup` (absolute) in every hierarchy, creating it."""
    relative = cgroup.strip("/")
    if cgroups.cgroup_mode() == "v2":
        _join_one(CGROUP_ROOT, relative, pid)
        return
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        if (hierarchy / "cgroup.procs").exists() and not hierarchy.is_symlink():
            _join_one(hierarchy, relative, pid)


def _join_one(hierarchy: Path, relative: str, pid: int) -> None:
    target = hierarchy / relative
    target.mkdir(parents=True, exist_ok=True)
    if hierarchy.name == "cpuset":
        _init_cpuset(hierarchy, target)
    try:
        (target / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _init_cpuset(hierarchy: Path, target: Path) -> None:
    """A new v1 cpuset has no cpus/mems and refuses members: inherit them from the parents."""
    chain = [target]
    while chain[-1] != hierarchy:
        chain.append(chain[-1].parent)
    for directory in reversed(chain[:-1]):
        for name in ("cpuset.cpus", "cpuset.mems"):
            own = directory / name
            if not own.read_text().strip():
                own.write_text((directory.parent / name).read_text())


def _cgroup_oom_kills(bundle: Path) -> int:
    """The memory cgroup's oom_kill count for the container in `bundle` (0 if unknown)."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    path = str(spec.get("linux", {}).get("cgroupsPath", ""))
    if not path.startswith("/"):
        return 0  # relative or systemd-style paths: leave it to conmon's marker
    candidates = (
        (CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.oom_control"),
        (CGROUP_ROOT / path.lstrip("/") / "memory.events"),
    )
    for candidate in candidates:
        try:
            text = candidate.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0

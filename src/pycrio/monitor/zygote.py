"""A pre-imported pycrio-monitor that forks the pods' monitors (`--zygote-socket`): pages stay shared.

An exec'd monitor pays for its own copy of everything it imports: the bytecode and objects of
asyncio, protobuf, logging, pycrio... about 19 MiB of PSS per pod even with 50 pods. A zygote
imports all that once and forks each monitor from it; a forked monitor's pages stay shared with
the zygote's until written, so its PSS is little more than what it changes (~3 MiB idle).

The command keeps its contract (it returns once the monitor serves, 0 or 1 with the reason): with
`--zygote-socket PATH` it asks the zygote listening there, starting one if there is none. The
zygote forks; the child makes its own session, takes the command's environment and runs the
monitor exactly as a daemonized one (main.run), answering on the request's connection what it
would have written on the readiness pipe. The zygote is a plain blocking loop: no thread, no
asyncio loop, nothing the children would inherit half-made. gRPC and the OTLP exporter are
imported, never used: a monitor that exports its spans itself makes its channel in the child.

Wire: the command sends one frame (4-byte big-endian length, JSON {"key", "argv", "env"}); the
answer is one line, then EOF: `ready <pid>`, `error <message>`, or `stale` from a zygote whose
code differs from the command's ("key", a fingerprint of pycrio's source files): that zygote
exits and the command starts a fresh one. A lock file beside the socket serializes the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

_HEADER = struct.Struct(">I")
MAX_REQUEST = 4 * 1024 * 1024
REQUEST_TIMEOUT = 10.0  # s for a client to send its request (a stuck client must not stop the zygote)
START_TIMEOUT = 60.0  # s for a new zygote to import everything and listen
ANSWER_TIMEOUT = 300.0  # s for a forked monitor to become ready (restoring records, joining a cgroup)

# What a monitor imports on its way to serving; the zygote imports it once for all of them.
PRELOAD = (
    "argparse",
    "ctypes",
    "logging",
    "pycrio.durable",
    "pycrio.log",
    "pycrio.monitor.child_reaper",
    "pycrio.monitor.container_log",
    "pycrio.monitor.containers",
    "pycrio.monitor.rpc",
    "pycrio.monitor.server",
    "pycrio.monitor.telemetry",
    "pycrio.oci.runtime_oci",
    # a tracing monitor's SDK and span relay (pycrio.tracing.relay: its spans go to the daemon)
    "pycrio.tracing.provider",
    "pycrio.tracing.relay",
    # the OTLP/gRPC exporter of a monitor that exports itself (a daemon with
    # PYCRIO_TRACING_RELAY=off): ~11 MiB it would otherwise load after the fork. Only imported
    # here: gRPC starts no thread and no core before a channel exists, which happens in the child.
    "pycrio.tracing.otlp_exporter",
    "grpc._channel",  # imported by the first channel
)


class ZygoteError(Exception):
    """No zygote could be reached or started."""


def source_key() -> str:
    """A fingerprint of the pycrio code this process would run (every .py's path, size, mtime)."""
    import pycrio

    root = Path(pycrio.__file__).parent
    digest = hashlib.sha256(sys.version.encode())
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                info = os.stat(os.path.join(directory, name))
                digest.update(f"{directory}/{name}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


# -- the command's side ----------------------------------------------------------------------


def request_monitor(path: Path, argv: Sequence[str]) -> str:
    """Have the zygote at `path` (started if needed) fork a monitor for `argv`; its answer line."""
    key = source_key()
    payload = json.dumps({"key": key, "argv": list(argv), "env": dict(os.environ)}).encode()
    for _ in range(3):
        sock = _connect(path)
        if sock is None:
            _start_locked(path)
            sock = _connect(path)
            if sock is None:
                raise ZygoteError(f"no monitor zygote answers on {path}")
        with sock:
            sock.settimeout(ANSWER_TIMEOUT)
            try:
                sock.sendall(_HEADER.pack(len(payload)) + payload)
                answer = _read_all(sock).decode("utf-8", "replace").strip()
            except OSError as exc:
                raise ZygoteError(f"monitor zygote on {path}: {exc}") from exc
        if answer != "stale":
            return answer
        _wait_gone(path)  # it runs older code: it removes its socket and exits
        _reap_started()
    raise ZygoteError(f"the monitor zygote on {path} keeps running other code than this command")


def _connect(path: Path) -> socket.socket | None:
    from pycrio.monitor.server import ServerError, _sun_path

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    dir_fd = None
    try:
        address, dir_fd = _sun_path(path)  # a long path (a test's runroot) through /proc/self/fd
        sock.connect(address)
        return sock
    except (OSError, ServerError):  # no zygote there (or a name too long even via /proc/self/fd)
        sock.close()
        return None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _set_name(name: bytes) -> None:
    """The process's name (/proc/<pid>/comm), what `ps -e` and `pgrep` show."""
    import ctypes

    pr_set_name = 15
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, ctypes.c_char_p(name[:15]), 0, 0, 0)


def stop_zygote(path: Path, timeout: float = 5.0) -> bool:
    """Stop the zygote serving `path` (found by its socket's peer credentials), if one does; the
    monitors it forked run on. Whether one was stopped."""
    sock = _connect(path)
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
    finally:
        sock.close()
    if pid <= 1:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _wait_gone(path, timeout)
    for proc in list(_started):
        if proc.pid == pid:
            with contextlib.suppress(Exception):
                proc.wait(timeout)
    _reap_started()
    return True


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_gone(path: Path, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _start_locked(path: Path) -> None:
    """Start a zygote at `path` unless another command did meanwhile (the lock file decides)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ZygoteError(f"cannot create {lock_path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = _connect(path)
        if probe is not None:
            probe.close()
            return
        _start(path)
    finally:
        os.close(lock)  # releases the lock


def _start(path: Path) -> None:
    """Run a zygote (`python -m pycrio.monitor.zygote`, its own session); return once it listens.

    subprocess, not a bare os.fork(): the caller may be the daemon, with threads that hold locks."""
    import subprocess

    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pycrio.monitor.zygote", "--socket", os.fspath(path), "--ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write_end,),
            cwd="/", start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        os.close(read_end)
        raise ZygoteError(f"cannot run the monitor zygote: {exc}") from exc
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode("utf-8", "replace").strip()
    if not answer.startswith("ready"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        raise ZygoteError(f"the monitor zygote did not start: {answer[len('error '):] if answer else 'it exited'}")
    # it runs on in its own session; its exit (stale code, shutdown) is reaped by whoever started
    # it: Popen reaps it when the daemon polls its children, else init does after the daemon exits
    _started.append(proc)


_started: list[Any] = []  # zygotes this process started (Popen objects), reaped once they exit


def _reap_started() -> None:
    for proc in list(_started):
        if proc.poll() is not None:
            _started.remove(proc)


def serve(path: Path, ready_fd: int) -> int:
    """Import everything, listen on `path`, fork a monitor per request; returns when stale/stopped."""
    import gc
    import importlib

    from pycrio.monitor.main import _import_asyncio_without_ssl

    _import_asyncio_without_ssl()
    for name in PRELOAD:
        importlib.import_module(name)
    from pycrio.monitor.server import bind_socket

    _set_name(b"pycrio-zygote")
    key = source_key()
    listener = bind_socket(path)
    listener.setblocking(True)
    inode = os.stat(path).st_ino
    gc.collect()
    gc.freeze()  # the collector never walks (so never writes to) what the children share

    def reap(signum: int, frame: object) -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def stop(signum: int, frame: object) -> NoReturn:
        raise SystemExit(0)

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    os.write(ready_fd, f"ready {os.getpid()}\n".encode())
    os.close(ready_fd)
    try:
        while True:
            conn, _ = listener.accept()
            if not _handle(conn, listener, key):
                return 0
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # still ours, not a successor's
                path.unlink()


def _handle(conn: socket.socket, listener: socket.socket, key: str) -> bool:
    """One request: fork its monitor. False when this zygote is stale and must go."""
    with conn:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            request = _read_request(conn)
        except (OSError, ValueError):
            return True  # not a command of ours: drop it
        if request.get("key") != key:
            with contextlib.suppress(OSError):
                conn.sendall(b"stale\n")
            return False
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:  # the pod's monitor
            _run_child(conn, listener, request)
        return True


def _read_request(conn: socket.socket) -> dict[str, object]:
    header = conn.recv(_HEADER.size, socket.MSG_WAITALL)
    if len(header) != _HEADER.size:
        raise ValueError("short header")
    (length,) = _HEADER.unpack(header)
    if length > MAX_REQUEST:
        raise ValueError("request too large")
    data = conn.recv(length, socket.MSG_WAITALL)
    if len(data) != length:
        raise ValueError("short request")
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("not an object")
    return request


def _run_child(conn: socket.socket, listener: socket.socket, request: dict[str, object]) -> NoReturn:
    from pycrio.monitor.main import Readiness, _close_inherited_fds, parse_args, run

    code = 1
    fd = conn.detach()
    readiness = Readiness(fd)
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        listener.close()
        os.setsid()
        _set_name(b"pycrio-monitor")  # ps/pgrep show what it is (its argv stays the zygote's)
        env = request.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update({str(k): str(v) for k, v in env.items()})
        argv = request.get("argv")
        if not isinstance(argv, list):
            raise ValueError("the request has no argv")
        options = parse_args([str(a) for a in argv])
        _close_inherited_fds(keep=fd)
        code = run(options, readiness)
    except SystemExit as exc:  # argparse refused the command line
        readiness.failed(f"bad command line (exit {exc.code})")
    except BaseException as exc:  # noqa: BLE001
        readiness.failed(f"{type(exc).__name__}: {exc}")
    finally:
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """`python -m pycrio.monitor.zygote --socket PATH --ready-fd N` (started by `pycrio-monitor`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="pycrio-monitor-zygote", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="unix socket to listen on (mode 0600)")
    parser.add_argument("--ready-fd", required=True, type=int, help="pipe to write `ready <pid>` or `error ...` to")
    args = parser.parse_args(argv)
    code = 1
    try:
        code = serve(args.socket, args.ready_fd)
    except BaseException as exc:  # noqa: BLE001 - told to the starting command
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, f"error {type(exc).__name__}: {exc}\n".encode())
    sys.exit(code)


if __name__ == "__main__":
    main()

"""`pycrio-monitor`: the command line, daemonizing and the process's life.

The daemon runs it like a command and waits for it to exit: without --foreground it forks; the
child makes a new session, joins --cgroup, becomes a child subreaper, binds the socket (0600),
restores its containers' records, writes <state-dir>/monitor.pid and only then tells the waiting
parent over a pipe, which exits 0 (the monitor serves) or 1 with the child's error on stderr.
With --zygote-socket the same monitor is forked from a pre-imported zygote instead (memory pages
shared between the pods' monitors, pycrio.monitor.zygote); the command's contract is the same.
Imports stay lean until they are needed: a monitor runs per pod.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

if TYPE_CHECKING:
    import asyncio
    import logging

    from pycrio.monitor.rpc import Supervisor
    from pycrio.monitor.telemetry import Telemetry, TracingSettings

PROG = "pycrio-monitor"
PID_FILE = "monitor.pid"
LOG_FILE = "monitor.log"
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
SUPERVISOR_SHUTDOWN_SECONDS = 5.0
PR_SET_CHILD_SUBREAPER = 36
OOM_SCORE_ADJ = "-1000"  # as conmon-rs: the monitor must outlive its containers under memory pressure


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    pod_id: str
    socket: Path
    state_dir: Path
    runtime_path: str
    runtime_root: Path
    cgroup: str
    log_level: str
    log_file: Path | None
    tracing: TracingSettings
    foreground: bool
    zygote_socket: Path | None = None


class StartupError(Exception):
    """The monitor cannot start; the message says what and where."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "One per pod (pycrio's \"pod\" runtime type): owns the pod's containers through the OCI runtime, "
            "writes their CRI logs, records their exits and serves exec/attach, answering the pycrio daemon "
            "on a unix socket (length-prefixed protobuf, proto/monitor.proto)."
        ),
        epilog=(
            "Without --foreground the command returns once the monitor serves: exit 0, or 1 with the reason "
            "on stderr. The monitor exits 0 on a Shutdown request, SIGTERM or SIGINT, and removes its socket."
        ),
    )
    parser.add_argument("--pod-id", required=True, help="the pod sandbox's id (in log lines, spans and Version)")
    parser.add_argument("--socket", required=True, type=Path, help="unix socket to serve on (created mode 0600; its directory must exist)")
    parser.add_argument(
        "--state-dir", required=True, type=Path,
        help=f"directory for the monitor's records: {PID_FILE}, exits/<container>.json (created if missing)",
    )
    parser.add_argument("--runtime-path", default="/usr/sbin/runc", help="the OCI runtime binary (default: %(default)s)")
    parser.add_argument("--runtime-root", required=True, type=Path, help="the OCI runtime's --root (its state directory)")
    parser.add_argument(
        "--cgroup", default="",
        help="cgroupfs path to move the monitor into, in every hierarchy, like /pycrio/<pod> (default: stay put)",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="default: %(default)s")
    parser.add_argument(
        "--log-file", type=Path,
        help=f"append log lines (logfmt) to this file (default: stderr with --foreground, else <state-dir>/{LOG_FILE})",
    )
    parser.add_argument("--enable-tracing", action="store_true", help="export OpenTelemetry spans over OTLP/gRPC")
    parser.add_argument("--tracing-endpoint", default="127.0.0.1:4317", help="OTLP/gRPC host:port (default: %(default)s)")
    parser.add_argument(
        "--tracing-sampling-rate-per-million", type=int, default=0, metavar="N",
        help="traces started per million requests without a caller's trace context (default: %(default)s; "
        "a request whose caller sampled its trace is always traced)",
    )
    parser.add_argument(
        "--tracing-relay", default="", metavar="SOCKET",
        help="send spans to the daemon's span relay (a unix datagram socket), which exports them with its own, "
        "instead of over OTLP/gRPC to --tracing-endpoint (default: export directly)",
    )
    parser.add_argument("--foreground", action="store_true", help="do not fork nor start a new session (tests, debugging)")
    parser.add_argument(
        "--zygote-socket", type=Path,
        help="fork the monitor from the pre-imported monitor zygote listening on this unix socket (started "
        "there if none is), so that the pods' monitors share their memory pages; ignored with --foreground",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    return parser


def _version() -> str:
    from pycrio import __version__

    return __version__


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and check the command line (exits 2 with usage on a bad one, as argparse does)."""
    parser = _parser()
    args = parser.parse_args(argv)
    from pycrio.monitor.telemetry import TracingSettings

    tracing = TracingSettings(
        args.enable_tracing, args.tracing_endpoint, args.tracing_sampling_rate_per_million, args.tracing_relay
    )
    problem = tracing.problem()
    if problem:
        parser.error(problem)
    if not args.pod_id.strip():
        parser.error("--pod-id is empty")
    if args.cgroup and not args.cgroup.startswith("/"):
        parser.error(f"--cgroup must be an absolute cgroupfs path, got {args.cgroup!r}")
    return Options(
        pod_id=args.pod_id,
        socket=args.socket.absolute(),
        state_dir=args.state_dir.absolute(),
        runtime_path=args.runtime_path,
        runtime_root=args.runtime_root.absolute(),
        cgroup=args.cgroup,
        log_level=args.log_level,
        log_file=args.log_file.absolute() if args.log_file else None,
        tracing=tracing,
        foreground=args.foreground,
        zygote_socket=args.zygote_socket.absolute() if args.zygote_socket else None,
    )


def default_supervisor(options: Options, loop: asyncio.AbstractEventLoop) -> Supervisor:
    """The real ContainerSupervisor with its SIGCHLD reaper (pycrio.monitor.containers)."""
    from pycrio.monitor.child_reaper import ChildReaper
    from pycrio.monitor.containers import ContainerSupervisor

    return ContainerSupervisor(
        options.pod_id, options.state_dir, options.runtime_path, options.runtime_root, ChildReaper(loop)
    )


# The seam tests replace to run the shell around a supervisor of their own.
supervisor_factory: Callable[[Options, "asyncio.AbstractEventLoop"], Supervisor] = default_supervisor


# -- process setup ---------------------------------------------------------------------------


def set_child_subreaper() -> None:
    """Orphans below us (the containers' init processes once runc exits) are re-parented to us."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise StartupError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def join_cgroup(cgroup: str) -> None:
    from pycrio.oci.runtime_oci import join_cgroup as join

    try:
        join(os.getpid(), cgroup)
    except OSError as exc:
        raise StartupError(f"cannot join cgroup {cgroup}: {exc}") from exc


def _close_inherited_fds(keep: int | None) -> None:
    """Descriptors from whoever started us would stay open for the pod's life (as conmon-rs)."""
    if keep is None:
        os.closerange(3, 1 << 20)
    else:
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 20)


def _adjust_oom_score() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text(OOM_SCORE_ADJ)
    except OSError:
        pass  # without the privilege the monitor is as killable as its containers


def _detach_stdio() -> None:
    """Once ready, nothing of the starter's stdio is held (it waits for EOF on its pipes)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


# -- running ---------------------------------------------------------------------------------


class Readiness:
    """Tells the waiting parent (daemon mode) that the monitor serves, or why it cannot; in the
    foreground a failure goes to stderr."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line.encode("utf-8", "replace")[:60000])
        except OSError:
            pass  # the parent is gone: nothing to tell
        finally:
            os.close(fd)

    def ready(self) -> None:
        self._send(f"ready {os.getpid()}\n")

    def failed(self, message: str) -> None:
        if self._fd is None:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        self._send(f"error {message}\n")


def _describe_failure(exc: BaseException) -> str:
    message = getattr(exc, "message", None)  # a CRIError from the supervisor's restore
    if isinstance(exc, (StartupError, ValueError)) or isinstance(message, str):
        return str(message if isinstance(message, str) else exc)
    return f"{type(exc).__name__}: {exc}"


def _import_asyncio_without_ssl() -> None:
    """asyncio imports ssl (OpenSSL: ~1.3 MiB per process) for TLS transports the monitor never
    opens; import it with ssl hidden. A later `import ssl` (by the OTLP exporter) still works."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError: asyncio copes
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def run(options: Options, readiness: Readiness) -> int:
    """Set the process up, serve until told to stop, clean up; 0 on a clean exit, 1 on a failed start."""
    _import_asyncio_without_ssl()
    import asyncio
    import logging

    from pycrio.monitor.telemetry import Telemetry, setup_logging

    log = logging.getLogger("pycrio.monitor")
    os.umask(0o022)
    try:
        _adjust_oom_score()
        if options.cgroup:
            join_cgroup(options.cgroup)
        set_child_subreaper()
        try:
            options.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create state directory {options.state_dir}: {exc.strerror or exc}") from exc
        log_path = options.log_file or (None if options.foreground else options.state_dir / LOG_FILE)
        try:
            stream = open(log_path, "a", buffering=1, encoding="utf-8") if log_path else sys.stderr
        except OSError as exc:
            raise StartupError(f"cannot open log file {log_path}: {exc.strerror or exc}") from exc
        setup_logging(options.log_level, stream)
        telemetry = Telemetry(options.pod_id)
        telemetry.configure(options.tracing)
    except Exception as exc:  # noqa: BLE001 - every start failure is told to the parent
        readiness.failed(_describe_failure(exc))
        return 1

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(options, telemetry, readiness, log))
    except BaseException as exc:  # noqa: BLE001
        readiness.failed(_describe_failure(exc))
        log.exception("pycrio-monitor failed")
        return 1
    finally:
        if not telemetry.shutdown():
            log.warning("spans not flushed at exit")
        loop.close()
        logging.shutdown()


async def _serve(options: Options, telemetry: Telemetry, readiness: Readiness, log: logging.Logger) -> int:
    import asyncio
    import signal

    from pycrio.durable import write_atomic
    from pycrio.monitor.rpc import MonitorRPC
    from pycrio.monitor.server import MonitorServer

    loop = asyncio.get_running_loop()
    server: MonitorServer | None = None
    supervisor: Supervisor | None = None
    pid_file = options.state_dir / PID_FILE
    try:
        supervisor = supervisor_factory(options, loop)
        await supervisor.restore()
        server = MonitorServer(options.socket, MonitorRPC(options.pod_id, supervisor, telemetry))
        server.bind()
        try:
            write_atomic(pid_file, f"{os.getpid()}\n")
        except OSError as exc:
            raise StartupError(f"cannot write {pid_file}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001
        message = _describe_failure(exc)
        log.error("pycrio-monitor cannot start: %s", message)
        readiness.failed(message)
        if server is not None:
            await server.close()
        if supervisor is not None:
            await _shutdown_supervisor(supervisor, log)
        return 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.stop, f"{signal.Signals(signum).name} received")
        readiness.ready()
        if not options.foreground:
            _detach_stdio()
        log.info("pycrio-monitor %s serving pod %s on %s (pid %d)", _version(), options.pod_id, options.socket, os.getpid())
        reason = await server.serve()
        log.info("pycrio-monitor stopping: %s", reason)
    finally:
        await server.close()
        await _shutdown_supervisor(supervisor, log)
        try:
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass
    return 0


async def _shutdown_supervisor(supervisor: Supervisor, log: logging.Logger) -> None:
    import asyncio

    try:
        await asyncio.wait_for(supervisor.shutdown(), SUPERVISOR_SHUTDOWN_SECONDS)
    except Exception as exc:  # noqa: BLE001 - exit anyway, the daemon waits for it
        log.warning("supervisor shutdown failed: %s", exc or type(exc).__name__)


def daemonize(options: Options) -> int:
    """Fork; the parent waits on a pipe for the child's readiness and returns the command's exit code."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the monitor
        os.close(read_end)
        code = 1
        try:
            os.setsid()
            _close_inherited_fds(keep=write_end)
            code = run(options, Readiness(write_end))
        except BaseException as exc:  # noqa: BLE001
            Readiness(write_end).failed(f"{type(exc).__name__}: {exc}")
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode("utf-8", "replace").strip()
    if answer.startswith("ready"):
        return 0
    _, status = os.waitpid(pid, 0)
    return _refused(options, answer, f" ({_describe_status(status)})")


def from_zygote(options: Options, argv: Sequence[str]) -> int:
    """Like daemonize, the monitor forked by the zygote on --zygote-socket (pycrio.monitor.zygote)."""
    from pycrio.monitor.zygote import ZygoteError, request_monitor

    assert options.zygote_socket is not None
    try:
        answer = request_monitor(options.zygote_socket, argv)
    except ZygoteError as exc:
        return _refused(options, f"error {exc}", "")
    return 0 if answer.startswith("ready") else _refused(options, answer, "")


def _refused(options: Options, answer: str, status: str) -> int:
    if answer.startswith("error "):
        message = answer[len("error "):]
    else:
        message = f"the monitor exited before it was ready{status}"
    print(f"{PROG}: pod {options.pod_id}: {message}", file=sys.stderr)
    return 1


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(args)
    if options.foreground:
        _close_inherited_fds(keep=None)
        sys.exit(run(options, Readiness(None)))
    if options.zygote_socket is not None:
        sys.exit(from_zygote(options, args))
    sys.exit(daemonize(options))


if __name__ == "__main__":  # pragma: no cover
    main()

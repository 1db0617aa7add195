"""Serve the CRI on a unix socket until SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import grpc

from pycrio import __version__
from pycrio.config import Config, LoadedConfig
from pycrio.server.daemon import Daemon
from pycrio.server.reload import Reloader
from pycrio.server.services import add_cri_services
from pycrio.tracing import CRIServerInterceptor, Tracing

if TYPE_CHECKING:
    from pycrio.metrics import CRIMetrics

log = logging.getLogger("pycrio.server")

SOCKET_MODE = 0o660
SHUTDOWN_GRACE_SECONDS = 10.0
SPAN_FLUSH_TIMEOUT_SECONDS = 5.0
# Short calls (Version, Status, List*, *Status, stats: kubelet's polling) share the server's pool;
# calls that wait (grace periods, pulls, execs, CNI, event streams) have their own, larger one:
# a waiting call holds a thread but no CPU, and kubelet may stop every pod of a node at once.
SHORT_WORKERS = 32
LONG_WORKERS = 512
# Kubelet's and CRI-O's limit: big List* answers on busy nodes exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class StartupError(Exception):
    """The daemon cannot start; the message says why in one line."""


def prepare_socket(path: Path) -> None:
    """Create the socket's directory; replace a stale socket; refuse a live one or a non-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check socket {path}: {exc.strerror}") from None
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(f"another daemon is already serving on {path}; stop it or choose another --listen")


def with_prefix(counts: dict[str, Any], prefix: str) -> dict[str, float]:
    """The counters named `prefix`*, by the rest of their name (an observer's `kind` values)."""
    return {name.removeprefix(prefix): value for name, value in counts.items() if name.startswith(prefix)}


def start_metrics(config: Config, tracing: Tracing) -> CRIMetrics | None:
    """Per-method metrics when enabled, with the span export counters beside them."""
    if not config.metrics.enable_metrics:
        return None
    from pycrio.metrics import CRIMetrics, MetricsError

    metrics = CRIMetrics(config.metrics, tracing.resource)
    metrics.add_observer(
        "pycrio.tracing.spans",
        lambda: with_prefix(tracing.health.snapshot(), "spans_"),
        "Spans by fate: started, kept_for_error, exported, dropped_queue_full, dropped_export_failed.",
        "{span}",
    )
    try:
        metrics.start()
    except MetricsError as exc:
        raise StartupError(str(exc)) from None
    describe = metrics.describe()
    log.info(
        "metrics enabled: OTLP/gRPC to %s every %ds, Prometheus %s",
        describe.get("otlp_endpoint") or "(none)", config.metrics.metrics_export_interval,
        describe.get("prometheus") or "off",
    )
    return metrics


def publish_image_metrics(metrics: CRIMetrics, daemon: Daemon) -> None:
    """Pull counters beside the per-method ones (like CRI-O's image_pulls_* and layer reuse)."""
    stats = daemon.images.puller.stats
    metrics.add_observer(
        "pycrio.image.pulls",
        lambda: with_prefix(stats.snapshot(), "pulls_"),
        "PullImage outcomes: succeeded, failed.",
        "{pull}",
    )
    metrics.add_observer(
        "pycrio.image.layers",
        lambda: with_prefix(stats.snapshot(), "layers_"),
        "Layers of pulled images: fetched from the registry, or reused from the store.",
        "{layer}",
    )
    metrics.add_observer(
        "pycrio.image.pulled",
        lambda: {"fetched": stats.snapshot()["bytes_fetched"]},
        "Bytes of layers fetched from registries.",
        "By",
    )


def publish_stream_metrics(metrics: CRIMetrics, daemon: Daemon) -> None:
    """Streaming sessions and their bytes by kind (exec, attach, portforward)."""
    stats = daemon.streams.stats
    metrics.add_observer(
        "pycrio.streaming.active_sessions", lambda: stats.snapshot()["active"],
        "Streaming sessions open now, by kind: exec, attach, portforward.", "{session}", gauge=True,
    )  # fmt: skip
    metrics.add_observer(
        "pycrio.streaming.sessions", lambda: stats.snapshot()["sessions"],
        "Streaming sessions served, by kind.", "{session}",
    )  # fmt: skip
    metrics.add_observer(
        "pycrio.streaming.received", lambda: stats.snapshot()["bytes_in"],
        "Bytes from streaming clients (stdin, port-forward uploads), by kind.", "By",
    )  # fmt: skip
    metrics.add_observer(
        "pycrio.streaming.sent", lambda: stats.snapshot()["bytes_out"],
        "Bytes to streaming clients (stdout and stderr, port-forward downloads), by kind.", "By",
    )  # fmt: skip


def serve(loaded: LoadedConfig, load_again: Callable[[], LoadedConfig] | None = None) -> int:
    """Run the daemon; returns the process exit code. SIGHUP reloads through `load_again`."""
    config = loaded.config
    # SIGHUP's default action kills the process: until serving, a reload request is only noted.
    reloads: list[int] = []
    wake = threading.Event()

    def on_hangup(signum: int, frame: object) -> None:
        reloads.append(signum)
        wake.set()

    signal.signal(signal.SIGHUP, on_hangup)
    tracing = Tracing(config.tracing)
    metrics = None
    try:
        listen = Path(config.api.listen)
        prepare_socket(listen)
        metrics = start_metrics(config, tracing)
        daemon = Daemon.create(config, tracing=tracing, metrics=metrics)
        if loaded.registries is not None:
            daemon.images.set_registries(loaded.registries)
        if metrics is not None:
            publish_image_metrics(metrics, daemon)
            publish_stream_metrics(metrics, daemon)
    except BaseException:
        if metrics is not None:
            metrics.shutdown(1.0)
        tracing.shutdown(1.0)
        raise
    daemon.reconcile()
    try:
        daemon.streams.start()
    except OSError as exc:
        api = config.api
        daemon.close()
        raise StartupError(f"cannot serve streams on {api.stream_address}:{api.stream_port}: {exc}") from None
    interceptor = CRIServerInterceptor(spans=tracing, metrics=metrics)
    short_pool = ThreadPoolExecutor(max_workers=SHORT_WORKERS, thread_name_prefix="cri")
    long_pool = ThreadPoolExecutor(max_workers=LONG_WORKERS, thread_name_prefix="cri-long")
    server = grpc.server(
        short_pool,
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_cri_services(server, daemon, long_pool)
    try:
        server.add_insecure_port(f"unix://{listen}")
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {listen}: {exc}") from None
    server.start()
    os.chmod(listen, SOCKET_MODE)
    daemon.start_background()

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reloader = (
        Reloader(config, tracing, load_again, daemon.images, daemon.handlers.configure_tracing)
        if load_again is not None
        else None
    )
    log.info("pycrio %s serving CRI v1 on %s (pid %d)", __version__, listen, os.getpid())

    while not stop.is_set():
        wake.wait(1.0)  # a timed wait keeps signal delivery prompt
        wake.clear()
        while reloads and not stop.is_set() and reloader is not None:
            reloads.clear()
            log.info("received SIGHUP, reloading the configuration")
            reloader.reload()
    log.info("received %s, shutting down (grace %.0fs)", received[0], SHUTDOWN_GRACE_SECONDS)
    server.stop(SHUTDOWN_GRACE_SECONDS).wait()
    for pool in (short_pool, long_pool):
        pool.shutdown(wait=False, cancel_futures=True)
    daemon.close()
    if metrics is not None:
        metrics.shutdown(SPAN_FLUSH_TIMEOUT_SECONDS)
    tracing.shutdown(SPAN_FLUSH_TIMEOUT_SECONDS)
    listen.unlink(missing_ok=True)
    log.info("stopped")
    return 0

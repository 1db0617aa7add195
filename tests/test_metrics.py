"""Per CRI method metrics: the Prometheus text endpoint scraped over real HTTP, OTLP push to a
real receiver, bounded shutdown, and a real daemon driven by real crictl."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pycrio.config import MetricsConfig
from pycrio.metrics import CRIMetrics, MetricsError
from pycrio.metrics.provider import LATENCY_BUCKETS
from pycrio.tracing.provider import make_resource
from tests.harness import run_pycrio
from tests.otlp_receiver import OTLPReceiver, ReceivedMetricPoint, free_port

RUNTIME = "runtime.v1.RuntimeService"
IMAGES = "runtime.v1.ImageService"
CUMULATIVE = 2  # AggregationTemporality.CUMULATIVE in OTLP

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _config(**kwargs: object) -> MetricsConfig:
    return MetricsConfig(**{"enable_metrics": True, "metrics_endpoint": "", **kwargs})  # type: ignore[arg-type]


def scrape_text(url: str) -> str:
    response = httpx.get(url, timeout=5.0)
    assert response.status_code == 200, response.text
    return response.text


def parse(text: str) -> Series:
    """{(sample name, labels): value} of a Prometheus text page."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> Series:
    return parse(scrape_text(url))


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def op(operation: str, service: str = RUNTIME, **extra: str) -> frozenset[tuple[str, str]]:
    return labels(operation=operation, service=service, **extra)


@pytest.fixture
def make_metrics() -> Iterator:
    """Factory: make_metrics(**MetricsConfig fields) -> a CRIMetrics, shut down afterwards."""
    made: list[CRIMetrics] = []

    def factory(start: bool = True, **kwargs: object) -> CRIMetrics:
        metrics = CRIMetrics(_config(**kwargs), make_resource())
        made.append(metrics)
        if start:
            metrics.start()
        return metrics

    yield factory
    for metrics in made:
        metrics.shutdown(2.0)


def _record_sample(metrics: CRIMetrics) -> None:
    metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.0004)
    metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.002)
    metrics.record_call(f"/{RUNTIME}/ContainerStatus", grpc.StatusCode.NOT_FOUND, 0.003)
    metrics.record_call(f"/{RUNTIME}/ContainerStatus", grpc.StatusCode.NOT_FOUND, 0.004)
    metrics.record_call(f"/{RUNTIME}/ContainerStatus", grpc.StatusCode.OK, 0.02)
    metrics.record_call(f"/{IMAGES}/PullImage", grpc.StatusCode.DEADLINE_EXCEEDED, 200.0)


# --- Prometheus endpoint --------------------------------------------------------------------


def test_prometheus_series_names_labels_and_values(make_metrics) -> None:
    port = free_port()
    metrics = make_metrics(metrics_port=port)
    _record_sample(metrics)
    text = scrape_text(f"http://127.0.0.1:{port}/metrics")
    series = parse(text)

    # Exact lines, as Prometheus (and a CRI-O dashboard author) sees them.
    assert 'pycrio_operations_total{operation="Version",service="runtime.v1.RuntimeService"} 2.0' in text
    assert (
        'pycrio_operations_errors_total{code="NOT_FOUND",operation="ContainerStatus",'
        'service="runtime.v1.RuntimeService"} 2.0'
    ) in text
    assert "# TYPE pycrio_operations_latency_seconds histogram" in text
    assert "target_info" not in text and "otel_scope" not in text

    assert {name for name, _ in series} == {
        "pycrio_operations_total",
        "pycrio_operations_errors_total",
        "pycrio_operations_latency_seconds_bucket",
        "pycrio_operations_latency_seconds_count",
        "pycrio_operations_latency_seconds_sum",
    }
    totals = {k[1]: v for k, v in series.items() if k[0] == "pycrio_operations_total"}
    assert totals == {op("Version"): 2, op("ContainerStatus"): 3, op("PullImage", IMAGES): 1}
    errors = {k[1]: v for k, v in series.items() if k[0] == "pycrio_operations_errors_total"}
    assert errors == {
        op("ContainerStatus", code="NOT_FOUND"): 2,
        op("PullImage", IMAGES, code="DEADLINE_EXCEEDED"): 1,
    }

    assert series[("pycrio_operations_latency_seconds_count", op("Version"))] == 2
    assert series[("pycrio_operations_latency_seconds_sum", op("Version"))] == pytest.approx(0.0024)
    assert series[("pycrio_operations_latency_seconds_count", op("ContainerStatus"))] == 3
    assert series[("pycrio_operations_latency_seconds_sum", op("ContainerStatus"))] == pytest.approx(0.027)

    def bucket(operation: str, le: str, service: str = RUNTIME) -> float:
        return series[("pycrio_operations_latency_seconds_bucket", op(operation, service, le=le))]

    les = {dict(k[1])["le"] for k in series if k[0] == "pycrio_operations_latency_seconds_bucket"}
    assert les == {str(float(b)) for b in LATENCY_BUCKETS} | {"+Inf"}
    # Cumulative buckets: 0.4 ms is in le=0.0005, 2 ms first counts at le=0.0025.
    assert [bucket("Version", le) for le in ("0.0005", "0.001", "0.0025", "+Inf")] == [1, 1, 2, 2]
    assert [bucket("ContainerStatus", le) for le in ("0.0025", "0.005", "0.01", "0.025")] == [0, 2, 2, 3]
    # Past the last bound (120 s) only +Inf counts it.
    assert bucket("PullImage", "120.0", IMAGES) == 0
    assert bucket("PullImage", "+Inf", IMAGES) == 1

    metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.001)
    assert scrape(f"http://127.0.0.1:{port}/metrics")[("pycrio_operations_total", op("Version"))] == 3


def test_observer_publishes_callback_totals(make_metrics) -> None:
    port = free_port()
    metrics = make_metrics(metrics_port=port)
    spans = {"started": 10.0, "exported": 8.0, "dropped_queue_full": 0.0, "dropped_export_failed": 2.0}
    metrics.add_observer("pycrio.tracing.spans", lambda: dict(spans), "Spans by fate.", "{span}")

    def broken() -> dict[str, float]:
        raise RuntimeError("health unavailable")

    metrics.add_observer("pycrio.broken", broken, "Always fails.")
    url = f"http://127.0.0.1:{port}/metrics"

    text = scrape_text(url)
    assert 'pycrio_tracing_spans_total{kind="exported"} 8.0' in text
    assert "# TYPE pycrio_tracing_spans_total counter" in text
    series = parse(text)
    assert {dict(k[1])["kind"]: v for k, v in series.items() if k[0] == "pycrio_tracing_spans_total"} == spans
    assert not any(name.startswith("pycrio_broken") for name, _ in series)  # no series, no failed scrape

    spans["started"] = 25.0
    spans["exported"] = 20.0
    series = scrape(url)
    assert series[("pycrio_tracing_spans_total", labels(kind="started"))] == 25
    assert series[("pycrio_tracing_spans_total", labels(kind="exported"))] == 20

    with pytest.raises(ValueError, match="already registered"):
        metrics.add_observer("pycrio.tracing.spans", lambda: {}, "again")


def test_port_in_use_then_shutdown_frees_it(make_metrics) -> None:
    port = free_port()
    first = make_metrics(metrics_port=port)
    first.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.001)
    second = make_metrics(start=False, metrics_port=port)
    with pytest.raises(MetricsError) as raised:
        second.start()
    assert str(raised.value) == f"cannot serve Prometheus metrics on 127.0.0.1:{port}: Address already in use"
    # The first one is unaffected.
    assert scrape(f"http://127.0.0.1:{port}/metrics")[("pycrio_operations_total", op("Version"))] == 1

    assert first.shutdown(2.0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the port is free again
    assert first.shutdown(2.0)  # twice is harmless


def test_concurrent_calls_and_scrapes_are_exact(make_metrics) -> None:
    """Counts stay exact under many recording threads, and concurrent scrapes each see every
    series once. (The exporter's own collector can mix up two concurrent scrapes; that race is
    too rare to provoke here, so this checks the outcome, not the lock in pycrio.metrics.prometheus.)"""
    port = free_port()
    metrics = make_metrics(metrics_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    methods = [f"/{RUNTIME}/ListContainers", f"/{RUNTIME}/ListPodSandbox", f"/{IMAGES}/ListImages"]
    metrics.record_call(methods[0], grpc.StatusCode.OK, 0.001)
    done = threading.Event()

    def record(i: int) -> None:
        for n in range(500):
            metrics.record_call(methods[(i + n) % 3], grpc.StatusCode.OK if n % 5 else grpc.StatusCode.INTERNAL, 0.001)

    def scrape_until_done() -> list[str]:
        bad = []
        while not done.is_set():
            text = scrape_text(url)
            for m in ("ListContainers", "ListPodSandbox", "ListImages"):
                if text.count(f'pycrio_operations_total{{operation="{m}"') > 1:
                    bad.append(text)
            if "pycrio_operations_total{" not in text:
                bad.append(text)
        return bad

    with ThreadPoolExecutor(max_workers=12) as pool:
        scrapers = [pool.submit(scrape_until_done) for _ in range(4)]
        list(pool.map(record, range(8)))
        done.set()
        assert not any(s.result() for s in scrapers), "a concurrent scrape was incomplete or duplicated"

    series = scrape(url)
    totals = [series[("pycrio_operations_total", op(m.rsplit("/", 1)[1], m.split("/")[1]))] for m in methods]
    assert sum(totals) == 8 * 500 + 1
    errors = sum(v for k, v in series.items() if k[0] == "pycrio_operations_errors_total")
    assert errors == 8 * 100
    assert all(dict(k[1])["code"] == "INTERNAL" for k in series if k[0] == "pycrio_operations_errors_total")


def test_record_call_never_raises_and_disabled_is_a_no_op(make_metrics) -> None:
    port = free_port()
    metrics = make_metrics(metrics_port=port)
    metrics.record_call("", grpc.StatusCode.OK, 0.0)
    metrics.record_call("NoSlashes", "UNKNOWN", 0.1)
    metrics.record_call(f"/{RUNTIME}/Version", None, float("nan"))
    metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, "slow")  # type: ignore[arg-type]
    metrics.record_call(f"/{RUNTIME}/Version", "OK", 0.001)
    series = scrape(f"http://127.0.0.1:{port}/metrics")
    assert series[("pycrio_operations_total", op("NoSlashes", ""))] == 1
    assert series[("pycrio_operations_errors_total", op("NoSlashes", "", code="UNKNOWN"))] == 1
    assert ("pycrio_operations_errors_total", op("Version", code="OK")) not in series  # a code given as its name

    off = CRIMetrics(MetricsConfig(enable_metrics=False, metrics_port=free_port()), make_resource())
    off.start()
    off.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.001)
    off.add_observer("x", lambda: {"a": 1.0}, "x")
    assert off.describe() == {"enabled": False}
    assert off.shutdown(1.0)


def test_describe(make_metrics) -> None:
    port = free_port()
    metrics = make_metrics(start=False, metrics_port=port, metrics_endpoint="127.0.0.1:4317", metrics_export_interval=7)
    assert metrics.describe() == {
        "enabled": True,
        "otlp_endpoint": "127.0.0.1:4317",
        "export_interval_seconds": 7,
        "prometheus": f"http://127.0.0.1:{port}/metrics",
        "otlp_last_success": None,
        "otlp_failed_exports": 0,
    }
    push_only = make_metrics(start=False, metrics_endpoint="127.0.0.1:4317")
    assert push_only.describe()["prometheus"] == ""


# --- OTLP push ------------------------------------------------------------------------------


def _latest(receiver: OTLPReceiver, name: str, **attributes: str) -> ReceivedMetricPoint:
    points = [p for p in receiver.metric_points(name) if p.attributes == attributes]
    assert points, f"no {name} point with {attributes}"
    return points[-1]


def test_otlp_push(receiver: OTLPReceiver, make_metrics) -> None:
    metrics = make_metrics(metrics_endpoint=receiver.endpoint, metrics_export_interval=1)
    _record_sample(metrics)

    version = {"operation": "Version", "service": RUNTIME}
    point = receiver.wait_for_metric(lambda p: p.name == "pycrio.operations" and p.attributes == version, timeout=15)
    assert point is not None, "no pycrio.operations point within 15s"
    assert point.kind == "sum" and point.is_monotonic and point.temporality == CUMULATIVE
    assert point.value == 2 and point.unit == "{operation}"
    assert point.service == "pycrio" and point.scope == "pycrio"
    assert point.resource["service.name"] == "pycrio" and "host.name" in point.resource

    assert _latest(receiver, "pycrio.operations", operation="ContainerStatus", service=RUNTIME).value == 3
    errors = _latest(receiver, "pycrio.operations.errors", operation="ContainerStatus", service=RUNTIME, code="NOT_FOUND")
    assert errors.value == 2
    assert _latest(
        receiver, "pycrio.operations.errors", operation="PullImage", service=IMAGES, code="DEADLINE_EXCEEDED"
    ).value == 1

    latency = _latest(receiver, "pycrio.operations.latency", **version)
    assert latency.kind == "histogram" and latency.unit == "s" and latency.temporality == CUMULATIVE
    assert latency.count == 2 and latency.sum == pytest.approx(0.0024)
    assert latency.explicit_bounds == list(LATENCY_BUCKETS)
    # Per-bucket (not cumulative) counts in OTLP: (-inf, 0.0005] and (0.001, 0.0025].
    assert latency.bucket_counts == [1, 0, 1] + [0] * (len(LATENCY_BUCKETS) - 2)
    assert _latest(receiver, "pycrio.operations.latency", operation="PullImage", service=IMAGES).bucket_counts[-1] == 1

    # Later calls show up in later (cumulative) exports.
    metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.001)
    assert receiver.wait_for_metric(
        lambda p: p.name == "pycrio.operations" and p.attributes == version and p.value == 3, timeout=15
    )


def test_shutdown_flushes_last_values(receiver: OTLPReceiver, make_metrics) -> None:
    metrics = make_metrics(metrics_endpoint=receiver.endpoint, metrics_export_interval=3600)
    metrics.record_call(f"/{RUNTIME}/StopPodSandbox", grpc.StatusCode.OK, 0.5)
    assert metrics.shutdown(5.0)
    assert _latest(receiver, "pycrio.operations", operation="StopPodSandbox", service=RUNTIME).value == 1


def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s:\n{caplog.text}"
        time.sleep(0.1)


def test_push_failures_logged_once_then_recovery(make_metrics, monkeypatch, caplog) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # each failed push gives up after 1 s
    caplog.set_level(logging.INFO, logger="pycrio.metrics")
    receiver = OTLPReceiver()  # its port, not yet served
    metrics = make_metrics(metrics_endpoint=receiver.endpoint, metrics_export_interval=1)
    metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.001)
    _wait_for_log(caplog, f"metric export to {receiver.endpoint} failing")
    time.sleep(3)  # more failed pushes: still one line per failure streak
    assert caplog.text.count("metric export to") == 1

    with receiver:
        point = receiver.wait_for_metric(lambda p: p.name == "pycrio.operations", timeout=30)
        assert point is not None and point.value == 1
        _wait_for_log(caplog, f"metric export to {receiver.endpoint} recovered after")


@pytest.mark.parametrize("collector", ["closed_port", "black_hole"])
def test_shutdown_is_bounded_when_the_collector_is_down(make_metrics, request, collector: str) -> None:
    endpoint = f"127.0.0.1:{free_port()}" if collector == "closed_port" else request.getfixturevalue("black_hole")
    metrics = make_metrics(metrics_endpoint=endpoint, metrics_export_interval=1, metrics_port=free_port())
    for _ in range(100):
        metrics.record_call(f"/{RUNTIME}/Version", grpc.StatusCode.OK, 0.001)
    time.sleep(1.5)  # let a periodic export start failing
    started = time.monotonic()
    metrics.shutdown(2.0)
    assert time.monotonic() - started < 8.0


# --- a real daemon, driven by real crictl ---------------------------------------------------


def _metrics_config(port: int, endpoint: str = "") -> str:
    return (
        "[pycrio.metrics]\nenable_metrics = true\n"
        f"metrics_port = {port}\nmetrics_endpoint = \"{endpoint}\"\nmetrics_export_interval = 1\n"
    )


def test_daemon_serves_metrics_of_crictl_calls(make_daemon, receiver: OTLPReceiver) -> None:
    port = free_port()
    daemon = make_daemon(config_text=_metrics_config(port, receiver.endpoint))
    url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(url)  # crictl also calls Version (and more) around its own calls: compare deltas

    assert daemon.crictl("version", check=False).returncode == 0
    assert daemon.crictl("ps", check=False).returncode == 0
    inspect = daemon.crictl("inspect", "nonexistent", check=False)
    assert inspect.returncode != 0 and "NotFound" in inspect.stderr

    after = scrape(url)

    def delta(name: str, key: frozenset[tuple[str, str]]) -> float:
        return after.get((name, key), 0) - before.get((name, key), 0)

    assert delta("pycrio_operations_total", op("Version")) >= 1
    assert delta("pycrio_operations_total", op("ListContainers")) == 1
    assert delta("pycrio_operations_total", op("ContainerStatus")) == 1
    assert delta("pycrio_operations_errors_total", op("ContainerStatus", code="NOT_FOUND")) == 1
    assert delta("pycrio_operations_latency_seconds_count", op("ContainerStatus")) == 1
    assert not any(
        name == "pycrio_operations_errors_total" and dict(key)["operation"] != "ContainerStatus" for name, key in after
    )
    # The daemon publishes its span export counters beside the CRI ones.
    assert ("pycrio_tracing_spans_total", labels(kind="exported")) in after

    status = {"operation": "ContainerStatus", "service": RUNTIME, "code": "NOT_FOUND"}
    point = receiver.wait_for_metric(lambda p: p.name == "pycrio.operations.errors" and p.attributes == status)
    assert point is not None and point.value == 1 and point.service == "pycrio"
    listed = {"operation": "ListContainers", "service": RUNTIME}
    assert receiver.wait_for_metric(lambda p: p.name == "pycrio.operations" and p.attributes == listed)
    # `pycrio status` names both endpoints and the last successful push.
    shown = run_pycrio("--listen", str(daemon.socket), "status")
    assert shown.returncode == 0, shown.stderr
    assert f"metrics: enabled, OTLP/gRPC to {receiver.endpoint}, Prometheus {url}" in shown.stdout
    pushed = next(line for line in shown.stdout.splitlines() if "last successful push" in line)
    assert "never" not in pushed and "s ago" in pushed
    assert daemon.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2.0)


def test_daemon_refuses_to_start_when_the_metrics_port_is_taken(make_daemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        daemon = make_daemon(start=False, config_text=_metrics_config(port))
        with pytest.raises(RuntimeError, match="pycrio exited"):
            daemon.start()
    assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}: Address already in use" in daemon.logs()


def test_daemon_counts_pulls_and_layer_reuse(make_daemon, registry, image_builder) -> None:
    first = image_builder.busybox("metrics/first", "1")
    second = image_builder.busybox("metrics/second", "1")  # the same busybox layer, another config
    assert first.layers == second.layers
    port = free_port()
    daemon = make_daemon(
        config_text=_metrics_config(port) + f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
    )
    url = f"http://127.0.0.1:{port}/metrics"
    daemon.crictl("pull", first.reference)
    daemon.crictl("pull", second.reference)
    assert daemon.crictl("pull", f"{registry.address}/metrics/absent:1", check=False).returncode != 0

    series = scrape(url)
    assert series[("pycrio_image_pulls_total", labels(kind="succeeded"))] == 2
    assert series[("pycrio_image_pulls_total", labels(kind="failed"))] == 1
    assert series[("pycrio_image_layers_total", labels(kind="fetched"))] == 1
    assert series[("pycrio_image_layers_total", labels(kind="reused"))] == 1
    assert series[("pycrio_image_pulled_bytes_total", labels(kind="fetched"))] == first.layer_sizes[0]

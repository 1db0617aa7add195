"""The demo's Jaeger as a user sees it: the real UI in a real browser, and the collector's printout.

Jaeger runs with contrib/jaeger.yaml (on free ports), pycrio traces at debug level, the real
crictl sends a traced `ps`; headless Chromium renders the UI's trace and search pages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.harness import PycrioDaemon, tracing_args
from tests.jaeger_fixture import UI_PLACEHOLDER_MARK, JaegerInstance, chromium, debug_span_block, jaeger_missing

pytestmark = [pytest.mark.browser, pytest.mark.skipif(jaeger_missing() is not None, reason=jaeger_missing() or "")]

LIST_CONTAINERS = "/runtime.v1.RuntimeService/ListContainers"


@pytest.fixture(scope="module")
def traced_ps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JaegerInstance, dict[str, Any]]]:
    """A Jaeger holding the trace of one `crictl --enable-tracing ps` against a debug-level pycrio."""
    base = tmp_path_factory.mktemp("jaeger-ui")
    with JaegerInstance(base / "jaeger") as jaeger:
        daemon = PycrioDaemon(base / "pycrio", args=tracing_args(jaeger.otlp_grpc, level="debug")).start()
        try:
            daemon.crictl("ps", tracing_endpoint=jaeger.otlp_grpc)
        finally:
            daemon.stop()  # flushes pycrio's spans
        trace = jaeger.wait_for_trace("cri-tools", "ps", holding=("pycrio",))
        yield jaeger, jaeger.get_json(f"/api/traces/{trace['traceID']}")["data"][0]


def text_of(html: str) -> str:
    """The text of rendered HTML (the UI splits names into several elements)."""
    return re.sub(r"<[^>]+>", "", html)


def spans_by_service(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    services = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
    result: dict[str, list[dict[str, Any]]] = {}
    for span in trace["spans"]:
        result.setdefault(services[span["processID"]], []).append(span)
    return result


def test_the_trace_page_renders_crictl_and_pycrio_spans(traced_ps: tuple[JaegerInstance, dict[str, Any]]) -> None:
    jaeger, trace = traced_ps
    by_service = spans_by_service(trace)
    assert LIST_CONTAINERS in [s["operationName"] for s in by_service["pycrio"]]

    dom = chromium(f"{jaeger.url}/trace/{trace['traceID']}", "--dump-dom")

    assert UI_PLACEHOLDER_MARK not in dom
    # The timeline names both services and every span of the call chain, as rendered by the UI's
    # JavaScript (index.html alone contains none of these).
    assert "cri-tools" in dom and "pycrio" in dom
    assert LIST_CONTAINERS in dom
    assert "runtime.v1.RuntimeService/Version" in dom
    assert f"Total Spans{len(trace['spans'])}" in text_of(dom)


def test_the_search_page_lists_the_trace(traced_ps: tuple[JaegerInstance, dict[str, Any]]) -> None:
    jaeger, trace = traced_ps

    dom = chromium(f"{jaeger.url}/search?service=pycrio&lookback=1h&limit=20", "--dump-dom")

    assert UI_PLACEHOLDER_MARK not in dom
    # The result row of this trace: a link to its page, titled with its root span's service and
    # name and the trace id's first 7 digits.
    link = f'href="/trace/{trace["traceID"]}"'
    assert link in dom
    row = dom[dom.index(link):]
    assert text_of(row[:row.index("</h3>")]).endswith(f"cri-tools: ps{trace['traceID'][:7]}")


def test_the_placeholder_is_what_a_jaeger_without_assets_serves(tmp_path: Path) -> None:
    """The check above can fail: without `ui.assets_path` the same binary serves its placeholder page."""
    jaeger = JaegerInstance(tmp_path)
    jaeger.env["PYCRIO_JAEGER_UI_ASSETS"] = ""
    with jaeger:
        assert UI_PLACEHOLDER_MARK in jaeger.get_text("/")


def test_the_debug_exporter_prints_the_list_containers_span_with_its_log_events(
    traced_ps: tuple[JaegerInstance, dict[str, Any]],
) -> None:
    jaeger, trace = traced_ps
    by_service = spans_by_service(trace)
    server = next(s for s in by_service["pycrio"] if s["operationName"] == LIST_CONTAINERS)
    client = next(s for s in by_service["cri-tools"] if s["operationName"] == LIST_CONTAINERS.lstrip("/"))
    request_id = next(t["value"] for t in server["tags"] if t["key"] == "id")

    block = debug_span_block(jaeger.log_text(), trace["traceID"], LIST_CONTAINERS)

    assert block is not None, jaeger.log_text()[-4000:]
    assert f"Parent ID      : {client['spanID']}" in block
    assert f"    ID             : {server['spanID']}" in block
    assert "Kind           : Server" in block
    events = block[block.index("Events:"):]
    assert "SpanEvent #0" in events and "-> Name: log" in events
    assert "-> log.severity: Str(DEBUG)" in events
    assert "-> log.message: Str(Request: ListContainersRequest:" in events
    assert "-> log.message: Str(Response: ListContainersResponse:" in events
    assert f"-> id: Str({request_id})" in events
    assert f"-> name: Str({LIST_CONTAINERS})" in events

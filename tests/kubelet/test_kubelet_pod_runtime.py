"""kubelet on a pycrio whose default handler is the "pod" runtime type (one pycrio-monitor per pod):
static pods run, and one trace goes kubelet -> pycrio -> pycrio-monitor-client -> pycrio-monitor.

A node of its own (after test_kubelet_e2e's has stopped: one kubelet at a time), kubelet tracing
every call to a real OTLP receiver, pycrio at rate 0 (it follows kubelet's sampled context, and
hands it to the monitor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.kubelet.harness import (
    LOGS, NODE_NAME, KubeletNode, ancestors, container, container_status, eventually, inspect, remove_pod,
    requires_kubelet, runtime_containers, state, static_pod,
)
from tests.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, OTLPReceiver
from tests.registry_fixture import BuiltImage, TestRegistry

pytestmark = requires_kubelet


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, registry: TestRegistry, image: BuiltImage, traces: OTLPReceiver
) -> Iterator[KubeletNode]:
    kubelet = KubeletNode(
        tmp_path_factory.mktemp("kubelet-pod-node"), registry.address, runtime_type="pod",
        tracing_endpoint=traces.endpoint,
    ).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
        kubelet.keep_logs(LOGS / "pod")
    assert kubelet.host_changes() == [], "the host is not as it was before kubelet ran"


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_monitor_spans_nest_under_kubelet(node: KubeletNode, image: BuiltImage, traces: OTLPReceiver) -> None:
    traces.clear()
    node.write_manifest("monitored", static_pod("monitored", [
        container("app", image, "echo hello from a monitored pod; exec sleep 1000"),
    ]))
    pod = node.wait_pod("monitored", lambda p: state(container_status(p, "app")) == "running", what="running")
    cid = container_status(pod, "app")["containerID"].removeprefix("pycrio://")
    assert [c["id"] for c in runtime_containers(node, "monitored")] == [cid]
    assert node.crictl("logs", cid).stdout == "hello from a monitored pod\n"  # the monitor wrote it
    sandbox = runtime_containers(node, "monitored")[0]["podSandboxId"]
    assert node.crictl_json("inspectp", sandbox)["status"]["runtimeHandler"] == "runc"
    monitor_pid = int((node.daemon.base / "run" / "pods" / sandbox / "monitor" / "monitor.pid").read_text())
    assert Path(f"/proc/{monitor_pid}/comm").read_text().strip() == "pycrio-monitor"
    assert int(inspect(node, cid)["info"]["pid"]) in _children(monitor_pid)  # the monitor is its parent

    def one_trace() -> None:
        # kubelet's spans leave in batches every few seconds, and it never stops polling: wait
        # for these spans rather than for quiet
        spans = traces.spans()
        sync = {s.trace_id for s in spans if s.service == "kubelet" and s.name == "syncPod"
                and s.attributes.get("k8s.pod.name") == f"monitored-{NODE_NAME}"}
        assert sync, sorted({(s.service, s.name) for s in spans})
        for operation, method in (("create_container", "CreateContainer"), ("start_container", "StartContainer")):
            found = [s for s in spans if s.service == "pycrio-monitor" and s.name == operation
                     and s.attributes.get("container_id") == cid]
            assert len(found) == 1, (operation, sorted({(s.service, s.name) for s in spans}))
            monitor = found[0]
            chain = ancestors(monitor, spans)
            shape = [(s.service, s.name, s.kind) for s in chain]
            assert monitor.kind == SPAN_KIND_SERVER, monitor
            assert shape[:1] == [("pycrio", f"pycrio-monitor-client: {method}", SPAN_KIND_CLIENT)], shape
            server = ("pycrio", f"/runtime.v1.RuntimeService/{method}", SPAN_KIND_SERVER)
            assert server in shape, shape
            below_kubelet = shape[shape.index(server) + 1:shape.index(server) + 2]
            assert below_kubelet == [("kubelet", f"runtime.v1.RuntimeService/{method}", SPAN_KIND_CLIENT)], shape
            assert monitor.trace_id in sync and {s.trace_id for s in chain} == {monitor.trace_id}

    eventually(one_trace, timeout=30)
    remove_pod(node, "monitored")

"""ListPodSandbox and StreamPodSandboxes: pods whose RunPodSandbox is still running are not listed."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.server.streaming_list import chunks


def _matching(daemon: Daemon, flt: api_pb2.PodSandboxFilter) -> list[api_pb2.PodSandbox]:
    pods = daemon.state.list_pods(id_prefix=flt.id, state=None, labels=dict(flt.label_selector))
    items = []
    creating = daemon.sandboxes.creating
    for pod in pods:
        if pod.id in creating:
            continue  # listed once its RunPodSandbox has finished (a failed one's debris is listed)
        item = pod.to_cri()  # shared: copied before a change
        if daemon.state.listed_problem(pod):  # infra process or namespaces gone: as PodSandboxStatus says
            shared, item = item, api_pb2.PodSandbox()
            item.CopyFrom(shared)
            item.state = api_pb2.SANDBOX_NOTREADY
        if not flt.HasField("state") or item.state == flt.state.state:
            items.append(item)
    return items


def list_pod_sandbox(daemon: Daemon, request: api_pb2.ListPodSandboxRequest) -> api_pb2.ListPodSandboxResponse:
    return api_pb2.ListPodSandboxResponse(items=_matching(daemon, request.filter))


def stream_pod_sandboxes(
    daemon: Daemon, request: api_pb2.StreamPodSandboxesRequest
) -> Iterator[api_pb2.StreamPodSandboxesResponse]:
    for chunk in chunks(_matching(daemon, request.filter)):
        yield api_pb2.StreamPodSandboxesResponse(pod_sandboxes=chunk)

"""GetContainerEvents: a stream of container and pod lifecycle events for kubelet's evented PLEG."""

from __future__ import annotations

import queue
from typing import Iterator

import grpc

from pycrio.cri import api_pb2
from pycrio.errors import NotFound
from pycrio.pods.events import LifecycleEvent
from pycrio.server.container_status import container_status_of
from pycrio.server.daemon import Daemon
from pycrio.server.sandbox_status import sandbox_status_of

POLL_SECONDS = 0.5


def get_container_events(
    daemon: Daemon, request: api_pb2.GetEventsRequest, context: grpc.ServicerContext
) -> Iterator[api_pb2.ContainerEventResponse]:
    subscription = daemon.events.subscribe()
    try:
        while context.is_active():
            try:
                event = subscription.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            yield _response(daemon, event)
    finally:
        daemon.events.unsubscribe(subscription)


get_container_events.needs_context = True  # type: ignore[attr-defined]


def _response(daemon: Daemon, event: LifecycleEvent) -> api_pb2.ContainerEventResponse:
    response = api_pb2.ContainerEventResponse(
        container_id=event.container_id, container_event_type=event.kind, created_at=event.created_at
    )
    try:
        response.pod_sandbox_status.CopyFrom(sandbox_status_of(daemon.state.get_pod(event.pod_id)))
    except NotFound:  # the pod is gone (its DELETED event)
        pass
    response.containers_statuses.extend(container_status_of(c) for c in daemon.state.containers_of(event.pod_id))
    return response

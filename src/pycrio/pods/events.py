"""Container lifecycle events for GetContainerEvents (kubelet's evented PLEG)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from pycrio.cri import api_pb2

log = logging.getLogger("pycrio.pods")

CREATED = api_pb2.CONTAINER_CREATED_EVENT
STARTED = api_pb2.CONTAINER_STARTED_EVENT
STOPPED = api_pb2.CONTAINER_STOPPED_EVENT
DELETED = api_pb2.CONTAINER_DELETED_EVENT

SUBSCRIBER_QUEUE = 1024


@dataclass(frozen=True)
class LifecycleEvent:
    """One container (or pod sandbox: container_id == pod_id) changing state."""

    container_id: str
    pod_id: str
    kind: int
    created_at: int = field(default_factory=time.time_ns)


class EventBus:
    """Fans events out to every subscriber; a subscriber that stops reading loses old events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue[LifecycleEvent]] = []

    def subscribe(self) -> queue.Queue[LifecycleEvent]:
        q: queue.Queue[LifecycleEvent] = queue.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[LifecycleEvent]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def publish(self, container_id: str, pod_id: str, kind: int) -> None:
        event = LifecycleEvent(container_id, pod_id, kind)
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(event)
            except queue.Full:
                log.warning("event subscriber is not reading: dropping its oldest event")
                try:
                    q.get_nowait()
                    q.put_nowait(event)
                except (queue.Empty, queue.Full):
                    pass

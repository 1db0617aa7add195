"""In-memory store of pod sandboxes and containers, as the CRI lists them.

The runtime issues fill it (and persist it under `root`); until then it is empty and every
List* call answers from it truthfully.
"""

from __future__ import annotations

import threading
from typing import Iterable, TypeVar

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument, NotFound

T = TypeVar("T", api_pb2.PodSandbox, api_pb2.Container)


def _by_id(items: dict[str, T], ident: str, kind: str) -> T:
    """Find by full id or by a unique id prefix, as crictl users type them."""
    if not ident:
        raise InvalidArgument(f"{kind} ID must not be empty")
    found = items.get(ident)
    if found is not None:
        return found
    matches = [v for k, v in items.items() if k.startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidArgument(f"{kind} ID {ident!r} is ambiguous: it matches {len(matches)} {kind}s")
    raise NotFound(f"{kind} {ident!r} not found")


def _labels_match(labels: Iterable[tuple[str, str]], selector: dict[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in selector.items())


class StateStore:
    """Pods and containers known to this daemon, safe to read from many CRI calls at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, api_pb2.PodSandbox] = {}
        self._containers: dict[str, api_pb2.Container] = {}
        self.pod_cidr = ""

    def add_pod(self, pod: api_pb2.PodSandbox) -> None:
        with self._lock:
            self._pods[pod.id] = pod

    def add_container(self, container: api_pb2.Container) -> None:
        with self._lock:
            self._containers[container.id] = container

    def get_pod(self, pod_id: str) -> api_pb2.PodSandbox:
        with self._lock:
            return _by_id(self._pods, pod_id, "pod sandbox")

    def get_container(self, container_id: str) -> api_pb2.Container:
        with self._lock:
            return _by_id(self._containers, container_id, "container")

    def list_pods(
        self, id_prefix: str = "", state: int | None = None, labels: dict[str, str] | None = None
    ) -> list[api_pb2.PodSandbox]:
        with self._lock:
            pods = list(self._pods.values())
        return [
            p for p in pods
            if p.id.startswith(id_prefix)
            and (state is None or p.state == state)
            and _labels_match(p.labels.items(), labels or {})
        ]

    def list_containers(
        self,
        id_prefix: str = "",
        pod_id_prefix: str = "",
        state: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[api_pb2.Container]:
        with self._lock:
            containers = list(self._containers.values())
        return [
            c for c in containers
            if c.id.startswith(id_prefix)
            and c.pod_sandbox_id.startswith(pod_id_prefix)
            and (state is None or c.state == state)
            and _labels_match(c.labels.items(), labels or {})
        ]

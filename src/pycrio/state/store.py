"""Pod sandboxes and containers known to this daemon: in memory, persisted under `<root>/state`.

Each record is one JSON file written atomically, so a daemon killed at any moment finds every
object it had created when it starts again.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, TypeVar

from pycrio.errors import AlreadyExists, InvalidArgument, NotFound
from pycrio.locks import KeyedLocks
from pycrio.state.records import ContainerRecord, SandboxRecord

R = TypeVar("R", SandboxRecord, ContainerRecord)


def _by_id(items: dict[str, R], ident: str, kind: str) -> R:
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


def _labels_match(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class StateStore:
    """Records of pods and containers; `locks` serialises the lifecycle calls of one object."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._pods: dict[str, SandboxRecord] = {}
        self._containers: dict[str, ContainerRecord] = {}
        self._names: dict[str, str] = {}  # reserved name -> id
        self.locks = KeyedLocks()
        self.pod_cidr = ""

    def open(self) -> None:
        """Load the records earlier runs wrote."""
        if self.directory is None:
            return
        for kind, cls, table in (("pods", SandboxRecord, self._pods), ("containers", ContainerRecord, self._containers)):
            folder = self.directory / kind
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.glob("*.json")):
                record = cls(**json.loads(path.read_text()))
                table[record.id] = record  # type: ignore[index]

    # --- names -----------------------------------------------------------------------------

    def reserve_name(self, name: str, ident: str) -> None:
        """Claim a unique name (kubelet's k8s_... names); a second claim is ALREADY_EXISTS."""
        with self._lock:
            holder = self._names.get(name)
            if holder is not None and holder != ident:
                raise AlreadyExists(f"name {name!r} is reserved for {holder}")
            self._names[name] = ident

    def release_name(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    # --- pods ------------------------------------------------------------------------------

    def save_pod(self, pod: SandboxRecord) -> None:
        with self._lock:
            self._pods[pod.id] = pod
        self._write("pods", pod.id, pod)

    def remove_pod(self, pod_id: str) -> None:
        with self._lock:
            self._pods.pop(pod_id, None)
        self._delete("pods", pod_id)

    def get_pod(self, pod_id: str) -> SandboxRecord:
        with self._lock:
            return _by_id(self._pods, pod_id, "pod sandbox")

    def list_pods(
        self, id_prefix: str = "", state: int | None = None, labels: dict[str, str] | None = None
    ) -> list[SandboxRecord]:
        with self._lock:
            pods = list(self._pods.values())
        return [
            p for p in pods
            if p.id.startswith(id_prefix)
            and (state is None or p.cri_state == state)
            and _labels_match(p.labels, labels or {})
        ]

    # --- containers ------------------------------------------------------------------------

    def save_container(self, container: ContainerRecord) -> None:
        with self._lock:
            self._containers[container.id] = container
        self._write("containers", container.id, container)

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            self._containers.pop(container_id, None)
        self._delete("containers", container_id)

    def get_container(self, container_id: str) -> ContainerRecord:
        with self._lock:
            return _by_id(self._containers, container_id, "container")

    def list_containers(
        self,
        id_prefix: str = "",
        pod_id_prefix: str = "",
        state: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[ContainerRecord]:
        with self._lock:
            containers = list(self._containers.values())
        return [
            c for c in containers
            if c.id.startswith(id_prefix)
            and c.pod_id.startswith(pod_id_prefix)
            and (state is None or c.cri_state == state)
            and _labels_match(c.labels, labels or {})
        ]

    def containers_of(self, pod_id: str) -> list[ContainerRecord]:
        with self._lock:
            return [c for c in self._containers.values() if c.pod_id == pod_id]

    # --- persistence -----------------------------------------------------------------------

    def _write(self, kind: str, ident: str, record: SandboxRecord | ContainerRecord) -> None:
        if self.directory is None:
            return
        path = self.directory / kind / f"{ident}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(record), sort_keys=True))
        os.replace(tmp, path)

    def _delete(self, kind: str, ident: str) -> None:
        if self.directory is not None:
            (self.directory / kind / f"{ident}.json").unlink(missing_ok=True)


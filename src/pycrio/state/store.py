"""Pod sandboxes and containers known to this daemon: in memory, persisted under `<root>/state`.

Each record is one JSON file written atomically and durably (temp file, fsync, rename, fsync of
the directory), so a daemon killed at any moment, or a node losing power, finds every object it
had created when it starts again. At start-up a record that cannot be read is moved aside with a
warning naming it, and the others are served; records whose runtime state a reboot took (see
boot.py) are marked: pods NOTREADY, containers EXITED.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from pycrio import durable
from pycrio.errors import AlreadyExists, InvalidArgument, NotFound
from pycrio.locks import KeyedLocks
from pycrio.procfs import process_start_time, same_process
from pycrio.state import boot
from pycrio.state.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
)

log = logging.getLogger("pycrio.state")

# What a container whose processes a reboot took reports (containerd's code and reason for a
# container whose task is gone after a restart; the message says why).
LOST_EXIT_CODE = 255
LOST_REASON = "Unknown"

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

    def __init__(self, directory: Path | None = None, runroot: Path | None = None) -> None:
        self.directory = directory
        self.runroot = runroot  # given: detect a reboot at open() (see boot.py)
        self._lock = threading.Lock()
        self._pods: dict[str, SandboxRecord] = {}
        self._containers: dict[str, ContainerRecord] = {}
        self._names: dict[str, str] = {}  # reserved name -> id
        self._infra_exits: set[str] = set()  # pods whose infra process exited (runtime reports)
        self.locks = KeyedLocks()
        self.pod_cidr = ""

    def open(self) -> None:
        """Load the records earlier runs wrote; skip (and move aside) those that cannot be read;
        then, with a runroot, mark what a reboot took."""
        if self.directory is None:
            return
        for kind, cls, table in (("pods", SandboxRecord, self._pods), ("containers", ContainerRecord, self._containers)):
            folder = self.directory / kind
            folder.mkdir(parents=True, exist_ok=True)
            durable.remove_temporaries(folder)
            for path in sorted(folder.glob("*.json")):
                try:
                    record = durable.decode_record(cls, path.read_bytes())
                    _check(record, path)
                except (OSError, ValueError) as exc:
                    durable.quarantine(path, str(exc), log, f"{kind[:-1]} record")
                    continue
                table[record.id] = record  # type: ignore[index]
        if self.runroot is not None:
            self._recover(self.runroot)

    def _recover(self, runroot: Path) -> None:
        """After a reboot no pod process, namespace or conmon is left: say so in the records
        before anyone uses their pids; a pod whose infra or namespaces are gone is NOTREADY."""
        assert self.directory is not None
        pods, containers = list(self._pods.values()), list(self._containers.values())
        paths = [Path(p.directory) for p in pods if p.directory] + [Path(c.bundle) for c in containers if c.bundle]
        check = boot.check_boot(self.directory, runroot, bool(pods or containers), paths)
        if check.lost:
            log.warning("%s: %d pod(s) become NOTREADY and %d container(s) EXITED", check.reason,
                        sum(p.state == SANDBOX_READY for p in pods),
                        sum(c.state != CONTAINER_EXITED for c in containers))
            for pod in pods:
                self._pod_gone(pod)
            for container in containers:
                self._container_gone(container, check.reason)
        else:
            for pod in pods:
                problem = self.pod_problem(pod)
                if problem:
                    log.warning("pod sandbox %s: %s: it is NOTREADY", pod.id, problem)
                    self._pod_gone(pod)
        boot.record_boot(self.directory, runroot, check.boot_id)

    @staticmethod
    def pod_problem(pod: SandboxRecord) -> str:
        """Why a READY pod cannot be ready any more: its infra process (checked by start time)
        or one of its pinned namespaces is gone; '' if nothing is wrong with it."""
        if pod.state != SANDBOX_READY:
            return ""
        if pod.infra_pid and not _is_infra(pod):
            return _infra_gone(pod)
        return _namespace_problem(pod)

    def listed_problem(self, pod: SandboxRecord) -> str:
        """pod_problem for ListPodSandbox (kubelet polls it every second): the infra process is
        known by its runtime's exit report (infra_exit_reported), not re-read from /proc."""
        if pod.state != SANDBOX_READY:
            return ""
        if pod.infra_pid and pod.id in self._infra_exits:
            return _infra_gone(pod)
        return _namespace_problem(pod)

    def infra_exit_reported(self, infra_id: str) -> None:
        """The runtime reported that the infra process `infra_id` may have exited: if it did,
        its pod is listed NOTREADY from now on."""
        with self._lock:
            pods = [p for p in self._pods.values() if p.infra_id == infra_id and p.infra_pid]
        for pod in pods:
            if not _is_infra(pod):
                with self._lock:
                    self._infra_exits.add(pod.id)

    def _pod_gone(self, pod: SandboxRecord) -> None:
        """NOTREADY, pids forgotten; namespaces and IPs stay so that StopPodSandbox still releases them."""
        if pod.state == SANDBOX_NOTREADY and not pod.infra_pid:
            return
        pod.state = SANDBOX_NOTREADY
        pod.infra_pid = 0
        pod.infra_pid_start = 0
        self._write("pods", pod.id, pod)

    def _container_gone(self, container: ContainerRecord, why: str) -> None:
        if container.state in (CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_UNKNOWN):
            container.state = CONTAINER_EXITED
            container.exit_code = LOST_EXIT_CODE
            container.reason = LOST_REASON
            container.message = f"{why}: the container's processes are gone"
            container.finished_at = max(time.time_ns(), container.started_at)
        elif not container.pid:
            return
        container.pid = 0
        container.pid_start_time = 0
        self._write("containers", container.id, container)

    # --- images ----------------------------------------------------------------------------

    def images_in_use(self) -> dict[str, list[str]]:
        """Image id -> ids of the containers using it (their image, and their image volumes)."""
        with self._lock:
            containers = list(self._containers.values())
        users: dict[str, list[str]] = defaultdict(list)
        for container in containers:
            ids = {container.image_ref}
            for mount in container.container_config.mounts:
                if mount.image.image_ref:
                    ids.add(mount.image.image_ref)
            for image_id in ids - {""}:
                users[image_id].append(container.id)
        return dict(users)

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
        if pod.infra_pid and not pod.infra_pid_start:  # remember which process the pid is
            pod.infra_pid_start = process_start_time(pod.infra_pid)
        with self._lock:
            self._pods[pod.id] = pod
        self._write("pods", pod.id, pod)

    def remove_pod(self, pod_id: str) -> None:
        with self._lock:
            self._pods.pop(pod_id, None)
            self._infra_exits.discard(pod_id)
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
            and (not labels or _labels_match(p.labels, labels))
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
            and (not labels or _labels_match(c.labels, labels))
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
        durable.write_atomic(path, json.dumps(asdict(record), sort_keys=True))

    def _delete(self, kind: str, ident: str) -> None:
        if self.directory is not None:
            durable.remove(self.directory / kind / f"{ident}.json")


def _check(record: SandboxRecord | ContainerRecord, path: Path) -> None:
    """What the managers rely on when they use a record: its id, a known state, a config that decodes."""
    if record.id != path.stem:
        raise ValueError(f"it names {record.id!r}")
    try:
        record.cri_state
    except KeyError:
        raise ValueError(f"unknown state {record.state!r}") from None
    try:
        record.pod_config if isinstance(record, SandboxRecord) else record.container_config
    except Exception as exc:  # noqa: BLE001 - base64 or protobuf errors: an unusable record
        raise ValueError(f"config does not decode: {exc}") from None


def _is_infra(pod: SandboxRecord) -> bool:
    """Whether the pod's stored infra pid still is its infra process (a record from before start
    times were kept: any live process with that pid)."""
    if pod.infra_pid_start:
        return same_process(pod.infra_pid, pod.infra_pid_start)
    return process_start_time(pod.infra_pid) > 0


def _infra_gone(pod: SandboxRecord) -> str:
    return f"its infra process {pod.infra_pid} is gone"


def _namespace_problem(pod: SandboxRecord) -> str:
    for kind, path in sorted(pod.namespaces.items()):
        if not _is_namespace(path):
            return f"its {kind} namespace {path} is gone"
    return ""


def _is_namespace(path: Path | str) -> bool:
    from pycrio.network.namespaces import is_namespace  # the network layer owns what a pin is

    return is_namespace(path)

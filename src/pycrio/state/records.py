"""Pod sandbox and container records: what pycrio knows about each, persisted as JSON."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from typing import Any

from pycrio.cri import api_pb2

SANDBOX_READY = "ready"
SANDBOX_NOTREADY = "notready"
CONTAINER_CREATED = "created"
CONTAINER_RUNNING = "running"
CONTAINER_EXITED = "exited"
CONTAINER_UNKNOWN = "unknown"

_SANDBOX_STATES = {SANDBOX_READY: api_pb2.SANDBOX_READY, SANDBOX_NOTREADY: api_pb2.SANDBOX_NOTREADY}
_CONTAINER_STATES = {
    CONTAINER_CREATED: api_pb2.CONTAINER_CREATED,
    CONTAINER_RUNNING: api_pb2.CONTAINER_RUNNING,
    CONTAINER_EXITED: api_pb2.CONTAINER_EXITED,
    CONTAINER_UNKNOWN: api_pb2.CONTAINER_UNKNOWN,
}


def encode_message(message: Any) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def _cached_cri(record: Any, key: Any) -> Any:
    """`record._build_cri()`, kept in the record (not a dataclass field: never saved) until `key`
    (what the message shows of a record changed in place) differs."""
    cached = record.__dict__.get("_cri")
    if cached is not None and cached[0] == key:
        return cached[1]
    message = record._build_cri()
    record.__dict__["_cri"] = (key, message)
    return message


def decode_message(cls: Any, text: str) -> Any:
    message = cls()
    message.ParseFromString(base64.b64decode(text))
    return message


@dataclass
class SandboxRecord:
    """One pod sandbox: its CRI config, where its namespaces are pinned, its network."""

    id: str
    config: str  # base64 PodSandboxConfig
    runtime_handler: str
    created_at: int
    state: str = SANDBOX_READY
    namespaces: dict[str, str] = field(default_factory=dict)  # kind -> pinned ns file
    ips: list[str] = field(default_factory=list)
    cgroup_parent: str = ""  # the pod's cgroup: kubelet's cgroup_parent, or one pycrio made
    owns_cgroup: bool = False  # pycrio made cgroup_parent and removes it with the pod
    directory: str = ""  # <runroot>/pods/<id>
    infra_id: str = ""  # infra (catatonit) container when the pod shares its PID namespace
    infra_pid: int = 0
    infra_pid_start: int = 0  # its start time (/proc/<pid>/stat), so a recycled pid is not taken for it
    complete: bool = False  # RunPodSandbox finished; an incomplete record after a crash is debris
    # The pod-level resources in effect (base64 LinuxContainerResources): RunPodSandbox's config,
    # then what UpdatePodSandboxResources (kubelet's in-place resize) last gave.
    resources: str = ""
    overhead: str = ""

    @property
    def pod_config(self) -> api_pb2.PodSandboxConfig:
        return decode_message(api_pb2.PodSandboxConfig, self.config)

    def to_cri(self) -> api_pb2.PodSandbox:
        """The CRI PodSandbox, built once per record and state (ListPodSandbox copies it)."""
        return _cached_cri(self, self.state)

    def _build_cri(self) -> api_pb2.PodSandbox:
        config = self.pod_config
        return api_pb2.PodSandbox(
            id=self.id,
            metadata=config.metadata,
            state=_SANDBOX_STATES[self.state],
            created_at=self.created_at,
            labels=config.labels,
            annotations=config.annotations,
            runtime_handler=self.runtime_handler,
        )

    @property
    def cri_state(self) -> int:
        return _SANDBOX_STATES[self.state]

    @property
    def pod_resources(self) -> api_pb2.LinuxContainerResources | None:
        return decode_message(api_pb2.LinuxContainerResources, self.resources) if self.resources else None

    @property
    def pod_overhead(self) -> api_pb2.LinuxContainerResources | None:
        return decode_message(api_pb2.LinuxContainerResources, self.overhead) if self.overhead else None

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod_config.labels)


@dataclass
class ContainerRecord:
    """One container: its CRI config, image, bundle, log and last known runtime state."""

    id: str
    pod_id: str
    config: str  # base64 ContainerConfig
    image: str  # the image as the CRI asked for it
    image_ref: str  # image id (config digest)
    image_name: str  # a repo tag or digest naming image_ref
    runtime_handler: str
    created_at: int
    log_path: str
    bundle: str
    state: str = CONTAINER_CREATED
    pid: int = 0
    pid_start_time: int = 0  # of `pid` (/proc/<pid>/stat): a recycled pid is not this container's
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    user: list[int] = field(default_factory=list)  # uid, gid, additional gids of the first process
    stop_signal: int = 0  # the signal StopContainer sends (config, else image, else SIGTERM); 0: not recorded
    image_digest: str = ""  # the image as a repo digest reference (name@sha256:...), when it has one
    retired: bool = False  # exited, and the runtime let go of it (runtime delete done, rootfs unmounted)

    @property
    def container_config(self) -> api_pb2.ContainerConfig:
        """A decoded copy the caller may change."""
        return decode_message(api_pb2.ContainerConfig, self.config)

    @functools.cached_property
    def _config(self) -> api_pb2.ContainerConfig:
        # decoded once per record (records are replaced, not changed): kubelet lists every second
        return self.container_config

    @property
    def cri_state(self) -> int:
        return _CONTAINER_STATES[self.state]

    @functools.cached_property
    def labels(self) -> dict[str, str]:
        return dict(self._config.labels)

    def to_cri(self) -> api_pb2.Container:
        """The CRI Container, built once per record and state (ListContainers copies it)."""
        return _cached_cri(self, (self.state, self.image_name, self.image, self.image_ref, self.created_at))

    def _build_cri(self) -> api_pb2.Container:
        config = self._config
        return api_pb2.Container(
            id=self.id,
            pod_sandbox_id=self.pod_id,
            metadata=config.metadata,
            image=api_pb2.ImageSpec(
                image=self.image_name or self.image, user_specified_image=config.image.user_specified_image
            ),
            image_ref=self.image_ref,
            image_id=self.image_ref,
            state=self.cri_state,
            created_at=self.created_at,
            labels=config.labels,
            annotations=config.annotations,
        )

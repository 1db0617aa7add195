"""ContainerStatus: refreshed from the runtime, with the user the process started as, the
resources in effect (the bundle's spec, kept up to date by UpdateContainerResources) and the stop
signal; `image.user_specified_image` is the name CreateContainer was given (kubelet's pod spec
image: it sends the image id as `image`); `image_ref` is the repo digest reference
(name@sha256:..., as CRI-O and containerd give it), `image_id` the image's id. `verbose` adds the
pid and the OCI spec."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from pycrio.cri import api_pb2
from pycrio.pods.containers import cri_signal
from pycrio.server.daemon import Daemon
from pycrio.state.records import ContainerRecord


def container_status(daemon: Daemon, request: api_pb2.ContainerStatusRequest) -> api_pb2.ContainerStatusResponse:
    c = daemon.containers.refresh(daemon.state.get_container(request.container_id))
    oci_spec = _read_spec(Path(c.bundle) / "config.json")
    response = api_pb2.ContainerStatusResponse(status=container_status_of(c, oci_spec))
    if request.verbose:
        info: dict[str, Any] = {
            "pid": daemon.containers.live_pid(c), "sandboxID": c.pod_id, "runtimeHandler": c.runtime_handler,
        }  # fmt: skip
        if oci_spec is not None:
            info["runtimeSpec"] = oci_spec
        response.info["info"] = json.dumps(info)
    return response


def container_status_of(c: ContainerRecord, oci_spec: dict[str, Any] | None = None) -> api_pb2.ContainerStatus:
    """The CRI status of a record; `oci_spec` (the bundle's, read if not given) gives the resources."""
    config = c.container_config
    if oci_spec is None:
        oci_spec = _read_spec(Path(c.bundle) / "config.json")
    return api_pb2.ContainerStatus(
        id=c.id,
        metadata=config.metadata,
        state=c.cri_state,
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        exit_code=c.exit_code,
        image=api_pb2.ImageSpec(
            image=c.image_name or c.image, user_specified_image=config.image.user_specified_image
        ),
        image_ref=c.image_digest or c.image_ref,
        image_id=c.image_ref,
        reason=c.reason,
        message=c.message,
        labels=config.labels,
        annotations=config.annotations,
        mounts=config.mounts,
        log_path=c.log_path,
        resources=resources_in_effect(oci_spec or {}),
        user=container_user(c),
        stop_signal=cri_signal(c.stop_signal or signal.SIGTERM),
    )


def _read_spec(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def resources_in_effect(oci_spec: dict[str, Any]) -> api_pb2.ContainerResources:
    """The CRI form of the spec's linux.resources and process.oomScoreAdj."""
    resources = oci_spec.get("linux", {}).get("resources", {}) or {}
    cpu, memory = resources.get("cpu", {}) or {}, resources.get("memory", {}) or {}
    linux = api_pb2.LinuxContainerResources(
        cpu_period=int(cpu.get("period") or 0),
        cpu_quota=int(cpu.get("quota") or 0),
        cpu_shares=int(cpu.get("shares") or 0),
        cpuset_cpus=str(cpu.get("cpus") or ""),
        cpuset_mems=str(cpu.get("mems") or ""),
        memory_limit_in_bytes=int(memory.get("limit") or 0),
        memory_swap_limit_in_bytes=int(memory.get("swap") or 0),
        oom_score_adj=int(oci_spec.get("process", {}).get("oomScoreAdj") or 0),
        hugepage_limits=[
            api_pb2.HugepageLimit(page_size=str(h.get("pageSize", "")), limit=int(h.get("limit") or 0))
            for h in resources.get("hugepageLimits") or []
        ],
        unified={str(k): str(v) for k, v in (resources.get("unified") or {}).items()},
    )
    return api_pb2.ContainerResources(linux=linux)


def container_user(c: ContainerRecord) -> api_pb2.ContainerUser:
    """The identity the container's first process started with (from the spec pycrio wrote)."""
    ids = c.user or _user_from_spec(Path(c.bundle) / "config.json")
    if len(ids) < 2:
        return api_pb2.ContainerUser()
    return api_pb2.ContainerUser(
        linux=api_pb2.LinuxContainerUser(uid=ids[0], gid=ids[1], supplemental_groups=ids[2:])
    )


def _user_from_spec(path: Path) -> list[int]:
    """For records written before pycrio kept the user: process.user of the bundle's spec."""
    try:
        user = json.loads(path.read_text())["process"]["user"]
        return [int(user["uid"]), int(user["gid"]), *map(int, user.get("additionalGids") or [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []

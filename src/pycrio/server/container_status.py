"""ContainerStatus: refreshed from the runtime, with the user the process started as; `verbose`
adds the pid and the OCI spec."""

from __future__ import annotations

import json
from pathlib import Path

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.state.records import ContainerRecord


def container_status(daemon: Daemon, request: api_pb2.ContainerStatusRequest) -> api_pb2.ContainerStatusResponse:
    c = daemon.containers.refresh(daemon.state.get_container(request.container_id))
    response = api_pb2.ContainerStatusResponse(status=container_status_of(c))
    if request.verbose:
        spec_path = Path(c.bundle) / "config.json"
        info = {"pid": c.pid, "sandboxID": c.pod_id, "runtimeHandler": c.runtime_handler}
        if spec_path.exists():
            info["runtimeSpec"] = json.loads(spec_path.read_text())
        response.info["info"] = json.dumps(info)
    return response


def container_status_of(c: ContainerRecord) -> api_pb2.ContainerStatus:
    config = c.container_config
    return api_pb2.ContainerStatus(
        id=c.id,
        metadata=config.metadata,
        state=c.cri_state,
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        exit_code=c.exit_code,
        image=api_pb2.ImageSpec(image=c.image_name or c.image),
        image_ref=c.image_ref,
        image_id=c.image_ref,
        reason=c.reason,
        message=c.message,
        labels=config.labels,
        annotations=config.annotations,
        mounts=config.mounts,
        log_path=c.log_path,
        user=container_user(c),
    )


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

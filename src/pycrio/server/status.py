"""Status: runtime and network readiness, the runtime handlers and their features; `verbose` adds
the effective config, tracing export health and metrics endpoints as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from pycrio import __version__
from pycrio.cri import api_pb2
from pycrio.errors import CRIError
from pycrio.oci import features
from pycrio.server.daemon import Daemon

NETWORK_NOT_READY_REASON = "NetworkPluginNotReady"


def status(daemon: Daemon, request: api_pb2.StatusRequest) -> api_pb2.StatusResponse:
    network_ready, network_message = daemon.cni.status()
    conditions = [
        api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
        # Without a CNI network kubelet keeps the node NotReady instead of failing pods later.
        api_pb2.RuntimeCondition(
            type="NetworkReady",
            status=network_ready,
            reason="" if network_ready else NETWORK_NOT_READY_REASON,
            message="" if network_ready else f"Network plugin returns error: {network_message}",
        ),
    ]
    handlers = handler_features(daemon)
    response = api_pb2.StatusResponse(
        status=api_pb2.RuntimeStatus(conditions=conditions),
        runtime_handlers=runtime_handlers(handlers),
        features=api_pb2.RuntimeFeatures(supplemental_groups_policy=True),
    )
    if request.verbose:
        response.info["config"] = json.dumps(dataclasses.asdict(daemon.config), sort_keys=True)
        response.info["version"] = json.dumps({"runtime_name": "pycrio", "runtime_version": __version__})
        response.info["daemon"] = json.dumps(
            {
                "uptime_seconds": round(time.time() - daemon.started_at, 3),
                "pid": os.getpid(),
                "tracing_active": daemon.tracing is not None and daemon.tracing.enabled,
                "pod_cidr": daemon.state.pod_cidr,
            }
        )
        response.info["runtimeHandlers"] = json.dumps(daemon.handlers.report())
        response.info["runtimeFeatures"] = json.dumps(
            {name: {**dataclasses.asdict(f), "mount_options": sorted(f.mount_options)} for name, f in handlers.items()},
            sort_keys=True,
        )
        if daemon.tracing is not None:
            response.info["tracing"] = json.dumps(daemon.tracing.describe(), sort_keys=True)
        response.info["streaming"] = json.dumps(daemon.streams.describe(), sort_keys=True)
        response.info["metrics"] = json.dumps(
            daemon.metrics.describe() if daemon.metrics is not None else {"enabled": False}, sort_keys=True
        )
    return response


def handler_features(daemon: Daemon) -> dict[str, features.HandlerFeatures]:
    """Each configured handler's features; "" is the default handler."""
    found: dict[str, features.HandlerFeatures] = {}
    default = daemon.handlers.name_of("")
    for name in ["", *daemon.config.runtime.runtimes]:
        try:
            found[name] = features.of_runtime(daemon.handlers.get(name or default))
        except CRIError as exc:  # configured but unusable here: it can do nothing
            found[name] = features.HandlerFeatures(reason=exc.message)
    return found


def runtime_handlers(handlers: dict[str, features.HandlerFeatures]) -> list[api_pb2.RuntimeHandler]:
    return [
        api_pb2.RuntimeHandler(
            name=name,
            features=api_pb2.RuntimeHandlerFeatures(
                recursive_read_only_mounts=f.recursive_read_only_mounts, user_namespaces=f.user_namespaces
            ),
        )
        for name, f in handlers.items()
    ]

"""Which handler serves which CRI method, and on which thread pool; every other method answers
UNIMPLEMENTED by name.

To implement a CRI method: write its handler in the module named after it and list it here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.errors import Unimplemented
from pycrio.server import (
    container_attach,
    container_create,
    container_events,
    container_exec,
    container_execsync,
    container_list,
    container_log,
    container_portforward,
    container_remove,
    container_start,
    container_stop,
    container_stats,
    container_status,
    container_update,
    image_fs_info,
    image_list,
    image_pull,
    image_remove,
    image_status,
    metrics,
    runtime_config,
    sandbox_list,
    sandbox_remove,
    sandbox_run,
    sandbox_stop,
    sandbox_stats,
    sandbox_status,
    sandbox_update_resources,
    status,
    version,
)
from pycrio.server.daemon import Daemon

Handler = Callable[[Daemon, Any], Any]

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"

HANDLERS: dict[str, dict[str, Handler]] = {
    RUNTIME_SERVICE: {
        "Version": version.version,
        "Status": status.status,
        "RuntimeConfig": runtime_config.runtime_config,
        "UpdateRuntimeConfig": runtime_config.update_runtime_config,
        "RunPodSandbox": sandbox_run.run_pod_sandbox,
        "StopPodSandbox": sandbox_stop.stop_pod_sandbox,
        "RemovePodSandbox": sandbox_remove.remove_pod_sandbox,
        "ListPodSandbox": sandbox_list.list_pod_sandbox,
        "StreamPodSandboxes": sandbox_list.stream_pod_sandboxes,
        "PodSandboxStatus": sandbox_status.pod_sandbox_status,
        "UpdatePodSandboxResources": sandbox_update_resources.update_pod_sandbox_resources,
        "PodSandboxStats": sandbox_stats.pod_sandbox_stats,
        "ListPodSandboxStats": sandbox_stats.list_pod_sandbox_stats,
        "StreamPodSandboxStats": sandbox_stats.stream_pod_sandbox_stats,
        "CreateContainer": container_create.create_container,
        "StartContainer": container_start.start_container,
        "StopContainer": container_stop.stop_container,
        "RemoveContainer": container_remove.remove_container,
        "ExecSync": container_execsync.exec_sync,
        "Exec": container_exec.exec_,
        "Attach": container_attach.attach,
        "PortForward": container_portforward.port_forward,
        "GetContainerEvents": container_events.get_container_events,
        "UpdateContainerResources": container_update.update_container_resources,
        "ReopenContainerLog": container_log.reopen_container_log,
        "ListContainers": container_list.list_containers,
        "StreamContainers": container_list.stream_containers,
        "ContainerStatus": container_status.container_status,
        "ContainerStats": container_stats.container_stats,
        "ListContainerStats": container_stats.list_container_stats,
        "StreamContainerStats": container_stats.stream_container_stats,
        "ListMetricDescriptors": metrics.list_metric_descriptors,
        "ListPodSandboxMetrics": metrics.list_pod_sandbox_metrics,
        "StreamPodSandboxMetrics": metrics.stream_pod_sandbox_metrics,
    },
    IMAGE_SERVICE: {
        "ListImages": image_list.list_images,
        "StreamImages": image_list.stream_images,
        "ImageStatus": image_status.image_status,
        "ImageFsInfo": image_fs_info.image_fs_info,
        "PullImage": image_pull.pull_image,
        "RemoveImage": image_remove.remove_image,
    },
}


# Calls that can wait on something slow: a grace period, a registry, a command in a container, CNI
# plugins, or a client that keeps a stream open. They run on their own pool (gRPC's per-method
# `experimental_thread_pool`), so the server's pool stays free for kubelet's Status, List* and
# *Status polling however many pods drain at once.
LONG_METHODS = frozenset(
    {
        "RunPodSandbox",
        "StopPodSandbox",
        "RemovePodSandbox",
        "UpdatePodSandboxResources",  # waits for the pod's lock (a StopPodSandbox's grace period)
        "CreateContainer",
        "StartContainer",
        "StopContainer",
        "RemoveContainer",
        "ExecSync",
        "GetContainerEvents",
        "PullImage",
        "RemoveImage",
    }
)


def cri_methods(service: str) -> list[str]:
    """Every method the pinned CRI api.proto declares for `service`."""
    return [m.name for m in api_pb2.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods]


def _unimplemented(service: str, method: str) -> Handler:
    def handler(daemon: Daemon, request: Any) -> Any:
        raise Unimplemented(f"/{service}/{method} is not implemented by pycrio yet")

    return handler


class _Servicer:
    """An object with one attribute per CRI method, the shape the generated `add_*` functions want."""

    def __init__(self, daemon: Daemon, service: str, long_pool: ThreadPoolExecutor | None = None) -> None:
        for method in cri_methods(service):
            handler = HANDLERS[service].get(method) or _unimplemented(service, method)
            behavior = self._bind(daemon, handler)
            if long_pool is not None and method in LONG_METHODS:
                behavior.experimental_thread_pool = long_pool  # type: ignore[attr-defined]
            setattr(self, method, behavior)

    @staticmethod
    def _bind(daemon: Daemon, handler: Handler) -> Callable[[Any, grpc.ServicerContext], Any]:
        if getattr(handler, "needs_context", False):  # long streams watch for the client going away

            def with_context(request: Any, context: grpc.ServicerContext) -> Any:
                return handler(daemon, request, context)  # type: ignore[call-arg]

            return with_context

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            return handler(daemon, request)

        return behavior


def add_cri_services(server: grpc.Server, daemon: Daemon, long_pool: ThreadPoolExecutor | None = None) -> None:
    """Register both CRI services, every method, on `server`; LONG_METHODS run on `long_pool`."""
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(_Servicer(daemon, RUNTIME_SERVICE, long_pool), server)
    api_pb2_grpc.add_ImageServiceServicer_to_server(_Servicer(daemon, IMAGE_SERVICE, long_pool), server)

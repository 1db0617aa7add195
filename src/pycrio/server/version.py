"""Version: who answers on this socket."""

from __future__ import annotations

from pycrio import __version__
from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon

RUNTIME_NAME = "pycrio"
RUNTIME_API_VERSION = "v1"
# Kubelet sends "0.1.0" and ignores this; it is what CRI-O answers too.
KUBE_API_VERSION = "0.1.0"


def version(daemon: Daemon, request: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
    return api_pb2.VersionResponse(
        version=KUBE_API_VERSION,
        runtime_name=RUNTIME_NAME,
        runtime_version=__version__,
        runtime_api_version=RUNTIME_API_VERSION,
    )

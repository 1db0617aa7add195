"""ImageFsInfo: real disk usage of the image store (containers' writable layers live there too)."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def image_fs_info(daemon: Daemon, request: api_pb2.ImageFsInfoRequest) -> api_pb2.ImageFsInfoResponse:
    usage = daemon.images.store.usage()
    return api_pb2.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])

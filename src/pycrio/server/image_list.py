"""ListImages and StreamImages."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.server.streaming_list import chunks


def list_images(daemon: Daemon, request: api_pb2.ListImagesRequest) -> api_pb2.ListImagesResponse:
    return api_pb2.ListImagesResponse(images=daemon.images.list(request.filter))


def stream_images(daemon: Daemon, request: api_pb2.StreamImagesRequest) -> Iterator[api_pb2.StreamImagesResponse]:
    for chunk in chunks(daemon.images.list(request.filter)):
        yield api_pb2.StreamImagesResponse(images=chunk)

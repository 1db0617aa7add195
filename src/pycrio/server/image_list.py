"""ListImages and StreamImages."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.server.streaming_list import chunks


def _matching(daemon: Daemon, flt: api_pb2.ImageFilter) -> list[api_pb2.Image]:
    store = daemon.images.store
    wanted = flt.image.image
    if not wanted:
        return [store.to_cri(r) for r in store.records()]
    record = daemon.images.lookup(wanted)
    return [store.to_cri(record)] if record else []


def list_images(daemon: Daemon, request: api_pb2.ListImagesRequest) -> api_pb2.ListImagesResponse:
    return api_pb2.ListImagesResponse(images=_matching(daemon, request.filter))


def stream_images(daemon: Daemon, request: api_pb2.StreamImagesRequest) -> Iterator[api_pb2.StreamImagesResponse]:
    for chunk in chunks(_matching(daemon, request.filter)):
        yield api_pb2.StreamImagesResponse(images=chunk)

"""ImageStatus: an image that is not present is an empty answer, not an error (CRI semantics)."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon


def image_status(daemon: Daemon, request: api_pb2.ImageStatusRequest) -> api_pb2.ImageStatusResponse:
    if not request.image.image:
        raise InvalidArgument("image reference must not be empty")
    image = daemon.images.find(request.image.image)
    return api_pb2.ImageStatusResponse(image=image) if image is not None else api_pb2.ImageStatusResponse()

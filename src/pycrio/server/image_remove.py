"""RemoveImage: idempotent; refuses an image containers use; frees the blobs and layers no other image uses."""

from __future__ import annotations

import logging

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon

log = logging.getLogger("pycrio.server")


def remove_image(daemon: Daemon, request: api_pb2.RemoveImageRequest) -> api_pb2.RemoveImageResponse:
    reference = request.image.image
    if not reference:
        raise InvalidArgument("image reference must not be empty")
    record = daemon.images.remove(reference)  # FAILED_PRECONDITION while containers use it
    if record is None:
        log.info("image %s is not present, nothing to remove", reference)
        return api_pb2.RemoveImageResponse()
    log.info("removed image %s (%s)", reference, record.id)
    return api_pb2.RemoveImageResponse()

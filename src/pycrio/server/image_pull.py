"""PullImage: fetch an image from its registry; the span's children show where the time went."""

from __future__ import annotations

import logging

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.images.registry import credentials_from_cri
from pycrio.server.daemon import Daemon

log = logging.getLogger("pycrio.server")


def pull_image(daemon: Daemon, request: api_pb2.PullImageRequest) -> api_pb2.PullImageResponse:
    image = request.image.image
    if not image:
        raise InvalidArgument("image reference must not be empty")
    auth = request.auth
    credentials = credentials_from_cri(
        auth.username,
        auth.password,
        auth.auth,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
        server_address=auth.server_address,
    )
    record = daemon.images.puller.pull(image, credentials)
    log.info("pulled image %s: %s", image, record.id)
    return api_pb2.PullImageResponse(image_ref=record.id)

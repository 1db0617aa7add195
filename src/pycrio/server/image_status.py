"""ImageStatus: an image that is not present is an empty answer, not an error (CRI semantics)."""

from __future__ import annotations

import json

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon


def image_status(daemon: Daemon, request: api_pb2.ImageStatusRequest) -> api_pb2.ImageStatusResponse:
    if not request.image.image:
        raise InvalidArgument("image reference must not be empty")
    record = daemon.images.lookup(request.image.image)
    if record is None:
        return api_pb2.ImageStatusResponse()
    store = daemon.images.store
    response = api_pb2.ImageStatusResponse(image=store.to_cri(record))
    if request.verbose:
        response.info["info"] = json.dumps(
            {
                "manifestDigest": record.manifest_digest,
                "layers": record.layer_blobs,
                "diffIDs": record.diff_ids,
                "pulledAt": record.pulled_at,
                "imageSpec": json.loads(store.blobs.read(record.config_digest)),
            }
        )
    return response

"""Attach: a URL on the stream server for the stdio of a running container's main process."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def attach(daemon: Daemon, request: api_pb2.AttachRequest) -> api_pb2.AttachResponse:
    return api_pb2.AttachResponse(url=daemon.streams.attach_url(request))

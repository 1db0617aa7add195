"""The local image store under `<root>/storage`: what is pulled, and how much disk it takes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pycrio.cri import api_pb2


class ImageStore:
    """Images known locally, keyed by id (the config digest); empty until pulls fill it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._images: dict[str, api_pb2.Image] = {}

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def list(self, flt: api_pb2.ImageFilter | None = None) -> list[api_pb2.Image]:
        with self._lock:
            images = list(self._images.values())
        wanted = flt.image.image if flt is not None and flt.HasField("image") else ""
        if not wanted:
            return images
        return [i for i in images if self._matches(i, wanted)]

    def find(self, reference: str) -> api_pb2.Image | None:
        """The image a reference (id, id prefix, tag or digest reference) names, if present."""
        with self._lock:
            images = list(self._images.values())
        for image in images:
            if self._matches(image, reference):
                return image
        return None

    @staticmethod
    def _matches(image: api_pb2.Image, reference: str) -> bool:
        bare = reference.removeprefix("sha256:")
        return (
            image.id == reference
            or image.id.removeprefix("sha256:").startswith(bare)
            or reference in image.repo_tags
            or reference in image.repo_digests
        )

    def usage(self) -> api_pb2.FilesystemUsage:
        """Bytes and inodes the store's directory really uses on disk (allocated blocks)."""
        used_bytes = 0
        inodes = 0
        for dirpath, dirnames, filenames in os.walk(self.directory):
            for name in dirnames + filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:  # removed while we walked
                    continue
                used_bytes += st.st_blocks * 512
                inodes += 1
        try:
            st = os.lstat(self.directory)
            used_bytes += st.st_blocks * 512
            inodes += 1
        except FileNotFoundError:
            pass
        return api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.directory)),
            used_bytes=api_pb2.UInt64Value(value=used_bytes),
            inodes_used=api_pb2.UInt64Value(value=inodes),
        )

"""Images: the local store (registry client, blobs and unpacking come with the images issue)."""

from pycrio.images.store import ImageStore

__all__ = ["ImageStore"]

"""Images: references, registry client, blob store, layer unpacking, container root filesystems."""

from pycrio.images.manager import ImageManager
from pycrio.images.store import ImageRecord, ImageStore

__all__ = ["ImageManager", "ImageRecord", "ImageStore"]

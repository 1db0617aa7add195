"""Images: references, registry client, blob store, layer unpacking, container root filesystems."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycrio.images.manager import ImageManager
    from pycrio.images.store import ImageRecord, ImageStore

__all__ = ["ImageManager", "ImageRecord", "ImageStore"]


def __getattr__(name: str) -> Any:
    # Lazy: the configuration loader reads registries.conf through pycrio.images.registries_conf,
    # and `pycrio config` must not pay for the registry client and the store.
    if name == "ImageManager":
        from pycrio.images.manager import ImageManager

        return ImageManager
    if name in ("ImageRecord", "ImageStore"):
        from pycrio.images import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

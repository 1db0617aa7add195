"""Image volumes (CRI `Mount.image`, KEP 4639): an image's file system mounted into a container.

Each image volume of a container gets its own root file system under the container's directory
(`<containers>/<id>/image-volumes/<n>/rootfs`, built like a container rootfs: an overlay of the
image's layers, or a copy), which the OCI spec binds read-only at the mount's container path.
`release_rootfs` of the container unmounts and removes them together with its own rootfs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pycrio.errors import InvalidArgument
from pycrio.images.rootfs import mount_rootfs
from pycrio.oci.spec import secure_join

VOLUMES_DIR = "image-volumes"


def mount_image_volume(layers: list[Path], container_dir: Path, index: int) -> Path:
    """The root file system of image volume `index` of the container at `container_dir`."""
    return mount_rootfs(layers, container_dir / VOLUMES_DIR / str(index))


def sub_path_source(rootfs: Path, sub_path: str, where: str = "image volume") -> Path:
    """The directory `sub_path` names inside `rootfs`, symlinks resolved as if `rootfs` were "/".

    Absolute paths and `..` are refused; a symlink pointing outside stays inside (as openat2's
    RESOLVE_IN_ROOT and Go's os.OpenInRoot do). Only directories can be mounted (the KEP's rule).
    """
    if not sub_path or sub_path.strip("/") in ("", "."):
        return rootfs
    if sub_path.startswith("/") or ".." in sub_path.split("/"):
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r} must be a relative path without '..'")
    try:
        target = secure_join(rootfs, sub_path)
    except OSError as exc:
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r}: {exc.strerror}") from None
    real_root = os.path.realpath(rootfs)
    real = os.path.realpath(target)
    if real != real_root and not real.startswith(real_root + "/"):  # cannot happen after secure_join
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r} leads out of the image")
    try:
        info = os.lstat(real)
    except FileNotFoundError:
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r} does not exist in the image") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r} is not a directory (only directories mount)")
    return Path(real)

"""The images layer as the rest of pycrio sees it: the store, pulls, and container root filesystems."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pycrio.config import Config, ImageConfig
from pycrio.errors import InvalidArgument, NotFound
from pycrio.images.pull import ImagePuller
from pycrio.images.reference import resolve_candidates
from pycrio.images.registries_conf import RegistriesConf
from pycrio.images.registry import RegistryClient
from pycrio.images.rootfs import mount_rootfs, release_rootfs, unmount_rootfs
from pycrio.images.store import ImageInUse, ImageRecord, ImageStore
from pycrio.images.volumes import mount_image_volume
from pycrio.trash import Trash

log = logging.getLogger("pycrio.images")


class ImageManager:
    """Owns the image store under `<root>/storage` and everything that reads or fills it."""

    def __init__(self, config: Config) -> None:
        self.config = config.image
        self.directory = Path(config.root) / "storage"
        self.store = ImageStore(self.directory, self.config.pinned_images)
        self.client = RegistryClient(
            insecure_registries=self.config.insecure_registries, platform=self.config.platform
        )
        self.puller = ImagePuller(self.store, self.client, self.config)
        self.containers_dir = self.directory / "containers"
        self.trash = Trash(self.directory / ".trash")  # removed container trees, deleted in the background

    def set_registries(self, registries: RegistriesConf) -> None:
        """Use these registries.conf rules from the next pull on (start-up and SIGHUP)."""
        self.puller.registries = registries
        files = ", ".join(registries.files) or "no files"
        log.info("registries configuration from %s: %s", files, registries.describe())
        if registries.use_search:
            log.info("short names are searched in %s (unqualified-search-registries of %s)",
                     ", ".join(registries.search_registries or ()), registries.search_origin)
        for ignored in registries.ignored:
            log.debug("registries configuration: %s is not used by pycrio", ignored)

    def apply(self, image: ImageConfig) -> None:
        """Take the live keys of a reloaded [pycrio.image]: search and insecure registries."""
        self.config.unqualified_search_registries = list(image.unqualified_search_registries)
        self.config.insecure_registries = list(image.insecure_registries)
        self.client.insecure_registries = frozenset(image.insecure_registries)
        self.config.registries_conf = image.registries_conf
        self.config.registries_conf_dir = image.registries_conf_dir

    def open(self) -> None:
        self.store.open()
        self.containers_dir.mkdir(parents=True, exist_ok=True)

    def use_containers(self, in_use: Callable[[], Mapping[str, Iterable[str]]]) -> None:
        """Where to learn which images the containers use (image id -> container ids): the daemon
        passes the container records' view, so that RemoveImage refuses an image in use."""
        self.store.in_use = in_use

    def remove(self, reference: str) -> ImageRecord | None:
        """Remove the image `reference` names; None if there is none. FAILED_PRECONDITION
        (naming them) while containers use it: their overlays stand on its layers."""
        record = self.lookup(reference)
        try:
            if record is None or not self.store.remove(record):
                return None
        except ImageInUse as exc:
            raise ImageInUse(exc.image_id, exc.containers, reference) from None
        return record

    def close(self) -> None:
        """Stop background workers and connections (daemon shutdown)."""
        self.puller.close()
        self.client.close()

    def lookup(self, reference: str) -> ImageRecord | None:
        """The local image a CRI reference names: id, id prefix, or a (short) name with tag/digest."""
        names = [reference]
        try:
            candidates = resolve_candidates(reference, self.puller.search_registries())
        except InvalidArgument:  # not an image name: it may still be an id or id prefix
            candidates = []
        for c in candidates:
            names.append(f"{c.name}@{c.digest}" if c.digest else f"{c.name}:{c.tag}")
        return self.store.find_record(*names)

    def prepare_rootfs(self, reference: str, container_id: str) -> Path:
        """A ready root filesystem for a container of `reference` (overlay, or a copy).

        From here until release_rootfs the image counts as used by the container, even before
        its record exists: a RemoveImage in between is refused rather than pulling the layers
        out from under the overlay."""
        record = self.lookup(reference)
        if record is None:
            raise NotFound(f"image {reference!r} is not present: pull it first")
        record = self.store.lease(container_id, record.id)
        return mount_rootfs(self.store.layer_paths(record), self.containers_dir / container_id)

    def mount_image_volume(self, image: ImageRecord, container_id: str, index: int) -> Path:
        """The root filesystem of image volume `index` of a container; the image counts as used
        by the container until release_rootfs (as for prepare_rootfs)."""
        record = self.store.lease(container_id, image.id)
        return mount_image_volume(self.store.layer_paths(record), self.containers_dir / container_id, index)

    def unmount_rootfs(self, container_id: str) -> None:
        """Unmount a container's root filesystem and image volumes once it has exited; its files
        (the writable layer) stay until release_rootfs."""
        unmount_rootfs(self.containers_dir / container_id)

    def release_rootfs(self, container_id: str) -> None:
        """Unmount and delete a container's root filesystem (and image volumes); fine if already gone."""
        release_rootfs(self.containers_dir / container_id, self.trash.discard)
        self.store.release(container_id)

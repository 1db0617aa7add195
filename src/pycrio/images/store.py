"""The local image store under `<root>/storage`: image records, blobs and unpacked layers.

Layout: `images/<id hex>.json` (one record per image, written atomically and durably),
`blobs/sha256/<hex>` (verified content), `ingest/` (downloads in progress), `layers/<diff id hex>/`
(one unpacked layer per diff id, shared by every image that has it).

What may not be deleted, decided under the store's one lock: an image a container uses (as its
root file system or as an image volume: the daemon's `in_use` callback over the container records,
plus the leases taken while a container is being made) is refused removal; blobs and layers a pull
in progress relies on (its pins) are kept when another image sharing them is removed.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pycrio import durable
from pycrio.cri import api_pb2
from pycrio.disk import disk_usage
from pycrio.errors import DataLoss, FailedPrecondition, NotFound
from pycrio.images.blobs import BlobStore, digest_hex

log = logging.getLogger("pycrio.images")

TRASH_PREFIX = ".removing-"


@dataclass
class ImageRecord:
    """One image as pycrio keeps it; `id` is the config digest."""

    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    manifest_digest: str
    config_digest: str
    layer_blobs: list[dict[str, object]]  # descriptors: mediaType, digest, size
    diff_ids: list[str]
    size: int
    user: str = ""
    pulled_at: float = field(default_factory=time.time)

    def to_cri(self, pinned: bool = False) -> api_pb2.Image:
        image = api_pb2.Image(
            id=self.id,
            repo_tags=self.repo_tags,
            repo_digests=self.repo_digests,
            size=self.size,
            pinned=pinned,
        )
        uid, username = parse_user(self.user)
        if uid is not None:
            image.uid.value = uid
        image.username = username
        return image

    def blob_digests(self) -> set[str]:
        return {self.config_digest, *(str(d["digest"]) for d in self.layer_blobs)}


def parse_user(user: str) -> tuple[int | None, str]:
    """CRI's split of an image's `User`: a numeric uid, or a user name (group part dropped)."""
    name = user.split(":", 1)[0]
    if name.isdigit():
        return int(name), ""
    return None, name


class ImageInUse(FailedPrecondition):
    """RemoveImage of an image containers still use (CRI-O: "image is in use by a container")."""

    def __init__(self, image_id: str, containers: list[str], reference: str = "") -> None:
        shown = ", ".join(containers[:10]) + (f" and {len(containers) - 10} more" if len(containers) > 10 else "")
        named = f"{reference} ({image_id})" if reference and reference != image_id else image_id
        super().__init__(f"image {named} is in use by container(s) {shown}: remove them first")
        self.image_id = image_id
        self.containers = containers


class Pins:
    """Digests and diff ids a pull relies on until its record is committed (see ImageStore.pinned)."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        self.keys: list[str] = []

    def add(self, *keys: str) -> None:
        with self._store.lock:
            self._store._pins.update(keys)
            self.keys.extend(keys)


class ImageStore:
    """Images known locally. Safe for concurrent CRI calls; records persist across restarts."""

    def __init__(self, directory: Path, pinned_patterns: list[str] | None = None) -> None:
        self.directory = directory
        self.pinned_patterns = list(pinned_patterns or [])
        self.blobs = BlobStore(directory)
        self.records_dir = directory / "images"
        self.layers_dir = directory / "layers"
        self.lock = threading.RLock()
        self._images: dict[str, ImageRecord] = {}
        self._pins: Counter[str] = Counter()
        self._leases: dict[str, set[str]] = {}  # container id -> ids of the images it is made of
        # Image id -> containers using it, from the container records (set by the daemon: the
        # images layer knows nothing of pods). Called under the store lock: it must not call back.
        self.in_use: Callable[[], Mapping[str, Iterable[str]]] | None = None

    def open(self) -> None:
        """Create the layout and load the records written by earlier runs; one that cannot be read
        is moved aside (`<name>.corrupt`) with a warning naming it, and the others are served."""
        for d in (self.records_dir, self.layers_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.blobs.open()
        durable.remove_temporaries(self.records_dir)
        for trash in self.layers_dir.glob(TRASH_PREFIX + "*"):  # a removal a crash interrupted
            shutil.rmtree(trash, ignore_errors=True)
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                record = durable.decode_record(ImageRecord, path.read_bytes())
                _check(record, path)
            except (OSError, ValueError, DataLoss) as exc:
                durable.quarantine(path, exc.message if isinstance(exc, DataLoss) else str(exc), log, "image record")
                continue
            self._images[record.id] = record

    # --- queries ---------------------------------------------------------------------------

    def to_cri(self, record: ImageRecord) -> api_pb2.Image:
        return record.to_cri(pinned=self.is_pinned(record))

    def is_pinned(self, record: ImageRecord) -> bool:
        names = record.repo_tags + record.repo_digests
        return any(fnmatch.fnmatchcase(n, p) for p in self.pinned_patterns for n in names)

    def records(self) -> list[ImageRecord]:
        with self.lock:
            return list(self._images.values())

    def find_record(self, *references: str) -> ImageRecord | None:
        """The image named by the first of `references` that matches (id, id prefix, tag, digest ref)."""
        with self.lock:
            records = list(self._images.values())
        for reference in references:
            for record in records:
                if self._matches(record, reference):
                    return record
        return None

    @staticmethod
    def _matches(record: ImageRecord, reference: str) -> bool:
        bare = reference.removeprefix("sha256:")
        return (
            record.id == reference
            or (len(bare) >= 3 and all(c in "0123456789abcdef" for c in bare) and digest_hex(record.id).startswith(bare))
            or reference in record.repo_tags
            or reference in record.repo_digests
        )

    def layer_path(self, diff_id: str) -> Path:
        return self.layers_dir / digest_hex(diff_id)

    def layer_paths(self, record: ImageRecord) -> list[Path]:
        return [self.layer_path(d) for d in record.diff_ids]

    # --- use by containers and pulls --------------------------------------------------------

    def users(self, image_id: str) -> list[str]:
        """Containers using the image: recorded ones, and those being made right now."""
        with self.lock:
            found = {c for c, ids in self._leases.items() if image_id in ids}
            if self.in_use is not None:
                found.update(self.in_use().get(image_id, ()))
        return sorted(found)

    def lease(self, container_id: str, image_id: str) -> ImageRecord:
        """Mark the image used by `container_id` until release(); NOT_FOUND if it was removed meanwhile."""
        with self.lock:
            record = self._images.get(image_id)
            if record is None:
                raise NotFound(f"image {image_id} is not present (removed meanwhile?): pull it first")
            self._leases.setdefault(container_id, set()).add(image_id)
            return record

    def release(self, container_id: str) -> None:
        with self.lock:
            self._leases.pop(container_id, None)

    @contextmanager
    def pinned(self, *keys: str) -> Iterator[Pins]:
        """Keep these blob digests and diff ids (and those added later) from being deleted by a
        removal until the block ends: a pull holds its pins from before it looks for content it
        may reuse until after its record is committed."""
        pins = Pins(self)
        pins.add(*keys)
        try:
            yield pins
        finally:
            with self.lock:
                self._pins.subtract(pins.keys)
                self._pins += Counter()  # drop the zeros

    # --- changes ---------------------------------------------------------------------------

    def add(self, record: ImageRecord) -> ImageRecord:
        """Store a pulled image; its tags move to it from any other image; digests accumulate.

        Everything the pull wrote (blobs, unpacked layers) reaches the disk before the record
        that points at it, so a power cut never leaves a record over half-written layers.
        """
        durable.sync_filesystem(self.directory)
        with self.lock:
            existing = self._images.get(record.id)
            if existing is not None:
                record.repo_tags = _union(existing.repo_tags, record.repo_tags)
                record.repo_digests = _union(existing.repo_digests, record.repo_digests)
            for other in self._images.values():
                if other.id != record.id and set(other.repo_tags) & set(record.repo_tags):
                    other.repo_tags = [t for t in other.repo_tags if t not in record.repo_tags]
                    self._write(other)
            self._images[record.id] = record
            self._write(record)
            return record

    def remove(self, record: ImageRecord) -> bool:
        """Forget an image and free the blobs and layers no other image (nor a pull) uses.

        ImageInUse (FAILED_PRECONDITION) if a container uses it; False if it was already gone.
        """
        with self.lock:
            if record.id not in self._images:
                return False
            users = self.users(record.id)
            if users:
                raise ImageInUse(record.id, users)
            del self._images[record.id]
            durable.remove(self._record_path(record))
            used_blobs = set().union(*(r.blob_digests() for r in self._images.values()))
            used_layers = {d for r in self._images.values() for d in r.diff_ids}
            for digest in record.blob_digests() - used_blobs - set(self._pins):
                self.blobs.remove(digest)
            trash = []
            for diff_id in set(record.diff_ids) - used_layers - set(self._pins):
                # Renamed while locked: a pull that pins the layer next sees it gone, never half deleted.
                layer = self.layer_path(diff_id)
                doomed = layer.with_name(f"{TRASH_PREFIX}{layer.name}-{os.getpid()}-{threading.get_ident()}")
                try:
                    os.rename(layer, doomed)
                except FileNotFoundError:
                    continue
                trash.append(doomed)
        for doomed in trash:
            shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _record_path(self, record: ImageRecord) -> Path:
        return self.records_dir / f"{digest_hex(record.id)}.json"

    def _write(self, record: ImageRecord) -> None:
        durable.write_atomic(self._record_path(record), json.dumps(asdict(record), indent=1, sort_keys=True))

    # --- disk usage ------------------------------------------------------------------------

    def usage(self) -> api_pb2.FilesystemUsage:
        """Bytes and inodes the store's directory really uses on disk (allocated blocks)."""
        used_bytes, inodes = disk_usage(self.directory)
        return api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.directory)),
            used_bytes=api_pb2.UInt64Value(value=used_bytes),
            inodes_used=api_pb2.UInt64Value(value=inodes),
        )


def _check(record: ImageRecord, path: Path) -> None:
    """What lookups and mounts rely on: valid digests, one diff id per layer, a record named after its id."""
    if f"sha256:{path.stem}" != record.id or record.config_digest != record.id:
        raise ValueError(f"it names image {record.id!r}")
    digest_hex(record.manifest_digest)
    for digest in record.diff_ids:
        digest_hex(str(digest))
    for blob in record.layer_blobs:
        if not isinstance(blob, dict):
            raise ValueError("a layer descriptor is not an object")
        digest_hex(str(blob.get("digest")))
    if len(record.diff_ids) != len(record.layer_blobs):
        raise ValueError(f"{len(record.diff_ids)} diff ids for {len(record.layer_blobs)} layers")
    if not all(isinstance(t, str) for t in record.repo_tags + record.repo_digests):
        raise ValueError("a name is not a string")


def _union(first: list[str], second: list[str]) -> list[str]:
    return first + [x for x in second if x not in first]

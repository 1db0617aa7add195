"""The local image store under `<root>/storage`: image records, blobs and unpacked layers.

Layout: `images/<id hex>.json` (one record per image, written atomically), `blobs/sha256/<hex>`
(verified content), `ingest/` (downloads in progress), `layers/<diff id hex>/` (one unpacked
layer per diff id, shared by every image that has it).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pycrio.cri import api_pb2
from pycrio.disk import disk_usage
from pycrio.images.blobs import BlobStore, digest_hex


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


class ImageStore:
    """Images known locally. Safe for concurrent CRI calls; records persist across restarts."""

    def __init__(self, directory: Path, pinned_patterns: list[str] | None = None) -> None:
        self.directory = directory
        self.pinned_patterns = list(pinned_patterns or [])
        self.blobs = BlobStore(directory)
        self.records_dir = directory / "images"
        self.layers_dir = directory / "layers"
        self._lock = threading.RLock()
        self._images: dict[str, ImageRecord] = {}

    def open(self) -> None:
        """Create the layout and load the records written by earlier runs."""
        for d in (self.records_dir, self.layers_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.blobs.open()
        for path in sorted(self.records_dir.glob("*.json")):
            record = ImageRecord(**json.loads(path.read_text()))
            self._images[record.id] = record

    # --- queries ---------------------------------------------------------------------------

    def to_cri(self, record: ImageRecord) -> api_pb2.Image:
        return record.to_cri(pinned=self.is_pinned(record))

    def is_pinned(self, record: ImageRecord) -> bool:
        names = record.repo_tags + record.repo_digests
        return any(fnmatch.fnmatchcase(n, p) for p in self.pinned_patterns for n in names)

    def records(self) -> list[ImageRecord]:
        with self._lock:
            return list(self._images.values())

    def find_record(self, *references: str) -> ImageRecord | None:
        """The image named by the first of `references` that matches (id, id prefix, tag, digest ref)."""
        with self._lock:
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

    # --- changes ---------------------------------------------------------------------------

    def add(self, record: ImageRecord) -> ImageRecord:
        """Store a pulled image; its tags move to it from any other image; digests accumulate."""
        with self._lock:
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

    def remove(self, record: ImageRecord) -> None:
        """Forget an image and free the blobs and layers no other image uses."""
        with self._lock:
            self._images.pop(record.id, None)
            (self.records_dir / f"{digest_hex(record.id)}.json").unlink(missing_ok=True)
            used_blobs = set().union(*(r.blob_digests() for r in self._images.values()))
            used_layers = {d for r in self._images.values() for d in r.diff_ids}
            for digest in record.blob_digests() - used_blobs:
                self.blobs.remove(digest)
            for diff_id in set(record.diff_ids) - used_layers:
                shutil.rmtree(self.layer_path(diff_id), ignore_errors=True)

    def _write(self, record: ImageRecord) -> None:
        path = self.records_dir / f"{digest_hex(record.id)}.json"
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(record), indent=1, sort_keys=True))
        os.replace(tmp, path)

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


def _union(first: list[str], second: list[str]) -> list[str]:
    return first + [x for x in second if x not in first]

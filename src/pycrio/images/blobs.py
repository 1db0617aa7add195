"""Content-addressed blob storage: `blobs/sha256/<hex>`, with partial downloads kept for resuming."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pycrio.errors import DataLoss


def digest_hex(digest: str) -> str:
    """The hex part of a `sha256:<hex>` digest; other algorithms are not stored."""
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise DataLoss(f"unsupported or malformed digest {digest!r}")
    return hexpart


class BlobStore:
    """Verified blobs by digest; in-progress downloads live in `ingest/` until verified."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.blobs = directory / "blobs" / "sha256"
        self.ingest = directory / "ingest"

    def open(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.ingest.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def partial_path(self, digest: str) -> Path:
        """Where a download of `digest` accumulates; survives a killed pull so the next one resumes."""
        return self.ingest / f"{digest_hex(digest)}.partial"

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def commit(self, digest: str, size: int, source: Path, hashed: bool = False) -> Path:
        """Move a downloaded file into the store after checking it (atomic rename).

        `hashed` says the downloader already verified the digest while streaming, so the file
        is not read a second time; its size is checked regardless.
        """
        actual_size = source.stat().st_size
        if actual_size != size:
            source.unlink(missing_ok=True)
            raise DataLoss(f"blob {digest}: expected {size} bytes, got {actual_size}")
        if not hashed and file_digest(source) != digest:
            source.unlink(missing_ok=True)
            raise DataLoss(f"blob {digest}: content does not match its digest")
        target = self.path(digest)
        os.replace(source, target)
        return target

    def write(self, digest: str, data: bytes) -> Path:
        """Store a small blob held in memory (configs, manifests), verified first."""
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DataLoss(f"blob {digest}: content does not match its digest")
        target = self.path(digest)
        tmp = self.ingest / f"{digest_hex(digest)}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
        self.partial_path(digest).unlink(missing_ok=True)

    def digests(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.blobs.iterdir()} if self.blobs.exists() else set()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()

"""Unpack one image layer (a tar, maybe gzip- or zstd-compressed) into an overlayfs-format directory.

The result is what containerd's overlay snapshotter keeps per layer: the layer's own files, a
whiteout `.wh.NAME` as a character device 0:0 named NAME, an opaque marker `.wh..wh..opq` as the
xattr `trusted.overlay.opaque=y` on its directory. Ownership, modes (setuid, sticky), mtimes,
xattrs, hardlinks, symlinks, devices and fifos are kept (we run as root); nothing may land outside
the destination, whatever the member names, link targets or earlier symlinks say.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol, cast

import zstandard

from pycrio.errors import DataLoss, FailedPrecondition, InvalidArgument

log = logging.getLogger("pycrio.images")

LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
# A layer must not forge overlayfs metadata (opaque, redirect, metacopy...): only its
# whiteout entries may produce it.
OVERLAY_XATTR_PREFIX = "trusted.overlay."
PAX_XATTR_PREFIX = "SCHILY.xattr."
CHUNK = 1 << 20


class UnsafeLayerError(FailedPrecondition):
    """A layer we refuse to apply: a member or link escaping the destination, or one we cannot represent."""


class CorruptLayerError(DataLoss):
    """A layer blob that is not a readable (compressed) tar."""


@dataclass(frozen=True)
class LayerStats:
    """What unpacking a layer read: entries applied, uncompressed tar bytes, and their digest."""

    files: int
    bytes: int
    diff_id: str


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader:
    """Counts and hashes every byte read through it (the uncompressed tar stream)."""

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self._sha = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: tarfile stops at the end-of-archive marker, the digest covers all."""
        while self.read(CHUNK):
            pass

    def diff_id(self) -> str:
        return "sha256:" + self._sha.hexdigest()


def unpack_layer(blob: Path, media_type: str, dest: Path) -> LayerStats:
    """Unpack the layer `blob` into the new directory `dest` (overlayfs format), atomically.

    Works in a sibling temp dir renamed to `dest` at the end; on any error the temp dir is removed
    and the error re-raised. Raises FileExistsError if `dest` exists (the caller decides what to
    do with an existing layer), InvalidArgument for a media type that is not a layer tar,
    UnsafeLayerError for a member we refuse, CorruptLayerError for an unreadable blob.
    """
    if media_type not in LAYER_MEDIA_TYPES:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}")
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "layer directory already exists", str(dest))
    tmp = dest.parent / f".tmp-{dest.name}-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o755)
    try:
        os.chmod(tmp, 0o755)  # the tar's "./" entry, if any, sets the real root mode
        stats = _unpack_into(blob, media_type, tmp)
        if os.path.lexists(dest):  # rename() would silently replace an empty directory
            raise FileExistsError(errno.EEXIST, "layer directory already exists", str(dest))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _unpack_into(blob: Path, media_type: str, root: Path) -> LayerStats:
    with open(blob, "rb") as raw:
        reader = _HashingReader(_decompressed(raw, media_type))
        try:
            files = _extract(reader, root)
            reader.drain()
        except (tarfile.TarError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error, EOFError) as e:
            raise CorruptLayerError(f"layer {blob.name}: not a readable tar: {e}") from e
    return LayerStats(files=files, bytes=reader.count, diff_id=reader.diff_id())


def _decompressed(raw: BinaryIO, media_type: str) -> _Readable:
    """A stream of the uncompressed tar; the magic bytes decide, the media type only informs."""
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif magic == ZSTD_MAGIC:
        kind = "zstd"
    else:
        kind = "tar"
    declared = "gzip" if media_type.endswith("gzip") else "zstd" if media_type.endswith("zstd") else "tar"
    if kind != declared:
        log.warning("layer declared %s but its content is %s; unpacking as %s", media_type, kind, kind)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _extract(reader: _Readable, root: Path) -> int:
    """Apply every member of the tar stream under `root`; the number of members applied."""
    dir_times: list[tuple[Path, int, int]] = []
    count = 0
    with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
            rel = _member_path(member.name)
            base = posixpath.basename(rel)
            if base == OPAQUE_MARKER:
                _mark_opaque(root, posixpath.dirname(rel))
            elif base.startswith(WHITEOUT_META_PREFIX):
                log.debug("skipping whiteout metadata entry %s", rel)
                continue
            elif base.startswith(WHITEOUT_PREFIX):
                _whiteout(root, rel, member)
            else:
                _apply_member(tar, member, root, rel, dir_times)
            count += 1
    # Directory times last: creating their children changed them.
    for path, atime_ns, mtime_ns in reversed(dir_times):
        if _is_real_dir(path):  # a later member may have replaced it
            os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
    return count


def _member_path(name: str) -> str:
    """`name` relative to the layer root ("." for the root); absolute names are rooted at the layer."""
    rel = posixpath.normpath(name.lstrip("/") or ".")
    if rel == ".." or rel.startswith("../"):
        raise UnsafeLayerError(f"layer member {name!r} escapes the layer directory")
    return rel


def _checked_parent(root: Path, rel: str) -> Path:
    """The directory that will hold `rel`, made if missing; never reached through a symlink."""
    parent_rel = posixpath.dirname(rel)
    parent = root
    for part in parent_rel.split("/") if parent_rel else ():
        parent = parent / part
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            os.mkdir(parent, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeLayerError(f"layer member {rel!r} goes through the symlink {parent.relative_to(root)}")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayerError(f"layer member {rel!r} is under the non-directory {parent.relative_to(root)}")
    return parent


def _target(root: Path, rel: str) -> Path:
    """Where `rel` goes, with its parents checked."""
    return root if rel == "." else _checked_parent(root, rel) / posixpath.basename(rel)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _clear(path: Path, keep_dir: bool) -> None:
    """Remove what is at `path` (a later member replaces an earlier one), except a directory if `keep_dir`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(path)
    else:
        os.unlink(path)


def _mark_opaque(root: Path, rel_dir: str) -> None:
    """`DIR/.wh..wh..opq` hides the lower layers' DIR content: overlay's opaque xattr on DIR."""
    directory = _target(root, rel_dir)
    _clear(directory, keep_dir=True)
    if not os.path.lexists(directory):
        os.mkdir(directory, 0o755)
    os.setxattr(directory, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)


def _whiteout(root: Path, rel: str, member: tarfile.TarInfo) -> None:
    """`.wh.NAME` becomes the overlay whiteout: a character device 0:0 named NAME."""
    name = posixpath.basename(rel)[len(WHITEOUT_PREFIX) :]
    if name in ("", ".", ".."):  # pathlib would fold "DIR/." into DIR itself
        raise UnsafeLayerError(f"layer member {member.name!r} is not a valid whiteout")
    path = _checked_parent(root, rel) / name
    _clear(path, keep_dir=False)
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
    os.lchown(path, member.uid, member.gid)


def _apply_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, rel: str, dir_times: list[tuple[Path, int, int]]
) -> None:
    if rel == "." and not member.isdir():
        raise UnsafeLayerError(f"layer member {member.name!r} would replace the layer root")
    path = _target(root, rel)
    if member.islnk():
        _clear(path, keep_dir=False)
        _hardlink(root, rel, member.linkname, path)
        return  # a hardlink shares its target's inode: its header must not re-own or re-mode it
    _clear(path, keep_dir=member.isdir())
    _create(tar, member, path)
    _set_metadata(member, path)
    if member.isdir():
        dir_times.append((path, *_times_ns(member)))


def _create(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    """Make the file system object `member` describes at `path` (metadata comes after)."""
    if member.isreg():
        source = tar.extractfile(member)
        assert source is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    elif member.isdir():
        if not os.path.lexists(path):  # _clear kept it only if it is a real directory
            os.mkdir(path, 0o700)
    elif member.issym():
        os.symlink(member.linkname, path)
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(path, 0o600)
    else:
        raise UnsafeLayerError(f"layer member {member.name!r} has unsupported type {member.type!r}")


def _hardlink(root: Path, rel: str, linkname: str, path: Path) -> None:
    try:
        target = _target(root, _member_path(linkname))
        st = os.lstat(target)
    except UnsafeLayerError as e:
        raise UnsafeLayerError(f"hardlink {rel!r} -> {linkname!r}: {e.message}") from None
    except FileNotFoundError:
        raise UnsafeLayerError(f"hardlink {rel!r} -> {linkname!r}: the layer holds no such file") from None
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeLayerError(f"hardlink {rel!r} -> {linkname!r}: a directory")
    os.link(target, path, follow_symlinks=False)  # links a symlink itself, never what it points to


def _set_metadata(member: tarfile.TarInfo, path: Path) -> None:
    # Order matters: chown clears setuid/setgid and security.capability, so mode and xattrs follow it.
    os.lchown(path, member.uid, member.gid)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    _set_xattrs(member, path)
    if not member.isdir():
        atime_ns, mtime_ns = _times_ns(member)
        os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)


def _set_xattrs(member: tarfile.TarInfo, path: Path) -> None:
    for key, value in member.pax_headers.items():
        if not key.startswith(PAX_XATTR_PREFIX):
            continue
        name = key[len(PAX_XATTR_PREFIX) :]
        if name.startswith(OVERLAY_XATTR_PREFIX):
            log.warning("ignoring overlay xattr %s on layer member %s", name, member.name)
            continue
        # tarfile decodes PAX values as UTF-8 with surrogateescape: this gives the raw bytes back.
        raw = value.encode("utf-8", "surrogateescape")
        try:
            os.setxattr(path, name, raw, follow_symlinks=False)
        except OSError as e:
            # user.* is only allowed on files and directories; security.* may be refused by an LSM.
            if e.errno in (errno.ENOTSUP, errno.EPERM):
                log.warning("ignoring xattr %s on layer member %s: %s", name, member.name, e.strerror)
                continue
            raise


def _times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns: PAX atime when given, else the mtime."""
    mtime_ns = int(float(member.mtime) * 1_000_000_000)
    atime = member.pax_headers.get("atime")
    try:
        atime_ns = int(float(atime) * 1_000_000_000) if atime else mtime_ns
    except ValueError:
        atime_ns = mtime_ns
    return atime_ns, mtime_ns

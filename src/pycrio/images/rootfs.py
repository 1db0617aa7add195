"""A container's root file system over its image's unpacked layers: an overlay mount, or a copy.

Layout of a container directory: `rootfs/` (what the container sees), `rootfs.mode` ("overlay" or
"copy"), and for overlay `upper/` (the container's writes) and `work/` (overlayfs scratch). The
layers are overlayfs-format directories (see unpack.py) and are never written to.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from pycrio.errors import FailedPrecondition

log = logging.getLogger("pycrio.images")

ROOTFS = "rootfs"
MODE_FILE = "rootfs.mode"
UPPER = "upper"
WORK = "work"
MODE_OVERLAY = "overlay"
MODE_COPY = "copy"
# mount(2) copies at most one page of options; keep clear of it.
MAX_MOUNT_DATA = 3500
OVERLAY_MAX_LAYERS = 500  # the kernel's OVL_MAX_STACK
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPTION_SPECIALS = frozenset(",:\\\n")
MNT_DETACH = 2
UNMOUNT_ROUNDS = 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_probe_lock = threading.Lock()
_probe_cache: dict[int, bool] = {}


def mount_rootfs(layers: list[Path], container_dir: Path, force_copy: bool = False) -> Path:
    """Make `container_dir/rootfs` from `layers` (base first) and return it.

    An overlay mount where overlayfs works (container writes land in `container_dir/upper`),
    else a copy of the layers with their whiteouts applied; `force_copy` always copies. Raises
    FileExistsError if the container already has a rootfs, FailedPrecondition for a missing layer.
    """
    rootfs = container_dir / ROOTFS
    if os.path.lexists(rootfs):
        raise FileExistsError(errno.EEXIST, "container rootfs already exists", str(rootfs))
    for layer in layers:
        if not layer.is_dir():
            raise FailedPrecondition(f"layer {layer} is not unpacked")
    container_dir.mkdir(parents=True, exist_ok=True)
    for stale in (UPPER, WORK, MODE_FILE):  # left by a crash before the rootfs was made: no one's data
        _remove(container_dir / stale)
    rootfs.mkdir()
    try:
        mode = _populate(layers, container_dir, rootfs, force_copy)
        (container_dir / MODE_FILE).write_text(mode + "\n")
    except BaseException:
        _unmount_all(container_dir)
        for name in (ROOTFS, UPPER, WORK, MODE_FILE):
            _remove(container_dir / name)
        raise
    return rootfs


def release_rootfs(container_dir: Path, discard: Callable[[Path], None] | None = None) -> None:
    """Unmount the container's rootfs if mounted and remove `container_dir` entirely (through
    `discard`, e.g. a Trash, when given); idempotent."""
    if not os.path.lexists(container_dir):
        return
    mode_file = container_dir / MODE_FILE
    mode = mode_file.read_text().strip() if mode_file.exists() else "unknown"
    log.debug("releasing %s rootfs in %s", mode, container_dir)
    # Whatever the record says: never remove a tree that still has something mounted in it.
    _unmount_all(container_dir)
    (discard or _remove)(container_dir)


def unmount_rootfs(container_dir: Path) -> None:
    """Unmount the container's rootfs and image volumes, keeping their files (the writable layer
    stays countable until release_rootfs); idempotent."""
    if os.path.lexists(container_dir):
        _unmount_all(container_dir)


def overlay_supported(scratch: Path) -> bool:
    """Whether overlayfs mounts with upper and work dirs on `scratch`'s file system (probed once per file system)."""
    scratch.mkdir(parents=True, exist_ok=True)
    device = os.stat(scratch).st_dev
    with _probe_lock:
        if device not in _probe_cache:
            _probe_cache[device] = _probe_overlay(scratch)
        return _probe_cache[device]


def _probe_overlay(scratch: Path) -> bool:
    probe = Path(tempfile.mkdtemp(prefix=".overlay-probe-", dir=scratch))
    try:
        for name in ("lower", UPPER, WORK, "merged"):
            (probe / name).mkdir()
        try:
            options = _overlay_options([str(probe / name) for name in ("lower", UPPER, WORK)])
            _mount_overlay_data(options, probe / "merged")
        except OSError as e:
            log.info("overlayfs unavailable on %s (%s): container rootfs there are copies", scratch, e.strerror)
            return False
        _unmount(probe / "merged")
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _populate(layers: list[Path], container_dir: Path, rootfs: Path, force_copy: bool) -> str:
    """Fill `rootfs` by overlay mount when possible, else by copy; the mode used."""
    if layers and not force_copy and overlay_supported(container_dir):
        try:
            _mount_overlay(layers, container_dir, rootfs)
            return MODE_OVERLAY
        except OSError as e:
            log.warning("overlay mount of %d layers failed (%s): copying them instead", len(layers), e)
            for name in (UPPER, WORK):
                _remove(container_dir / name)
    for layer in layers:
        _apply_layer(layer, rootfs)
    return MODE_COPY


# --- overlay -------------------------------------------------------------------------------------


def _mount_overlay(layers: list[Path], container_dir: Path, rootfs: Path) -> None:
    if len(layers) > OVERLAY_MAX_LAYERS:
        raise OSError(errno.E2BIG, f"more than {OVERLAY_MAX_LAYERS} layers")
    upper, work = container_dir / UPPER, container_dir / WORK
    upper.mkdir()
    work.mkdir()
    _copy_root_owner(layers[-1], upper)
    # Overlay wants the top layer first; upper and work come last here.
    dirs = [os.path.abspath(p) for p in [*reversed(layers), upper, work]]
    data = _overlay_options(dirs)
    if len(data) <= MAX_MOUNT_DATA and not any(OPTION_SPECIALS & set(d) for d in dirs):
        _mount_overlay_data(data, rootfs)
        return
    # Too long for one page, or paths overlay's option parser would split: name every directory
    # by a short /proc/self/fd path for the duration of the mount call.
    with ExitStack() as stack:
        data = _overlay_options([f"/proc/self/fd/{_open_path(stack, d)}" for d in dirs])
        if len(data) > MAX_MOUNT_DATA:
            raise OSError(errno.E2BIG, f"overlay options for {len(layers)} layers exceed one page")
        _mount_overlay_data(data, rootfs)


def _overlay_options(dirs: list[str]) -> str:
    """Mount options for lower dirs `dirs[:-2]` (top first), upper `dirs[-2]` and work `dirs[-1]`."""
    return f"lowerdir={':'.join(dirs[:-2])},upperdir={dirs[-2]},workdir={dirs[-1]}"


def _open_path(stack: ExitStack, path: str) -> int:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


def _copy_root_owner(layer: Path, upper: Path) -> None:
    """The merged root takes its owner and mode from upper: give it the image's (as containerd does)."""
    st = os.lstat(layer)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))


def _mount_overlay_data(data: str, target: Path) -> None:
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, os.fsencode(data)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount overlay on {target}: {os.strerror(code)}")


def _unmount(target: Path) -> None:
    """Unmount `target`; lazily if busy; "not mounted" and "missing" are fine."""
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EBUSY and _libc.umount2(path, MNT_DETACH) == 0:
        log.warning("%s was busy: detached lazily", target)
        return
    code = ctypes.get_errno() if code == errno.EBUSY else code
    if code not in (errno.EINVAL, errno.ENOENT):
        raise OSError(code, f"unmount {target}: {os.strerror(code)}")


def _unmount_all(directory: Path) -> None:
    """Unmount everything mounted at or under `directory`, deepest first (stacked mounts too)."""
    prefix = os.path.realpath(directory)
    for _ in range(UNMOUNT_ROUNDS):
        mounted = _mounts_under(prefix)
        if not mounted:
            return
        # Deepest first; a path listed twice (stacked mounts) is unmounted twice.
        for mountpoint in sorted(mounted, key=len, reverse=True):
            _unmount(Path(mountpoint))
    if mounted := _mounts_under(prefix):
        raise OSError(errno.EBUSY, f"still mounted: {', '.join(sorted(set(mounted)))}")


def _mounts_under(prefix: str) -> list[str]:
    return [m for m in _mountpoints() if m == prefix or m.startswith(prefix + "/")]


def _mountpoints() -> list[str]:
    """Mount points of this mount namespace (field 5 of mountinfo, octal escapes decoded)."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    return [_unescape_mountinfo(line.split(b" ")[4]) for line in lines]


def _unescape_mountinfo(field: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


# --- copy ----------------------------------------------------------------------------------------


def _apply_layer(layer: Path, rootfs: Path) -> None:
    """Copy one overlay-format layer onto `rootfs` as overlayfs would show it above what is there."""
    links: dict[tuple[int, int], Path] = {}  # hardlinks inside this layer: source inode -> first copy
    finish: list[tuple[Path, Path, os.stat_result]] = []
    pending = [(layer, rootfs)]
    while pending:  # iterative: a deep tree must not hit the recursion limit
        src_dir, dst_dir = pending.pop()
        if _is_opaque(src_dir):
            _empty(dst_dir)
        finish.append((src_dir, dst_dir, os.lstat(src_dir)))
        with os.scandir(src_dir) as entries:
            for entry in entries:
                child = _apply_entry(Path(entry.path), dst_dir / entry.name, links)
                if child is not None:
                    pending.append(child)
    # Children first, so that creating entries no longer changes a directory's restored times.
    for src, dst, st in reversed(finish):
        _copy_metadata(src, dst, st)


def _apply_entry(src: Path, dst: Path, links: dict[tuple[int, int], Path]) -> tuple[Path, Path] | None:
    """Apply one layer entry; a directory is returned (source, destination) for the caller to walk."""
    st = os.lstat(src)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # overlay whiteout: the lower entry is gone
        _remove(dst)
        return None
    if stat.S_ISDIR(st.st_mode):
        if not _is_real_dir(dst):
            _remove(dst)
            os.mkdir(dst, 0o700)
        return src, dst
    _remove(dst)
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        os.link(links[key], dst, follow_symlinks=False)
        return None
    if _copy_node(src, dst, st):
        _copy_metadata(src, dst, st)
        if st.st_nlink > 1:
            links[key] = dst
    return None


def _copy_node(src: Path, dst: Path, st: os.stat_result) -> bool:
    """Create a copy of the non-directory `src` at `dst` (metadata aside); False if skipped."""
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        os.mknod(dst, st.st_mode, st.st_rdev)
    else:
        log.warning("skipping %s: sockets are not part of an image", src)
        return False
    return True


def _copy_metadata(src: Path, dst: Path, st: os.stat_result) -> None:
    # chown clears setuid/setgid and security.capability: mode and xattrs come after it.
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    _sync_xattrs(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _sync_xattrs(src: Path, dst: Path) -> None:
    """Make dst's xattrs src's (a directory keeps only the top layer's), overlay's own excepted."""
    wanted = {n for n in os.listxattr(src, follow_symlinks=False) if not n.startswith(OVERLAY_XATTR_PREFIX)}
    for name in set(os.listxattr(dst, follow_symlinks=False)) - wanted:
        os.removexattr(dst, name, follow_symlinks=False)
    for name in wanted:
        value = os.getxattr(src, name, follow_symlinks=False)
        try:
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            log.warning("ignoring xattr %s on %s: %s", name, dst, e.strerror)


def _is_opaque(directory: Path) -> bool:
    try:
        return os.getxattr(directory, OVERLAY_XATTR_PREFIX + "opaque", follow_symlinks=False) == b"y"
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _empty(directory: Path) -> None:
    with os.scandir(directory) as entries:
        for entry in entries:
            _remove(Path(entry.path))


def _remove(path: Path) -> None:
    """Remove whatever is at `path` (a tree, never following symlinks); nothing there is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)

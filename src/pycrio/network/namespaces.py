"""Pinned pod namespaces, like CRI-O's pinns: kept alive by bind mounts, with no process in them.

`pin_namespaces` runs util-linux `unshare --net=<file> ...`, which creates the namespaces and
bind-mounts `/proc/<pid>/ns/<kind>` onto each file from a helper child; the command it then runs
inside the new namespaces (`/bin/sh`) sets the hostname and the sysctls and exits. The pin
directory is a private bind mount of itself, so pins never propagate into (or out of) other mount
namespaces and `unpin_namespaces` leaves no mount behind.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from pycrio.errors import AlreadyExists, CRIError, InvalidArgument

log = logging.getLogger("pycrio.network")

SUPPORTED_KINDS = ("net", "ipc", "uts")

_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_NSFS_MAGIC = 0x6E736673

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]

# Runs inside the new namespaces with (label, /proc/sys path, value) triples as arguments; a failure
# names the label on stderr so the caller can say which sysctl was refused.
_SETUP_SCRIPT = """
while [ "$#" -ge 3 ]; do
  if [ ! -e "$2" ]; then echo "missing $1" >&2; exit 3; fi
  { printf '%s' "$3" > "$2"; } 2>/dev/null || { echo "refused $1" >&2; exit 3; }
  shift 3
done
"""

_SYSCTL_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]*$")
_IPC_SYSCTL = re.compile(r"^(kernel\.shm.*|kernel\.msg.*|kernel\.sem|fs\.mqueue\..*)$")


def _tool(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin") or name


def _os_error(what: str, path: str | Path) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what} {path}: {os.strerror(code)}")


def _mount(source: str | None, target: Path, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, str(target).encode(), None, flags, None) != 0:
        raise _os_error("mount", target)


def _unmount_all(target: Path) -> None:
    """Detach every mount stacked on `target`; a path that is not (or no longer) a mount is fine."""
    for _ in range(16):
        if _libc.umount2(str(target).encode(), _MNT_DETACH) == 0:
            continue
        if ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
            return
        raise _os_error("umount", target)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in this mount namespace."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            points.append((_unescape(fields[4]), fields[sep + 1]))
    return points


def _nsfs_device() -> int | None:
    """st_dev of the kernel's one nsfs instance (every namespace file has it), None if unknown."""
    try:
        device = os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return None
    return device if _statfs_is_nsfs("/proc/self/ns/net") else None


def _statfs_is_nsfs(path: str) -> bool:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first (long) field
    if _libc.statfs(path.encode(), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == _NSFS_MAGIC


_NSFS_DEVICE = _nsfs_device()


def is_namespace(path: Path | str) -> bool:
    """True if `path` is a namespace file (a pin or /proc/<pid>/ns/<kind>), not a plain file.
    A stat against nsfs's device (2 µs; ListPodSandbox checks every pod's pins) where known."""
    if _NSFS_DEVICE is None:
        return _statfs_is_nsfs(str(path))
    try:
        return os.stat(path).st_dev == _NSFS_DEVICE
    except OSError:
        return False


def _make_private_mount(directory: Path) -> None:
    """Make `directory` a private bind mount of itself (once): pins below it stay ours alone."""
    real = os.path.realpath(directory)
    if real not in {point for point, _ in mount_points()}:
        _mount(real, Path(real), _MS_BIND | _MS_REC)
    _mount(None, Path(real), _MS_PRIVATE | _MS_REC)


def _sysctl_path(key: str) -> str:
    # sysctl(8) convention: a key with slashes separates with them and keeps dots literal
    # (net/ipv4/conf/eth0.100/forwarding); otherwise dots separate.
    parts = key.split("/") if "/" in key else key.split(".")
    if not all(_SYSCTL_PART.match(p) and p not in (".", "..") for p in parts):
        raise InvalidArgument(f"invalid sysctl name {key!r}")
    return "/proc/sys/" + "/".join(parts)


def _sysctl_kind(key: str) -> str:
    dotted = key.replace("/", ".") if "/" in key else key
    if dotted.startswith("net."):
        return "net"
    if _IPC_SYSCTL.match(dotted):
        return "ipc"
    if dotted == "kernel.domainname":
        return "uts"
    raise InvalidArgument(
        f"sysctl {key!r} is not namespaced: only net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.* "
        "and kernel.domainname can be set for a pod"
    )


def _settings(kinds: set[str], hostname: str | None, sysctls: Mapping[str, str]) -> list[str]:
    """Checked (label, path, value) triples for the setup script, flattened."""
    triples: list[str] = []
    if hostname is not None and "uts" in kinds:
        if not 0 < len(hostname.encode()) <= 64 or any(c.isspace() or c in "\0/" for c in hostname):
            raise InvalidArgument(f"invalid hostname {hostname!r}")
        triples += ["hostname", "/proc/sys/kernel/hostname", hostname]
    for key, value in sysctls.items():
        kind = _sysctl_kind(key)
        if kind not in kinds:
            raise InvalidArgument(f"sysctl {key!r} needs the pod's own {kind} namespace, but it shares the host's")
        if "\n" in value or "\0" in value:
            raise InvalidArgument(f"invalid value {value!r} for sysctl {key!r}")
        triples += [f"{key}={value}", _sysctl_path(key), value]
    return triples


def _setup_error(stderr: str, directory: Path) -> CRIError:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    reason, _, label = last.partition(" ")
    if reason == "missing":
        return InvalidArgument(f"sysctl {label.split('=')[0]!r} does not exist in the pod's namespaces")
    if reason == "refused":
        if label == "hostname":
            return InvalidArgument("the kernel refused the pod hostname")
        key, _, value = label.partition("=")
        return InvalidArgument(
            f"sysctl {key!r} = {value!r} was refused: not namespaced (read-only outside the host) or an invalid value"
        )
    return CRIError(f"pinning namespaces in {directory} failed: {stderr.strip() or 'no output'}")


def pin_namespaces(
    directory: Path,
    kinds: Iterable[str] = SUPPORTED_KINDS,
    hostname: str | None = None,
    sysctls: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Create new namespaces of `kinds` pinned at `directory/<kind>`; returns {kind: path}.

    The hostname is set when a UTS namespace is created (ignored otherwise: a pod sharing the
    host's UTS namespace must not rename the host). Sysctls must be namespaced and their namespace
    among `kinds`, or InvalidArgument names the offending one.
    """
    wanted = set(kinds)
    unknown = wanted - set(SUPPORTED_KINDS)
    if unknown:
        raise InvalidArgument(f"cannot pin namespace kinds {sorted(unknown)}: supported are {list(SUPPORTED_KINDS)}")
    if not wanted:
        return {}
    settings = _settings(wanted, hostname, sysctls or {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pins = {kind: directory / kind for kind in SUPPORTED_KINDS if kind in wanted}
    for path in pins.values():
        if is_namespace(path):
            raise AlreadyExists(f"a {path.name} namespace is already pinned at {path}")
    try:
        _make_private_mount(directory)
        for path in pins.values():
            path.touch(mode=0o444, exist_ok=True)
        argv = [_tool("unshare"), *(f"--{kind}={path}" for kind, path in pins.items())]
        argv += ["/bin/sh", "-c", _SETUP_SCRIPT, "pycrio-pin", *settings]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise _setup_error(done.stderr, directory)
        missing = [str(p) for p in pins.values() if not is_namespace(p)]
        if missing:
            raise CRIError(f"namespaces not pinned at {', '.join(missing)}")
    except BaseException:
        unpin_namespaces(directory)
        raise
    log.debug("pinned %s namespaces in %s", ",".join(pins), directory)
    return pins


def unpin_namespaces(directory: Path) -> None:
    """Unmount and remove every pin in `directory`, then the directory itself; idempotent."""
    directory = Path(directory)
    if not directory.exists():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not is_namespace(entry):
            continue
        _unmount_all(entry)
        entry.unlink(missing_ok=True)
    _unmount_all(directory)
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass


def unmount_below(directory: Path) -> None:
    """Detach every mount at or below `directory`, deepest first, so that removing it cannot reach
    into a mounted filesystem; OSError if one stays mounted."""
    top = os.path.realpath(directory)
    below = sorted(
        {point for point, _ in mount_points() if point == top or point.startswith(top.rstrip("/") + "/")},
        key=lambda point: point.count("/"),
        reverse=True,
    )
    for point in below:
        _unmount_all(Path(point))
    left = [point for point, _ in mount_points() if point == top or point.startswith(top.rstrip("/") + "/")]
    if left:
        raise OSError(errno.EBUSY, f"still mounted below {directory}: {', '.join(left)}")


def nsenter_argv(netns: Path, argv: list[str]) -> list[str]:
    """`argv` run in the network namespace pinned at `netns` (for Popen); a bare command is looked up in sbin too."""
    program = argv[0] if "/" in argv[0] else _tool(argv[0])
    return [_tool("nsenter"), f"--net={netns}", "--", program, *argv[1:]]


def run_in_netns(
    netns: Path, argv: list[str], *, input: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the network namespace at `netns` and return its (text) result; never raises on exit code."""
    return subprocess.run(
        nsenter_argv(netns, argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )

"""CRI container configs -> OCI runtime specs (JSON-ready dicts for runc), with Kubernetes semantics.

Pure functions: everything they need comes in as arguments (the CRI messages, a SandboxInfo, the
image's ImageConfig, the container's rootfs, what the host's cgroups support). They read the host
only to validate what the spec will point at (mount sources, device nodes, seccomp profiles) and
the image's /etc/passwd and /etc/group to resolve users. Problems the caller caused raise
InvalidArgument naming the container and the offending value; unsupported features raise
Unimplemented; requests we ignore (AppArmor, SELinux) are logged and added to `warnings`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument, Unimplemented
from pycrio.oci import seccomp
from pycrio.oci.cgroups import CgroupSupport, cgroups_path, detect_support, unescape_mountinfo

log = logging.getLogger("pycrio.oci")

OCI_VERSION = "1.0.2"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHM_SIZE = "size=65536k"
CATATONIT = Path("/usr/bin/catatonit")
INFRA_BINARY = "catatonit"
INFRA_OOM_SCORE_ADJ = -998  # kubelet's value for pod infrastructure
MOUNTINFO = Path("/proc/self/mountinfo")
MAX_SYMLINKS = 40

# CRI-O's default_capabilities (internal/config/capabilities: Default()).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
)
# In kernel numbering order: index == capability number.
ALL_CAPABILITIES = tuple(
    "CAP_" + name
    for name in (
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
        "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
        "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
        "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
    ).split()
)

# Kubernetes' defaults (pkg/securitycontext/util.go), what kubelet sends for procMount Default.
DEFAULT_MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

IPC_SYSCTLS = frozenset(
    "kernel.msgmax kernel.msgmnb kernel.msgmni kernel.sem kernel.shmall kernel.shmmax kernel.shmmni "
    "kernel.shm_rmid_forced".split()
)
DENY_ALL_DEVICES = {"allow": False, "access": "rwm"}
# Directories of the host's /dev that are not devices to hand a privileged container (as runc skips them).
HOST_DEV_SKIP = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})

NamespaceMode = api_pb2.NamespaceMode
Propagation = api_pb2.MountPropagation
ProfileType = api_pb2.SecurityProfile.ProfileType


# --------------------------------------------------------------------------- inputs


@dataclass
class SandboxInfo:
    """What a container spec needs to know about its pod.

    `namespace_paths` maps "network"/"ipc"/"uts" to the pod's pinned namespace file; a missing or
    empty entry means "a new namespace of that kind" (host namespaces come from the host_* flags).
    `pid_ns_path` is the infra process's pid namespace when the pod shares one (PID mode POD).
    """

    id: str
    name: str = ""
    namespace: str = ""
    uid: str = ""
    hostname: str = ""
    cgroup_parent: str = ""
    namespace_paths: dict[str, str] = field(default_factory=dict)
    host_network: bool = False
    host_ipc: bool = False
    host_pid: bool = False
    resolv_conf: str | None = None
    hosts_file: str | None = None
    hostname_file: str | None = None
    shm_path: str | None = None
    pid_ns_path: str | None = None
    privileged: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, sandbox_id: str, config: api_pb2.PodSandboxConfig, **host_side: object) -> SandboxInfo:
        """Fill the CRI-given fields from `config`; `host_side` gives the rest (namespace_paths, files...)."""
        linux = config.linux
        options = linux.security_context.namespace_options
        values: dict[str, object] = {
            "name": config.metadata.name,
            "namespace": config.metadata.namespace,
            "uid": config.metadata.uid,
            "hostname": config.hostname,
            "cgroup_parent": linux.cgroup_parent,
            "host_network": options.network == NamespaceMode.NODE,
            "host_ipc": options.ipc == NamespaceMode.NODE,
            "host_pid": options.pid == NamespaceMode.NODE,
            "privileged": linux.security_context.privileged,
            "sysctls": dict(linux.sysctls),
            "labels": dict(config.labels),
            "annotations": dict(config.annotations),
        }
        values.update(host_side)
        return cls(id=sandbox_id, **values)  # type: ignore[arg-type]


@dataclass
class ImageConfig:
    """The parts of an image's config (OCI/Docker `config` section) that shape a container."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_image_config(cls, cfg: dict) -> ImageConfig:
        """From the image config JSON (the whole document or just its `config` section)."""
        inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else cfg
        inner = inner or {}
        return cls(
            entrypoint=list(inner.get("Entrypoint") or []),
            cmd=list(inner.get("Cmd") or []),
            env=list(inner.get("Env") or []),
            working_dir=inner.get("WorkingDir") or "",
            user=inner.get("User") or "",
            stop_signal=inner.get("StopSignal") or "",
            exposed_ports=sorted(inner.get("ExposedPorts") or {}),
            volumes=sorted(inner.get("Volumes") or {}),
            labels=dict(inner.get("Labels") or {}),
        )


@dataclass
class User:
    """The resolved identity of a container's process."""

    uid: int
    gid: int
    additional_gids: list[int]


# --------------------------------------------------------------------------- process


def process_args(config: api_pb2.ContainerConfig, image: ImageConfig) -> list[str]:
    """Kubernetes merge: command replaces the entrypoint (and drops the image cmd), args replace cmd."""
    command, args = list(config.command), list(config.args)
    if not command:
        command = image.entrypoint
        if not args:
            args = image.cmd
    argv = command + args
    if not argv:
        raise InvalidArgument(f"container {_name(config)!r}: no command specified (none in the config or the image)")
    return argv


def build_env(config: api_pb2.ContainerConfig, image: ImageConfig, hostname: str) -> list[str]:
    """PATH default, HOSTNAME, TERM for a tty, then the image's env, then the CRI envs (by name, last wins)."""
    env: dict[str, str] = {}
    _set_env(env, DEFAULT_PATH_ENV)
    if hostname:
        env["HOSTNAME"] = hostname
    if config.tty:
        env["TERM"] = "xterm"
    for entry in image.env:
        _set_env(env, entry)
    for kv in config.envs:
        if kv.key:
            env[kv.key] = _text(kv.value)
    return [f"{key}={value}" for key, value in env.items()]


def _set_env(env: dict[str, str], entry: str) -> None:
    key, _, value = entry.partition("=")
    if key:
        env[key] = value


def _text(value: str | bytes) -> str:
    """KeyValue.value is `bytes` in newer CRI protos and `string` in older ones."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def working_dir(config: api_pb2.ContainerConfig, image: ImageConfig) -> str:
    """CRI working_dir, else the image's WorkingDir, else "/" (made absolute; runc creates it)."""
    cwd = config.working_dir or image.working_dir or "/"
    return os.path.normpath("/" + cwd.lstrip("/"))


def stop_signal(config: api_pb2.ContainerConfig, image: ImageConfig) -> str:
    """The signal that stops the container: CRI's stop_signal, else the image's, else SIGTERM."""
    if config.stop_signal != api_pb2.SIGNAL_RUNTIME_DEFAULT:
        name = api_pb2.Signal.Name(config.stop_signal).removeprefix("SIGNAL_")
        return name.replace("MINPLUS", "MIN+").replace("MAXMINUS", "MAX-")
    signal = image.stop_signal.upper()
    if signal and not signal.startswith("SIG") and not signal.isdigit():
        signal = "SIG" + signal
    return signal or "SIGTERM"


# --------------------------------------------------------------------------- users


def resolve_user(rootfs: Path, sc: api_pb2.LinuxContainerSecurityContext, image_user: str, container: str = "") -> User:
    """uid/gid/groups from the security context, else the image's User, resolved in the rootfs."""
    has_uid, has_gid = sc.HasField("run_as_user"), sc.HasField("run_as_group")
    if has_gid and not has_uid and not sc.run_as_username:
        raise InvalidArgument(f"container {container!r}: run_as_group is set without run_as_user or run_as_username")
    if sc.run_as_username:
        spec = sc.run_as_username
    elif has_uid:
        spec = str(sc.run_as_user.value)
    else:
        spec = image_user or "0"
    user_part, _, group_part = spec.partition(":")
    passwd = _read_db(rootfs, "/etc/passwd")
    groups = _read_db(rootfs, "/etc/group")
    uid, gid, name = _lookup_user(user_part, passwd, container)
    if group_part:
        gid = _lookup_group(group_part, groups, container)
    if has_gid:
        gid = _check_id(sc.run_as_group.value, "run_as_group", container)
    extra = [gid]
    if sc.supplemental_groups_policy not in (api_pb2.Merge, api_pb2.Strict):
        raise InvalidArgument(
            f"container {container!r}: unknown supplemental_groups_policy {sc.supplemental_groups_policy}"
        )
    strict = sc.supplemental_groups_policy == api_pb2.Strict
    if name and not group_part and not strict:  # like runc: member groups only for the implicit form
        extra += [_int(entry[2]) for entry in groups if len(entry) > 3 and name in entry[3].split(",")]
    extra += [_check_id(g, "supplemental group", container) for g in sc.supplemental_groups]
    return User(uid, gid, [g for g in dict.fromkeys(extra) if g >= 0])


def _lookup_user(user: str, passwd: list[list[str]], container: str) -> tuple[int, int, str]:
    """(uid, primary gid, name) of a numeric or named user; unknown numeric uids get gid 0."""
    if user.isdigit():
        uid = _check_id(int(user), "uid", container)
        for entry in passwd:
            if len(entry) > 3 and _int(entry[2]) == uid:
                return uid, _int(entry[3]), entry[0]
        return uid, 0, ""
    for entry in passwd:
        if len(entry) > 3 and entry[0] == user:
            return _int(entry[2]), _int(entry[3]), user
    raise InvalidArgument(f"container {container!r}: user {user!r} not found in the image's /etc/passwd")


def _lookup_group(group: str, groups: list[list[str]], container: str) -> int:
    if group.isdigit():
        return _check_id(int(group), "gid", container)
    for entry in groups:
        if len(entry) > 2 and entry[0] == group:
            return _int(entry[2])
    raise InvalidArgument(f"container {container!r}: group {group!r} not found in the image's /etc/group")


def _check_id(value: int, what: str, container: str) -> int:
    if not 0 <= value < 2**32 - 1:
        raise InvalidArgument(f"container {container!r}: {what} {value} is out of range")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


def _read_db(rootfs: Path, path: str) -> list[list[str]]:
    """Colon-separated entries of a file of the image (symlinks resolved inside the rootfs)."""
    try:
        text = secure_join(rootfs, path).read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def secure_join(root: Path, path: str) -> Path:
    """`root`/`path` with every symlink resolved as if `root` were "/": the result stays under root."""
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if not candidate.is_symlink():
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(root / path.lstrip("/")))
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return root.joinpath(*resolved)


# --------------------------------------------------------------------------- mounts


def default_mounts(sandbox: SandboxInfo, privileged: bool) -> list[dict]:
    """proc, /dev and friends, sysfs and the cgroup tree (read-only unless privileged)."""
    access = "rw" if privileged else "ro"
    return [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", SHM_SIZE]),
        _mount(
            "/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
        ),
        _shm_mount(sandbox),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", access]),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "relatime", access]),
    ]


def _shm_mount(sandbox: SandboxInfo) -> dict:
    """The pod's shared /dev/shm when it has one (the host's with host IPC), else a private tmpfs."""
    source = sandbox.shm_path or ("/dev/shm" if sandbox.host_ipc else None)
    if source:
        return _mount("/dev/shm", "bind", source, ["rbind", "rw"])
    return _mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", SHM_SIZE])


def _mount(destination: str, kind: str, source: str, options: list[str]) -> dict:
    return {"destination": destination, "type": kind, "source": source, "options": options}


def sandbox_file_mounts(sandbox: SandboxInfo, readonly: bool) -> list[dict]:
    """/etc/hostname, /etc/resolv.conf and /etc/hosts of the pod, bound in."""
    access = "ro" if readonly else "rw"
    mounts = []
    if sandbox.hostname_file:
        mounts.append(_mount("/etc/hostname", "bind", sandbox.hostname_file, ["bind", access]))
    if sandbox.resolv_conf:
        mounts.append(
            _mount("/etc/resolv.conf", "bind", sandbox.resolv_conf, ["bind", access, "nodev", "nosuid", "noexec"])
        )
    if sandbox.hosts_file:
        mounts.append(_mount("/etc/hosts", "bind", sandbox.hosts_file, ["bind", access]))
    return mounts


def cri_mounts(
    mounts: Sequence[api_pb2.Mount],
    container: str = "",
    mountinfo: str | None = None,
    *,
    rro_supported: bool = False,
    image_sources: Mapping[int, str] | None = None,
) -> tuple[list[dict], str]:
    """OCI bind mounts for the CRI mounts (shallowest first) and the rootfs propagation they need.

    `image_sources` maps the index of each image volume in `mounts` to the host directory that
    holds it (the image's rootfs, or the sub path in it), mounted by the caller beforehand.
    `rro_supported`: the handler can make a bind recursively read-only (runc's `rro`).
    """
    ordered = sorted(enumerate(mounts), key=lambda im: os.path.normpath(im[1].container_path or "/").count("/"))
    result, root_propagation = [], ""
    for index, m in ordered:
        source = (image_sources or {}).get(index)
        mount, propagation = _cri_mount(m, container, mountinfo, rro_supported, source)
        result.append(mount)
        if propagation == "rshared" or (propagation == "rslave" and root_propagation != "rshared"):
            root_propagation = propagation
    return result, root_propagation


def is_image_mount(m: api_pb2.Mount) -> bool:
    """Whether a CRI mount is an image volume (KEP 4639) rather than a host path."""
    return m.HasField("image") and bool(m.image.image or m.image.user_specified_image)


def check_image_mount(m: api_pb2.Mount, container: str = "") -> None:
    """What an image volume must be before anything is mounted for it (CRI and containerd rules)."""
    where = f"container {container!r}: image volume at {m.container_path!r}"
    if not m.image.image:
        raise InvalidArgument(f"{where}: image.image is empty")
    if m.host_path:
        raise InvalidArgument(f"{where}: host_path must be empty for an image volume, got {m.host_path!r}")
    if not m.readonly:
        raise InvalidArgument(f"{where}: image volumes are read-only: readonly must be true")
    if m.uidMappings or m.gidMappings:
        raise Unimplemented(f"{where}: idmapped mounts are not supported")
    sub_path = m.image_sub_path
    if sub_path.startswith("/") or ".." in sub_path.split("/"):
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r} must be a relative path without '..'")


def _cri_mount(
    m: api_pb2.Mount, container: str, mountinfo: str | None, rro_supported: bool, image_source: str | None
) -> tuple[dict, str]:
    where = f"container {container!r}: mount at {m.container_path!r}"
    if not m.container_path.startswith("/"):
        raise InvalidArgument(f"{where}: container_path must be an absolute path")
    if is_image_mount(m):
        check_image_mount(m, container)
        if image_source is None:
            raise Unimplemented(f"{where}: image {m.image.image!r} was not mounted for this container")
        source = image_source
    else:
        if m.image_sub_path:
            raise InvalidArgument(f"{where}: image_sub_path is only for image volumes")
        if not m.host_path:
            raise InvalidArgument(f"{where}: host_path is empty")
        if m.uidMappings or m.gidMappings:
            raise Unimplemented(f"{where}: idmapped mounts are not supported")
        source = os.path.realpath(m.host_path)  # CRI: follow a symlinked host path
        if not os.path.exists(source):
            raise InvalidArgument(f"{where}: host path {m.host_path!r} does not exist")
    if m.recursive_read_only:
        _check_rro(m, where, rro_supported)
    propagation = _propagation(m.propagation, source, where, mountinfo)
    access = "rro" if m.recursive_read_only else ("ro" if m.readonly else "rw")
    options = ["rbind", propagation, access, *m.mount_options]
    destination = os.path.normpath(m.container_path)
    return _mount(destination, "bind", source, options), propagation


def _check_rro(m: api_pb2.Mount, where: str, supported: bool) -> None:
    """CRI: recursive_read_only needs readonly and PRIVATE propagation, and a handler that can."""
    if not m.readonly:
        raise InvalidArgument(f"{where}: recursive_read_only needs readonly to be true")
    if m.propagation != Propagation.PROPAGATION_PRIVATE:
        name = Propagation.Name(m.propagation) if m.propagation in Propagation.values() else str(m.propagation)
        raise InvalidArgument(f"{where}: recursive_read_only needs PROPAGATION_PRIVATE, got {name}")
    if not supported:
        # kubelet's errors.ErrRROUnsupported text, so callers can tell this case apart.
        raise InvalidArgument(f"{where}: RROUnsupported: the runtime handler cannot make mounts recursively read-only")


def _propagation(mode: int, source: str, where: str, mountinfo: str | None) -> str:
    """rprivate / rslave / rshared, checking the host mount can propagate as asked."""
    if mode == Propagation.PROPAGATION_PRIVATE:
        return "rprivate"
    tags = mount_propagation_tags(source, mountinfo)
    if mode == Propagation.PROPAGATION_BIDIRECTIONAL:
        if "shared" not in tags:
            raise InvalidArgument(f"{where}: bidirectional propagation needs {source!r} on a shared mount")
        return "rshared"
    if mode == Propagation.PROPAGATION_HOST_TO_CONTAINER:
        if not tags & {"shared", "master"}:
            raise InvalidArgument(f"{where}: host-to-container propagation needs {source!r} on a shared or slave mount")
        return "rslave"
    raise InvalidArgument(f"{where}: unknown propagation {mode}")


def mount_propagation_tags(path: str, mountinfo: str | None = None) -> set[str]:
    """Propagation kinds ("shared", "master"...) of the host mount that holds `path`."""
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    best: set[str] = set()
    best_len = -1
    for line in text.splitlines():
        head = line.split(" - ", 1)[0].split()
        if len(head) < 6:
            continue
        point = unescape_mountinfo(head[4])
        inside = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best_len:  # later entries over-mount earlier ones
            best, best_len = {tag.split(":")[0] for tag in head[6:]}, len(point)
    return best


def merge_mounts(defaults: list[dict], sandbox_files: list[dict], requested: list[dict]) -> list[dict]:
    """Defaults and pod files, minus what the CRI mounts replace (a CRI /dev or /sys takes its subtree)."""
    wanted = {m["destination"] for m in requested}
    kept = []
    for m in defaults + sandbox_files:
        dest = m["destination"]
        shadowed = dest in wanted or any(dest.startswith(top + "/") for top in ("/dev", "/sys") if top in wanted)
        if not shadowed:
            kept.append(m)
    return kept + requested


# --------------------------------------------------------------------------- devices


def cri_devices(devices: Iterable[api_pb2.Device], container: str = "") -> tuple[list[dict], list[dict]]:
    """linux.devices entries and their device-cgroup allow rules; a directory brings its devices."""
    nodes: list[dict] = []
    rules: list[dict] = []
    for device in devices:
        permissions = device.permissions or "rwm"
        where = f"container {container!r}: device {device.host_path!r}"
        if not set(permissions) <= set("rwm"):
            raise InvalidArgument(f"{where}: bad permissions {device.permissions!r}")
        host = os.path.realpath(device.host_path)
        try:
            info = os.stat(host)
        except OSError:
            raise InvalidArgument(f"{where} does not exist") from None
        if stat.S_ISDIR(info.st_mode):
            found = _devices_under(host, device.container_path or device.host_path)
        elif _is_device(info):
            found = [(device.container_path or device.host_path, info)]
        else:
            raise InvalidArgument(f"{where} is not a device")
        for path, node in found:
            entry, rule = _device_entry(path, node, permissions)
            nodes.append(entry)
            rules.append(rule)
    return nodes, rules


def _is_device(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)


def _devices_under(
    host_dir: str, container_dir: str, skip: frozenset[str] = frozenset()
) -> list[tuple[str, os.stat_result]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(host_dir):
        dirnames[:] = [d for d in dirnames if not (dirpath == host_dir and d in skip)]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if _is_device(info):
                found.append((container_dir.rstrip("/") + path[len(host_dir.rstrip("/")) :], info))
    return found


def _device_entry(path: str, info: os.stat_result, permissions: str) -> tuple[dict, dict]:
    kind = "c" if stat.S_ISCHR(info.st_mode) else "b"
    major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
    entry = {
        "path": path,
        "type": kind,
        "major": major,
        "minor": minor,
        "fileMode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
    }
    return entry, {"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions}


def host_devices(dev: str = "/dev") -> list[dict]:
    """Every device node of the host's /dev, for privileged containers."""
    found = _devices_under(dev, dev, HOST_DEV_SKIP)
    return [_device_entry(path, info, "rwm")[0] for path, info in found if path != "/dev/console" and info.st_rdev]


# --------------------------------------------------------------------------- resources


def linux_resources(
    resources: api_pb2.LinuxContainerResources | None,
    support: CgroupSupport,
    warnings: list[str],
    container: str = "",
    pids_limit: int | None = None,
) -> dict:
    """linux.resources without devices: cpu, memory (swap like CRI-O), pids, hugepages, unified."""
    out: dict = {}
    if resources is not None:
        if cpu := _cpu(resources):
            out["cpu"] = cpu
        if memory := _memory(resources, support, container):
            out["memory"] = memory
        if hugepages := _hugepages(resources, support, warnings):
            out["hugepageLimits"] = hugepages
        if resources.unified:
            if support.mode == "v2":
                out["unified"] = dict(resources.unified)
            else:
                _warn(warnings, f"container {container!r}: unified cgroup settings ignored on a {support.mode} host")
    if pids_limit is not None and support.pids:
        out["pids"] = {"limit": pids_limit}
    return out


def _cpu(r: api_pb2.LinuxContainerResources) -> dict:
    cpu: dict = {}
    for key, value in (("shares", r.cpu_shares), ("quota", r.cpu_quota), ("period", r.cpu_period)):
        if value:
            cpu[key] = value
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    return cpu


def _memory(r: api_pb2.LinuxContainerResources, support: CgroupSupport, container: str) -> dict:
    """Swap defaults to the limit (no swapping) unless asked; set only where swap is accounted."""
    if not r.memory_limit_in_bytes:
        return {}
    memory = {"limit": r.memory_limit_in_bytes}
    swap = r.memory_limit_in_bytes
    if r.memory_swap_limit_in_bytes:
        if 0 < r.memory_swap_limit_in_bytes < r.memory_limit_in_bytes:
            raise InvalidArgument(
                f"container {container!r}: memory swap limit ({r.memory_swap_limit_in_bytes}) "
                f"cannot be lower than the memory limit ({r.memory_limit_in_bytes})"
            )
        swap = r.memory_swap_limit_in_bytes
    if support.memory_swap:
        memory["swap"] = swap
    return memory


def _hugepages(r: api_pb2.LinuxContainerResources, support: CgroupSupport, warnings: list[str]) -> list[dict]:
    limits = [{"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits]
    if limits and not support.hugetlb:
        _warn(warnings, "hugepage limits ignored: no hugetlb cgroup controller on this host")
        return []
    return limits


# --------------------------------------------------------------------------- namespaces


def namespaces(
    options: api_pb2.NamespaceOption | None,
    sandbox: SandboxInfo,
    support: CgroupSupport,
    container: str = "",
    target_pid_ns_path: str | None = None,
) -> list[dict]:
    """linux.namespaces: mount always new; network/ipc/uts join the pod's; pid per the CRI mode."""
    options = options or api_pb2.NamespaceOption()
    if (
        options.HasField("userns_options")
        and options.userns_options.mode == NamespaceMode.POD
        and (options.userns_options.uids or options.userns_options.gids)
    ):
        raise Unimplemented(f"container {container!r}: user namespaces are not supported")
    host_net = sandbox.host_network or options.network == NamespaceMode.NODE
    host_ipc = sandbox.host_ipc or options.ipc == NamespaceMode.NODE
    result = [{"type": "mount"}]
    if not host_net:
        result += [_pod_ns(sandbox, "network"), _pod_ns(sandbox, "uts")]
    if not host_ipc:
        result.append(_pod_ns(sandbox, "ipc"))
    if pid := _pid_ns(options, sandbox, container, target_pid_ns_path):
        result.append(pid)
    if support.mode == "v2":
        result.append({"type": "cgroup"})
    return result


def _pod_ns(sandbox: SandboxInfo, kind: str) -> dict:
    path = sandbox.namespace_paths.get(kind, "")
    return {"type": kind, "path": path} if path else {"type": kind}


def _pid_ns(options: api_pb2.NamespaceOption, sandbox: SandboxInfo, container: str, target: str | None) -> dict | None:
    mode = options.pid
    if mode == NamespaceMode.CONTAINER:
        return {"type": "pid"}
    if mode == NamespaceMode.NODE:
        return None
    if mode == NamespaceMode.TARGET:
        if not target:
            raise InvalidArgument(f"container {container!r}: target PID namespace of {options.target_id!r} is unknown")
        return {"type": "pid", "path": target}
    if sandbox.pid_ns_path:
        return {"type": "pid", "path": sandbox.pid_ns_path}
    if sandbox.host_pid:
        return None
    raise InvalidArgument(f"container {container!r}: pod PID namespace requested but the pod has none to share")


def sysctls(values: dict[str, str], ns_types: set[str], container: str = "") -> dict[str, str]:
    """The pod's sysctls, normalized to dots and checked against the namespaces the spec gets."""
    result = {}
    for raw, value in values.items():
        name = _normalize_sysctl(raw)
        if name in IPC_SYSCTLS or name.startswith("fs.mqueue."):
            needed = "ipc"
        elif name.startswith("net."):
            needed = "network"
        elif name == "kernel.domainname":
            needed = "uts"
        else:
            raise InvalidArgument(f"container {container!r}: sysctl {raw!r} is not namespaced (not allowed)")
        if needed not in ns_types:
            raise InvalidArgument(
                f"container {container!r}: sysctl {raw!r} needs a pod {needed} namespace, not the host's"
            )
        result[name] = value
    return result


def _normalize_sysctl(name: str) -> str:
    """Kubernetes accepts "net/ipv4/ip_forward": when "/" comes first, "/" and "." swap roles."""
    slash, dot = name.find("/"), name.find(".")
    if slash == -1 or (dot != -1 and dot < slash):
        return name
    return name.translate(str.maketrans("/.", "./"))


# --------------------------------------------------------------------------- security


def capability_sets(
    caps: api_pb2.Capability | None, privileged: bool, available: Iterable[str] | None = None, container: str = ""
) -> dict:
    """process.capabilities: CRI-O defaults, then ALL handling, adds and drops; nothing inheritable.

    `available` is what this runtime can hand out (its own bounding set, detected when None):
    privileged and "ALL" mean all of those; naming a capability outside it is an error.
    """
    have = set(available if available is not None else available_capabilities())
    known = tuple(c for c in ALL_CAPABILITIES if c in have)
    if privileged:
        return {"bounding": list(known), "effective": list(known), "permitted": list(known)}
    caps = caps or api_pb2.Capability()
    add = [_cap_name(c, known, container) for c in caps.add_capabilities]
    drop = [_cap_name(c, known, container) for c in caps.drop_capabilities]
    ambient = [_cap_name(c, known, container) for c in caps.add_ambient_capabilities if c.upper() != "ALL"]
    current: set[str] = set()
    if "ALL" in add:
        current = set(known)
    elif "ALL" not in drop:
        current = set(DEFAULT_CAPABILITIES) & have
    current |= set(add) | set(ambient)
    current -= set(drop) | {"ALL"}
    ordered = [c for c in known if c in current]
    sets: dict = {"bounding": ordered, "effective": ordered, "permitted": ordered}
    kept_ambient = [c for c in known if c in set(ambient) - set(drop)]
    if kept_ambient:
        sets["inheritable"] = sets["ambient"] = kept_ambient
    return sets


def _cap_name(name: str, known: tuple[str, ...], container: str) -> str:
    upper = name.upper()
    if upper == "ALL":
        return upper
    full = upper if upper.startswith("CAP_") else "CAP_" + upper
    if full not in known:
        raise InvalidArgument(f"container {container!r}: unknown or unavailable capability {name!r}")
    return full


@functools.lru_cache(maxsize=1)
def available_capabilities() -> tuple[str, ...]:
    """The capabilities in this process's bounding set: all that runc can give a container."""
    try:
        status = Path("/proc/self/status").read_text()
        bounding = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd:")), 16)
    except (OSError, ValueError, StopIteration):
        return ALL_CAPABILITIES
    return tuple(cap for number, cap in enumerate(ALL_CAPABILITIES) if bounding >> number & 1)


def masked_and_readonly_paths(
    sc: api_pb2.LinuxContainerSecurityContext, privileged: bool
) -> tuple[list[str], list[str]]:
    """The CRI lists (kubelet sends Kubernetes' defaults), else those defaults; none when privileged.

    An empty list from kubelet means procMount Unmasked, which it allows only with user namespaces,
    which pycrio does not support: so empty here always means "not given".
    """
    if privileged:
        return [], []
    masked = list(dict.fromkeys([*sc.masked_paths, *DEFAULT_MASKED_PATHS]))
    readonly = list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS)
    return masked, readonly


def _warn_apparmor(sc: api_pb2.LinuxContainerSecurityContext, container: str, warnings: list[str]) -> None:
    """No AppArmor on pycrio's hosts: a requested profile is reported, never applied."""
    asked = ""
    if sc.HasField("apparmor") and sc.apparmor.profile_type != ProfileType.Unconfined:
        asked = sc.apparmor.localhost_ref or "runtime/default"
    elif sc.apparmor_profile not in ("", "unconfined"):
        asked = sc.apparmor_profile
    if asked:
        _warn(warnings, f"container {container!r}: AppArmor profile {asked!r} ignored (AppArmor is not supported)")


@functools.lru_cache(maxsize=1)
def oom_score_adj_floor() -> int:
    """The lowest oom_score_adj we can give a child: lowering our own needs CAP_SYS_RESOURCE."""
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
        if effective >> ALL_CAPABILITIES.index("CAP_SYS_RESOURCE") & 1:
            return -1000
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError, StopIteration):
        return -1000


def _oom_score_adj(wanted: int, floor: int | None, warnings: list[str], who: str) -> int:
    floor = oom_score_adj_floor() if floor is None else floor
    if wanted < floor:
        _warn(warnings, f"{who}: oom_score_adj {wanted} raised to {floor} (no CAP_SYS_RESOURCE to go lower)")
        return floor
    return wanted


def _warn(warnings: list[str], message: str) -> None:
    log.warning(message)
    warnings.append(message)


# --------------------------------------------------------------------------- seccomp


def seccomp_for(
    sc: api_pb2.LinuxContainerSecurityContext, capabilities: Iterable[str], privileged: bool, container: str = ""
) -> dict | None:
    """linux.seccomp from the CRI request: RuntimeDefault, Unconfined (None) or a Localhost file."""
    if privileged:
        return None
    kind, ref = _seccomp_choice(sc, container)
    if kind == "unconfined":
        return None
    if kind == "default":
        return seccomp.runtime_default(capabilities)
    return seccomp.load_profile(ref, capabilities, container)


def _seccomp_choice(sc: api_pb2.LinuxContainerSecurityContext, container: str) -> tuple[str, str]:
    if sc.HasField("seccomp"):
        kind = sc.seccomp.profile_type
        if kind == ProfileType.RuntimeDefault:
            return "default", ""
        if kind == ProfileType.Unconfined:
            return "unconfined", ""
        return "localhost", sc.seccomp.localhost_ref
    path = sc.seccomp_profile_path  # the deprecated string form
    if path in ("", "unconfined"):
        return "unconfined", ""
    if path in ("runtime/default", "docker/default"):
        return "default", ""
    if path.startswith("localhost/"):
        return "localhost", path.removeprefix("localhost")
    raise InvalidArgument(f"container {container!r}: unknown seccomp profile {path!r}")


# --------------------------------------------------------------------------- the specs


def container_spec(
    container_id: str,
    config: api_pb2.ContainerConfig,
    sandbox: SandboxInfo,
    image: ImageConfig,
    rootfs: Path,
    sandbox_config: api_pb2.PodSandboxConfig | None = None,
    *,
    support: CgroupSupport | None = None,
    target_pid_ns_path: str | None = None,
    pids_limit: int | None = None,
    oom_floor: int | None = None,
    warnings: list[str] | None = None,
    rro_supported: bool = False,
    image_sources: Mapping[int, str] | None = None,
) -> dict:
    """The OCI runtime spec of a container of `sandbox`, ready for json.dump into its bundle.

    `sandbox_config` (the pod's CRI config) fills what `sandbox` leaves empty: sysctls, whether
    the pod may hold privileged containers, annotations. `target_pid_ns_path`: the target
    container's pid namespace for PID mode TARGET. `support`: the host's cgroup abilities and
    `oom_floor` the lowest settable oom_score_adj (both detected when None). Ignored or adjusted
    requests are appended to `warnings`. `rro_supported`: the handler can honour recursive_read_only;
    `image_sources`: the host directories of the image volumes (see cri_mounts).
    """
    name = _name(config)
    if not name:
        raise InvalidArgument("container config has no metadata.name")
    sandbox = _with_pod_config(sandbox, sandbox_config)
    support = support or detect_support()
    warnings = [] if warnings is None else warnings
    linux_cfg = config.linux
    sc = linux_cfg.security_context
    privileged = sc.privileged
    if privileged and not sandbox.privileged:
        raise InvalidArgument(f"container {name!r}: privileged container in a pod that is not privileged")
    _warn_apparmor(sc, name, warnings)
    caps = capability_sets(sc.capabilities if sc.HasField("capabilities") else None, privileged, container=name)
    ns_list = namespaces(
        sc.namespace_options if sc.HasField("namespace_options") else None, sandbox, support, name, target_pid_ns_path
    )
    mounts, root_propagation = _container_mounts(
        config, sandbox, privileged, sc.readonly_rootfs, name, rro_supported, image_sources
    )
    resources = linux_resources(
        linux_cfg.resources if linux_cfg.HasField("resources") else None, support, warnings, name, pids_limit
    )
    linux = _linux_section(config, sandbox, sc, privileged, resources, ns_list, caps, container_id, name)
    if root_propagation:
        linux["rootfsPropagation"] = root_propagation
    user = resolve_user(rootfs, sc, image.user, name)
    process = {
        "terminal": config.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
        "args": process_args(config, image),
        "env": build_env(config, image, sandbox.hostname),
        "cwd": working_dir(config, image),
        "capabilities": caps,
        "noNewPrivileges": sc.no_new_privs,
        "oomScoreAdj": _oom_score_adj(linux_cfg.resources.oom_score_adj, oom_floor, warnings, f"container {name!r}"),
    }
    spec = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(rootfs), "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "linux": linux,
        "annotations": _annotations(config, sandbox, image, name, "container"),
    }
    if any(ns["type"] == "uts" for ns in ns_list) and sandbox.hostname:
        spec["hostname"] = sandbox.hostname
    return spec


def _with_pod_config(sandbox: SandboxInfo, config: api_pb2.PodSandboxConfig | None) -> SandboxInfo:
    """`sandbox` completed from the pod's CRI config where its own fields are empty."""
    if config is None:
        return sandbox
    return dataclasses.replace(
        sandbox,
        privileged=sandbox.privileged or config.linux.security_context.privileged,
        sysctls=sandbox.sysctls or dict(config.linux.sysctls),
        labels=sandbox.labels or dict(config.labels),
        annotations=sandbox.annotations or dict(config.annotations),
    )


def _name(config: api_pb2.ContainerConfig) -> str:
    return config.metadata.name


def _container_mounts(
    config: api_pb2.ContainerConfig,
    sandbox: SandboxInfo,
    privileged: bool,
    readonly: bool,
    name: str,
    rro_supported: bool,
    image_sources: Mapping[int, str] | None,
) -> tuple[list[dict], str]:
    requested, propagation = cri_mounts(
        config.mounts, name, rro_supported=rro_supported, image_sources=image_sources
    )
    merged = merge_mounts(default_mounts(sandbox, privileged), sandbox_file_mounts(sandbox, readonly), requested)
    return merged, propagation


def _linux_section(
    config: api_pb2.ContainerConfig,
    sandbox: SandboxInfo,
    sc: api_pb2.LinuxContainerSecurityContext,
    privileged: bool,
    resources: dict,
    ns_list: list[dict],
    caps: dict,
    container_id: str,
    name: str,
) -> dict:
    nodes, rules = cri_devices(config.devices, name)
    if privileged:
        taken = {node["path"] for node in nodes}
        nodes += [node for node in host_devices() if node["path"] not in taken]
        rules = [{"allow": True, "access": "rwm"}]
    else:
        rules = [DENY_ALL_DEVICES, *rules]
    masked, readonly = masked_and_readonly_paths(sc, privileged)
    linux: dict = {
        "namespaces": ns_list,
        "cgroupsPath": cgroups_path(sandbox.cgroup_parent, sandbox.id, container_id),
        "resources": {**resources, "devices": rules},
        "devices": nodes,
        "maskedPaths": masked,
        "readonlyPaths": readonly,
    }
    if sandbox.sysctls:
        linux["sysctl"] = sysctls(sandbox.sysctls, {ns["type"] for ns in ns_list}, name)
    if (profile := seccomp_for(sc, caps["bounding"], privileged, name)) is not None:
        linux["seccomp"] = profile
    return linux


def _annotations(
    config: api_pb2.ContainerConfig | None, sandbox: SandboxInfo, image: ImageConfig | None, name: str, kind: str
) -> dict[str, str]:
    """Kubelet's annotations, then who this is, in kubelet's and the CRI runtimes' usual keys."""
    out = dict(config.annotations) if config is not None else dict(sandbox.annotations)
    out.update(
        {
            "io.kubernetes.pod.name": sandbox.name,
            "io.kubernetes.pod.namespace": sandbox.namespace,
            "io.kubernetes.pod.uid": sandbox.uid,
            "io.kubernetes.cri.container-type": kind,
            "io.kubernetes.cri.sandbox-id": sandbox.id,
            "io.kubernetes.cri-o.ContainerType": kind,
            "io.kubernetes.cri-o.SandboxID": sandbox.id,
        }
    )
    if config is not None:
        out["io.kubernetes.container.name"] = name
        out["io.kubernetes.cri.image-name"] = config.image.image
        if image is not None and (image.stop_signal or config.stop_signal):
            out["org.opencontainers.image.stopSignal"] = stop_signal(config, image)
    return out


def sandbox_infra_spec(
    sandbox: SandboxInfo,
    rootfs: Path,
    *,
    support: CgroupSupport | None = None,
    oom_floor: int | None = None,
    warnings: list[str] | None = None,
) -> dict:
    """The spec of a pod's infra process (catatonit in pause mode) owning the pod's PID namespace.

    `rootfs` is a directory made by infra_rootfs(). Network, IPC and UTS follow the pod like its
    containers do; the infra gets a new PID namespace that the pod's containers join.
    """
    support = support or detect_support()
    ns_list = [ns for ns in namespaces(None, _before_infra(sandbox), support) if ns["type"] != "pid"]
    ns_list.append({"type": "pid"})
    linux: dict = {
        "namespaces": ns_list,
        "cgroupsPath": cgroups_path(sandbox.cgroup_parent, sandbox.id, sandbox.id),
        "resources": {"devices": [DENY_ALL_DEVICES]},
        "maskedPaths": list(DEFAULT_MASKED_PATHS),
        "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        "seccomp": seccomp.runtime_default(()),
    }
    if sandbox.sysctls:
        linux["sysctl"] = sysctls(sandbox.sysctls, {ns["type"] for ns in ns_list}, "infra")
    oom = _oom_score_adj(INFRA_OOM_SCORE_ADJ, oom_floor, [] if warnings is None else warnings, "infra")
    spec = {
        "ociVersion": OCI_VERSION,
        "process": _infra_process(oom),
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": [
            _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
            _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", SHM_SIZE]),
        ],
        "linux": linux,
        "annotations": _annotations(None, sandbox, None, "", "sandbox"),
    }
    if any(ns["type"] == "uts" for ns in ns_list) and sandbox.hostname:
        spec["hostname"] = sandbox.hostname
    return spec


def _infra_process(oom_score_adj: int) -> dict:
    """catatonit as the pod's PID 1: root without capabilities, reaping and waiting."""
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": [f"/{INFRA_BINARY}", "-P"],
        "env": [DEFAULT_PATH_ENV],
        "cwd": "/",
        "capabilities": {"bounding": [], "effective": [], "permitted": []},
        "noNewPrivileges": True,
        "oomScoreAdj": oom_score_adj,
    }


def _before_infra(sandbox: SandboxInfo) -> SandboxInfo:
    """`sandbox` as seen before its infra exists (no pid namespace to join yet)."""
    return dataclasses.replace(sandbox, pid_ns_path=None, host_pid=True)


def infra_rootfs(path: Path, catatonit: Path = CATATONIT) -> Path:
    """Make `path` a minimal rootfs holding only a copy of the (static) catatonit; idempotent."""
    if not catatonit.is_file():
        raise FileNotFoundError(errno.ENOENT, "catatonit not found", str(catatonit))
    for directory in (path, path / "proc", path / "dev"):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = path / INFRA_BINARY
    source_info = catatonit.stat()
    try:
        current = target.stat()
        fresh = current.st_size == source_info.st_size and current.st_mtime >= source_info.st_mtime
    except FileNotFoundError:
        fresh = False
    if not fresh:
        scratch = target.with_name(f".{INFRA_BINARY}.tmp")
        shutil.copy2(catatonit, scratch)
        scratch.chmod(0o755)
        scratch.replace(target)
    return path

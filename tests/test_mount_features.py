"""Recursive read-only mounts, image volumes and SupplementalGroupsPolicy on a real daemon.

Real runc + conmon pods on a CNI bridge of this file's own, images from the test registry, the
CRI over gRPC (crictl's JSON configs cannot express image volumes), results read inside the
containers.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.oci import cgroups, features
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry, _Layout

BRIDGE = "pycriomt6"
SUBNET = "10.133.0.0/24"
CGROUP_PARENT = f"/pycrio-mounttest-{os.getpid()}"
APPLETS = ("sh", "ls", "cat", "sleep", "echo", "id", "touch", "mkdir")
PASSWD = "root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/home/default-user:/bin/sh\n"
GROUP = "root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
EROFS_TEXT = "Read-only file system"

_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- fixtures


def _build_groups_image(builder: ImageBuilder) -> _Layout:
    """busybox + /etc/passwd and /etc/group (default-user 1000 in group 50000) + a /data tree
    whose symlinks point out of the image (`up` climbs above the root, `abs` is absolute)."""
    base = builder._cached("busybox", builder._build_busybox)
    bundle = builder._unpack(base.tag, "mount-features")
    root = bundle / "rootfs"
    for applet in APPLETS:
        link = root / "bin" / applet
        if not os.path.lexists(link):
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "sub" / "greeting.txt").write_text("hello from the image\n")
    (root / "data" / "plain.txt").write_text("a file, not a directory\n")
    (root / "data" / "up").symlink_to("../../../../../etc")
    (root / "data" / "abs").symlink_to("/etc")
    builder._repack("mount-features", bundle)
    shutil.rmtree(bundle)
    return builder._describe("mount-features")


@pytest.fixture(scope="module")
def groups_image(image_builder: ImageBuilder) -> BuiltImage:
    built = image_builder._cached("mount-features", lambda: _build_groups_image(image_builder))
    return image_builder._push(built, "mounts/groups", "1", "oci", None)


@pytest.fixture(scope="module")
def other_image(image_builder: ImageBuilder) -> BuiltImage:
    """An image that is in the registry but never pulled by the daemon."""
    return image_builder.busybox("mounts/not-pulled", "1")


def _conflist(directory: Path) -> Path:
    return bridge_network(directory, "pycrio-mounttest", BRIDGE, SUBNET, filename="10-mounttest.conflist")


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, registry: TestRegistry, groups_image: BuiltImage
) -> Iterator[PycrioDaemon]:
    base = tmp_path_factory.mktemp("mountd")
    netdir = _conflist(base / "net.d")
    d = PycrioDaemon(
        base / "daemon",
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{CGROUP_PARENT}"\n'
        ),
    ).start()
    d.crictl("pull", groups_image.reference)
    try:
        yield d
    finally:
        with d.channel() as ch:
            rt = d.runtime(ch)
            for pod in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
                rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        d.stop()
        assert _mounts_under(d.base) == []
        cgroups.remove_cgroup(CGROUP_PARENT)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


@pytest.fixture
def rt(daemon: PycrioDaemon) -> Iterator[api_pb2_grpc.RuntimeServiceStub]:
    with daemon.channel() as ch:
        yield daemon.runtime(ch)


@pytest.fixture
def pod(rt, tmp_path: Path) -> Iterator[tuple[str, api_pb2.PodSandboxConfig]]:
    """A running pod (removed afterwards) and its config; its logs go to tmp_path/logs."""
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=tmp_path.name[:40], namespace="mounts", uid=tmp_path.name, attempt=0),
        hostname="mounts",
        log_directory=str(tmp_path / "logs"),
    )
    pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    yield pod_id, config
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)


@pytest.fixture
def host_dir_with_submount() -> Iterator[Path]:
    """A host directory holding a tmpfs mounted at `sub` (what critest's RRO specs build)."""
    top = Path(tempfile.mkdtemp(prefix="pycrio-rro-"))
    (top / "sub").mkdir()
    (top / "top.txt").write_text("top\n")
    mounted = _libc.mount(b"none", str(top / "sub").encode(), b"tmpfs", 0, b"size=1m")
    assert mounted == 0, os.strerror(ctypes.get_errno())
    try:
        yield top
    finally:
        _libc.umount2(str(top / "sub").encode(), 2)
        shutil.rmtree(top, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def _mounts_under(path: Path) -> list[str]:
    base = str(path)
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if base in line]


def container(
    image: str, name: str, command: list[str], mounts: list[api_pb2.Mount] | None = None, **sc: object
) -> api_pb2.ContainerConfig:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=image),
        command=command,
        log_path=f"{name}.log",
        mounts=mounts or [],
    )
    config.linux.security_context.CopyFrom(api_pb2.LinuxContainerSecurityContext(**sc))
    return config


def create(rt, pod: tuple[str, api_pb2.PodSandboxConfig], config: api_pb2.ContainerConfig) -> str:
    pod_id, pod_config = pod
    request = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
    return rt.CreateContainer(request, timeout=60).container_id


def create_error(rt, pod: tuple[str, api_pb2.PodSandboxConfig], config: api_pb2.ContainerConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        create(rt, pod, config)
    return err.value


def run(rt, pod, config: api_pb2.ContainerConfig) -> str:
    cid = create(rt, pod, config)
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def exec_sync(rt, cid: str, *cmd: str) -> api_pb2.ExecSyncResponse:
    return rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=20), timeout=60)


def remove(rt, cid: str) -> None:
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)


def wait_for_log(path: Path, timeout: float = 15.0) -> list[str]:
    """The stdout lines of a CRI log file, once there is at least one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = [line.split(" ", 3)[3] for line in path.read_text().splitlines() if " stdout F " in line]
            if lines:
                return lines
        time.sleep(0.1)
    raise AssertionError(f"nothing on stdout in {path}")


def bind(host: Path, path: str = "/mnt", **fields: object) -> api_pb2.Mount:
    return api_pb2.Mount(host_path=str(host), container_path=path, **fields)


def image_mount(image: str, path: str, sub_path: str = "", readonly: bool = True) -> api_pb2.Mount:
    spec = api_pb2.ImageSpec(image=image)
    return api_pb2.Mount(container_path=path, readonly=readonly, image=spec, image_sub_path=sub_path)


def _expect_rro() -> bool:
    """What this host can do, found independently of pycrio: runc's features and the kernel."""
    runc = shutil.which("runc") or "runc"
    report = json.loads(subprocess.run([runc, "features"], capture_output=True, check=True).stdout)
    listed = "rro" in report["mountOptions"]
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return listed and (major, minor) >= (5, 12)


needs_rro = pytest.mark.skipif(not _expect_rro(), reason="runc without rro or kernel < 5.12")


# --------------------------------------------------------------------------- Status


def test_status_advertises_the_features(rt) -> None:
    status = rt.Status(api_pb2.StatusRequest(), timeout=30)
    handlers = {h.name: h.features for h in status.runtime_handlers}
    assert "" in handlers and "runc" in handlers  # "" is the default handler
    assert handlers[""].recursive_read_only_mounts == _expect_rro()
    assert handlers["runc"].recursive_read_only_mounts == _expect_rro()
    assert not handlers[""].user_namespaces
    assert status.features.supplemental_groups_policy
    verbose = rt.Status(api_pb2.StatusRequest(verbose=True), timeout=30)
    assert json.loads(verbose.info["runtimeFeatures"])["runc"]["recursive_read_only_mounts"] == _expect_rro()


def test_kernel_version_and_probe_reasons(tmp_path: Path) -> None:
    assert features.kernel_version("6.18.44-fc-v669") == (6, 18)
    assert features.kernel_version("5.4.0") == (5, 4)
    old = features.probe(shutil.which("runc") or "runc", kernel=(5, 4))
    assert not old.recursive_read_only_mounts and "5.12" in old.reason
    fake = tmp_path / "fakerunc"
    fake.write_text('#!/bin/sh\necho \'{"mountOptions": ["ro", "rbind"]}\'\n')
    fake.chmod(0o755)
    lacking = features.probe(str(fake))
    assert not lacking.recursive_read_only_mounts and "rro" in lacking.reason
    assert features.probe(str(tmp_path / "missing")).reason


# --------------------------------------------------------------------------- recursive read-only


@needs_rro
def test_recursive_read_only_mount_covers_submounts(rt, pod, groups_image, host_dir_with_submount) -> None:
    host = host_dir_with_submount
    rro = run(rt, pod, container(groups_image.reference, "rro", ["sleep", "1000"],
                                 [bind(host, readonly=True, recursive_read_only=True)]))
    plain = run(rt, pod, container(groups_image.reference, "ro", ["sleep", "1000"], [bind(host, readonly=True)]))
    for cid in (rro, plain):
        top = exec_sync(rt, cid, "sh", "-c", "cat /mnt/top.txt; touch /mnt/new")
        assert top.stdout == b"top\n" and EROFS_TEXT in top.stderr.decode(), top
    inside = exec_sync(rt, rro, "touch", "/mnt/sub/file")
    assert inside.exit_code != 0 and EROFS_TEXT in inside.stderr.decode(), inside
    assert not (host / "sub" / "file").exists()
    # A plain read-only bind leaves the submount writable: what recursive_read_only is for.
    assert exec_sync(rt, plain, "touch", "/mnt/sub/file").exit_code == 0
    assert (host / "sub" / "file").exists()
    status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=rro, verbose=True), timeout=30)
    [spec_mount] = [m for m in json.loads(status.info["info"])["runtimeSpec"]["mounts"] if m["destination"] == "/mnt"]
    assert spec_mount["options"] == ["rbind", "rprivate", "rro"]
    for cid in (rro, plain):
        remove(rt, cid)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"readonly": False, "recursive_read_only": True}, "needs readonly"),
        ({"readonly": True, "recursive_read_only": True, "propagation": api_pb2.PROPAGATION_HOST_TO_CONTAINER},
         "PROPAGATION_PRIVATE"),
        ({"readonly": True, "recursive_read_only": True, "propagation": api_pb2.PROPAGATION_BIDIRECTIONAL},
         "PROPAGATION_PRIVATE"),
    ],
)
def test_recursive_read_only_bad_combinations(rt, pod, groups_image, host_dir_with_submount, fields, message) -> None:
    err = create_error(rt, pod, container(groups_image.reference, "bad-rro", ["sleep", "1"],
                                          [bind(host_dir_with_submount, **fields)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details(), err.details()


# --------------------------------------------------------------------------- image volumes


def test_image_volume_shows_the_image_read_only(rt, pod, daemon, groups_image) -> None:
    ref = groups_image.reference
    mounts = [image_mount(ref, "/mnt/image"), image_mount(ref, "/mnt/sub", "data/sub"),
              image_mount(ref, "/mnt/up", "data/up"), image_mount(ref, "/mnt/abs", "data/abs")]
    cid = run(rt, pod, container(ref, "imgvol", ["sleep", "1000"], mounts))
    listing = exec_sync(rt, cid, "ls", "/mnt/image/data/sub", "/mnt/sub")
    assert listing.exit_code == 0 and listing.stdout.decode().count("greeting.txt") == 2, listing
    assert exec_sync(rt, cid, "cat", "/mnt/sub/greeting.txt").stdout == b"hello from the image\n"
    assert exec_sync(rt, cid, "/mnt/image/bin/busybox", "true").exit_code == 0  # not noexec
    # Symlinks in the sub path resolve inside the image: its /etc, never the host's.
    for where in ("/mnt/up", "/mnt/abs"):
        assert exec_sync(rt, cid, "cat", f"{where}/group").stdout.decode() == GROUP
    for path in ("/mnt/image/new", "/mnt/sub/new", "/mnt/image/data/sub/greeting.txt"):
        write = exec_sync(rt, cid, "touch", path)
        assert write.exit_code != 0 and EROFS_TEXT in write.stderr.decode(), (path, write)
    status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=30).status
    by_path = {m.container_path: m for m in status.mounts}
    image_id = rt_image_id(daemon, ref)
    assert by_path["/mnt/image"].image.image_ref == image_id and by_path["/mnt/sub"].image_sub_path == "data/sub"
    volumes = daemon.base / "root" / "storage" / "containers" / cid / "image-volumes"
    assert len(_mounts_under(volumes)) == 4
    remove(rt, cid)
    assert _mounts_under(volumes.parent) == [] and not volumes.parent.exists()


def rt_image_id(daemon: PycrioDaemon, reference: str) -> str:
    with daemon.channel() as ch:
        return daemon.images(ch).ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=reference)), timeout=30
        ).image.id


@pytest.mark.parametrize(
    ("sub_path", "code", "message"),
    [
        ("../etc", grpc.StatusCode.INVALID_ARGUMENT, "without '..'"),
        ("data/../../etc", grpc.StatusCode.INVALID_ARGUMENT, "without '..'"),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT, "relative path"),
        ("not-existing", grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
        ("data/plain.txt", grpc.StatusCode.INVALID_ARGUMENT, "not a directory"),
    ],
)
def test_image_volume_bad_sub_paths(rt, pod, daemon, groups_image, sub_path, code, message) -> None:
    err = create_error(rt, pod, container(groups_image.reference, "badsub", ["sleep", "1"],
                                          [image_mount(groups_image.reference, "/mnt/x", sub_path)]))
    assert err.code() == code and message in err.details(), err.details()
    assert _mounts_under(daemon.base / "root" / "storage" / "containers") == []  # nothing half-mounted stays


def test_image_volume_refusals(rt, pod, daemon, groups_image, other_image, tmp_path) -> None:
    ref = groups_image.reference
    cases = [
        (image_mount(other_image.reference, "/mnt/x"), grpc.StatusCode.NOT_FOUND, "pull it first"),
        (image_mount(ref, "/mnt/x", readonly=False), grpc.StatusCode.INVALID_ARGUMENT, "readonly must be true"),
        (api_pb2.Mount(container_path="/mnt/x", host_path=str(tmp_path), readonly=True,
                       image=api_pb2.ImageSpec(image=ref)), grpc.StatusCode.INVALID_ARGUMENT, "host_path must be empty"),
        (bind(tmp_path, image_sub_path="etc"), grpc.StatusCode.INVALID_ARGUMENT, "only for image volumes"),
    ]
    for mount, code, message in cases:
        err = create_error(rt, pod, container(ref, "refused", ["sleep", "1"], [mount]))
        assert err.code() == code and message in err.details(), err.details()
    assert _mounts_under(daemon.base / "root" / "storage" / "containers") == []


# --------------------------------------------------------------------------- SupplementalGroupsPolicy


@pytest.mark.parametrize(
    ("policy", "groups"),
    [(api_pb2.Merge, [1000, 1234, 50000]), (api_pb2.Strict, [1000, 1234])],
)
def test_supplemental_groups_policy(rt, pod, groups_image, tmp_path, policy, groups) -> None:
    name = f"groups-{policy}"
    config = container(groups_image.reference, name, ["sh", "-c", "id -G; exec sleep 1000"],
                       run_as_user=api_pb2.Int64Value(value=1000), supplemental_groups=[1234],
                       supplemental_groups_policy=policy)
    cid = run(rt, pod, config)
    expected = " ".join(map(str, groups))
    assert wait_for_log(tmp_path / "logs" / f"{name}.log") == [expected]
    assert exec_sync(rt, cid, "id", "-G").stdout.decode() == expected + "\n"
    user = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=30).status.user.linux
    assert (user.uid, user.gid, sorted(user.supplemental_groups)) == (1000, 1000, groups)
    remove(rt, cid)


def test_container_user_of_the_image_default(rt, pod, groups_image) -> None:
    cid = create(rt, pod, container(groups_image.reference, "root-user", ["sleep", "1"]))
    user = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=30).status.user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (0, 0, [0])
    remove(rt, cid)


# --------------------------------------------------------------------------- spec and sub path units


def test_spec_options_for_rro_and_unknown_policy(tmp_path: Path) -> None:
    from pycrio.errors import InvalidArgument
    from pycrio.oci import spec as S

    mounts = [api_pb2.Mount(container_path="/a", host_path=str(tmp_path), readonly=True, recursive_read_only=True)]
    [made], _ = S.cri_mounts(mounts, "c", rro_supported=True)
    assert made["options"] == ["rbind", "rprivate", "rro"]
    with pytest.raises(InvalidArgument, match="RROUnsupported"):
        S.cri_mounts(mounts, "c", rro_supported=False)
    sc = api_pb2.LinuxContainerSecurityContext(supplemental_groups_policy=7)
    with pytest.raises(InvalidArgument, match="supplemental_groups_policy"):
        S.resolve_user(tmp_path, sc, "", "c")


def test_sub_path_stays_inside_the_root(tmp_path: Path) -> None:
    from pycrio.errors import InvalidArgument
    from pycrio.images.volumes import sub_path_source

    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "a").symlink_to("../../..")  # climbs to the root, never above it
    (root / "loop").symlink_to("loop")
    assert sub_path_source(root, "") == root and sub_path_source(root, "./") == root
    assert sub_path_source(root, "a/etc") == root / "etc"
    assert sub_path_source(root, "a") == root
    with pytest.raises(InvalidArgument, match="symbolic links"):
        sub_path_source(root, "loop")

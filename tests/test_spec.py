"""CRI config -> OCI spec: merge rules and options as units, then real runs under runc."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument, Unimplemented
from pycrio.oci import cgroups, seccomp
from pycrio.oci import spec as S
from pycrio.oci.cgroups import CgroupSupport

V1 = CgroupSupport("v1", memory_swap=True, hugetlb=True, pids=True)
HYBRID_NO_HUGETLB = CgroupSupport("hybrid", memory_swap=True, hugetlb=False, pids=True)
V2 = CgroupSupport("v2", memory_swap=True, hugetlb=True, pids=True)
NO_SWAP = CgroupSupport("v1", memory_swap=False, hugetlb=True, pids=True)
RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "id", "cat", "sleep", "ls", "hostname", "touch", "chown", "unshare", "ps", "env", "pwd")
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs with a user `app` (1000:1000) who is also in group `extra` (2000)."""
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "home" / "app").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nstaff:x:50:\n")
    return root


def make_config(
    name: str = "web", command: list[str] | None = None, args: list[str] | None = None
) -> api_pb2.ContainerConfig:
    """A container config with a CONTAINER pid namespace, as kubelet sends for ordinary pods."""
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image="docker.io/library/busybox:latest"),
        command=command or [],
        args=args or [],
    )
    config.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
    return config


def make_sandbox(**overrides: object) -> S.SandboxInfo:
    values: dict[str, object] = {
        "id": "pod0123",
        "name": "mypod",
        "namespace": "default",
        "uid": "uid-1",
        "hostname": "mypod-host",
        "cgroup_parent": "/kubepods/burstable/poduid-1",
        "namespace_paths": {"network": "/run/netns/p", "ipc": "/run/ipcns/p", "uts": "/run/utsns/p"},
    }
    values.update(overrides)
    return S.SandboxInfo(**values)  # type: ignore[arg-type]


def build(
    config: api_pb2.ContainerConfig,
    rootfs: Path,
    sandbox: S.SandboxInfo | None = None,
    image: S.ImageConfig | None = None,
    **kwargs: object,
) -> dict:
    kwargs.setdefault("support", V1)
    kwargs.setdefault("oom_floor", -1000)
    return S.container_spec("ctr42", config, sandbox or make_sandbox(), image or S.ImageConfig(), rootfs, **kwargs)  # type: ignore[arg-type]


def mount_at(spec: dict, destination: str) -> dict:
    matches = [m for m in spec["mounts"] if m["destination"] == destination]
    assert len(matches) == 1, (destination, spec["mounts"])
    return matches[0]


def ns_map(spec: dict) -> dict[str, str | None]:
    return {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}


SHARED_MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/shared rw,relatime shared:7 - tmpfs tmpfs rw
41 27 0:51 / /mnt/slave rw,relatime master:9 - tmpfs tmpfs rw
42 40 0:52 / /mnt/shared/private rw,relatime - tmpfs tmpfs rw
"""


# --------------------------------------------------------------------------- process


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "expected"),
    [
        ([], [], ["/ep"], ["c1", "c2"], ["/ep", "c1", "c2"]),  # neither: image entrypoint + cmd
        (["/bin/x"], [], ["/ep"], ["c1"], ["/bin/x"]),  # command drops the image cmd too
        (["/bin/x"], ["a"], ["/ep"], ["c1"], ["/bin/x", "a"]),
        ([], ["a", "b"], ["/ep"], ["c1"], ["/ep", "a", "b"]),  # args replace cmd only
        ([], ["a"], [], ["c1"], ["a"]),
        ([], [], [], ["/bin/sh", "-c", "true"], ["/bin/sh", "-c", "true"]),
        ([], [], ["/ep"], [], ["/ep"]),
    ],
)
def test_args_merge(
    command: list[str], args: list[str], entrypoint: list[str], cmd: list[str], expected: list[str]
) -> None:
    config = make_config(command=command, args=args)
    assert S.process_args(config, S.ImageConfig(entrypoint=entrypoint, cmd=cmd)) == expected


def test_no_command_anywhere_names_the_container(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="'lonely'"):
        build(make_config("lonely"), rootfs)


def test_env_image_then_cri_overrides_by_name() -> None:
    config = make_config()
    config.envs.add(key="A", value=b"from-cri")
    config.envs.add(key="NEW", value=b"x=y")
    image = S.ImageConfig(env=["A=from-image", "B=kept"])
    env = S.build_env(config, image, "host1")
    assert "A=from-cri" in env and "A=from-image" not in env
    assert "B=kept" in env and "NEW=x=y" in env and "HOSTNAME=host1" in env
    assert env[0].startswith("PATH=/usr/local/sbin:")


def test_env_keeps_image_path_and_sets_term_for_tty() -> None:
    config = make_config()
    config.tty = True
    env = S.build_env(config, S.ImageConfig(env=["PATH=/opt/bin"]), "")
    assert [e for e in env if e.startswith("PATH=")] == ["PATH=/opt/bin"]
    assert "TERM=xterm" in env
    assert not any(e.startswith("HOSTNAME=") for e in env)


def test_cwd_cri_then_image_then_root() -> None:
    config = make_config()
    assert S.working_dir(config, S.ImageConfig()) == "/"
    assert S.working_dir(config, S.ImageConfig(working_dir="/srv/")) == "/srv"
    assert S.working_dir(config, S.ImageConfig(working_dir="rel")) == "/rel"
    config.working_dir = "/work"
    assert S.working_dir(config, S.ImageConfig(working_dir="/srv")) == "/work"


def test_image_config_from_json() -> None:
    doc = {
        "architecture": "amd64",
        "config": {
            "Entrypoint": ["/ep"],
            "Cmd": None,
            "Env": ["A=1"],
            "WorkingDir": "/w",
            "User": "app:staff",
            "StopSignal": "SIGQUIT",
            "ExposedPorts": {"80/tcp": {}},
            "Volumes": {"/data": {}},
            "Labels": {"l": "v"},
        },
    }
    image = S.ImageConfig.from_image_config(doc)
    assert image == S.ImageConfig(["/ep"], [], ["A=1"], "/w", "app:staff", "SIGQUIT", ["80/tcp"], ["/data"], {"l": "v"})
    assert S.ImageConfig.from_image_config({"Cmd": ["sh"]}).cmd == ["sh"]


def test_stop_signal() -> None:
    config = make_config()
    assert S.stop_signal(config, S.ImageConfig()) == "SIGTERM"
    assert S.stop_signal(config, S.ImageConfig(stop_signal="quit")) == "SIGQUIT"
    config.stop_signal = api_pb2.SIGNAL_SIGUSR1
    assert S.stop_signal(config, S.ImageConfig(stop_signal="SIGQUIT")) == "SIGUSR1"
    config.stop_signal = api_pb2.SIGNAL_SIGRTMINPLUS3
    assert S.stop_signal(config, S.ImageConfig()) == "SIGRTMIN+3"


# --------------------------------------------------------------------------- users


def user_of(rootfs: Path, image_user: str = "", **sc_fields: object) -> S.User:
    sc = api_pb2.LinuxContainerSecurityContext(**sc_fields)  # type: ignore[arg-type]
    return S.resolve_user(rootfs, sc, image_user, "web")


def test_user_by_username_gets_member_groups(rootfs: Path) -> None:
    assert user_of(rootfs, run_as_username="app") == S.User(1000, 1000, [1000, 2000])


def test_user_from_image_forms(rootfs: Path) -> None:
    assert user_of(rootfs) == S.User(0, 0, [0])
    assert user_of(rootfs, "app") == S.User(1000, 1000, [1000, 2000])
    assert user_of(rootfs, "app:staff") == S.User(1000, 50, [50])  # explicit group: no member groups
    assert user_of(rootfs, "1000:2000") == S.User(1000, 2000, [2000])
    assert user_of(rootfs, "1000") == S.User(1000, 1000, [1000, 2000])
    assert user_of(rootfs, "4242") == S.User(4242, 0, [0])  # unknown numeric uid: allowed, gid 0


def test_security_context_overrides_image_user(rootfs: Path) -> None:
    user = user_of(
        rootfs,
        "app",
        run_as_user=api_pb2.Int64Value(value=7),
        run_as_group=api_pb2.Int64Value(value=8),
        supplemental_groups=[9, 8],
    )
    assert user == S.User(7, 8, [8, 9])


def test_supplemental_groups_policy(rootfs: Path) -> None:
    assert user_of(rootfs, run_as_username="app", supplemental_groups=[300]).additional_gids == [1000, 2000, 300]
    strict = user_of(
        rootfs, run_as_username="app", supplemental_groups=[300], supplemental_groups_policy=api_pb2.Strict
    )
    assert strict.additional_gids == [1000, 300]


def test_unknown_user_or_group_is_invalid(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="'nobody-here'"):
        user_of(rootfs, run_as_username="nobody-here")
    with pytest.raises(InvalidArgument, match="'nogroup'"):
        user_of(rootfs, "app:nogroup")
    with pytest.raises(InvalidArgument, match="run_as_group"):
        user_of(rootfs, run_as_group=api_pb2.Int64Value(value=5))


def test_passwd_symlink_resolves_inside_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "real").mkdir(parents=True)
    (root / "etc" / "real" / "passwd").write_text("svc:x:77:88::/:/bin/sh\n")
    (root / "etc" / "passwd").symlink_to("/etc/real/passwd")  # absolute: must not reach the host's
    assert S.resolve_user(root, api_pb2.LinuxContainerSecurityContext(), "svc") == S.User(77, 88, [88])
    assert S.secure_join(root, "/../../etc/real/../passwd") == root / "etc" / "real" / "passwd"


# --------------------------------------------------------------------------- mounts


def test_default_mounts_and_pod_files(rootfs: Path) -> None:
    sandbox = make_sandbox(resolv_conf="/run/p/resolv.conf", hosts_file="/run/p/hosts", hostname_file="/run/p/hostname")
    spec = build(make_config(command=["sh"]), rootfs, sandbox)
    assert mount_at(spec, "/proc")["type"] == "proc"
    assert mount_at(spec, "/dev/shm") == {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    }
    assert "ro" in mount_at(spec, "/sys")["options"] and "ro" in mount_at(spec, "/sys/fs/cgroup")["options"]
    assert mount_at(spec, "/etc/resolv.conf")["source"] == "/run/p/resolv.conf"
    assert mount_at(spec, "/etc/hosts")["options"] == ["bind", "rw"]
    assert mount_at(spec, "/etc/hostname")["source"] == "/run/p/hostname"
    for dest in ("/dev/pts", "/dev/mqueue", "/dev"):
        mount_at(spec, dest)


def test_shm_from_pod_or_host(rootfs: Path) -> None:
    spec = build(make_config(command=["sh"]), rootfs, make_sandbox(shm_path="/run/pycrio/pod/shm"))
    assert mount_at(spec, "/dev/shm") == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": "/run/pycrio/pod/shm",
        "options": ["rbind", "rw"],
    }
    spec = build(make_config(command=["sh"]), rootfs, make_sandbox(host_ipc=True))
    assert mount_at(spec, "/dev/shm")["source"] == "/dev/shm"


def test_cri_mounts_bind_sorted_and_override_defaults(rootfs: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    config = make_config(command=["sh"])
    config.mounts.add(container_path="/data/deep/er", host_path=str(tmp_path / "a"))
    config.mounts.add(container_path="/data", host_path=str(tmp_path / "link"), readonly=True, selinux_relabel=True)
    config.mounts.add(container_path="/etc/hosts", host_path=str(tmp_path / "a"))
    config.mounts.add(container_path="/dev/shm", host_path=str(tmp_path / "a"), mount_options=["noexec"])
    spec = build(config, rootfs, make_sandbox(hosts_file="/run/p/hosts"))
    data = mount_at(spec, "/data")
    assert data == {
        "destination": "/data",
        "type": "bind",
        "source": str(tmp_path / "a"),
        "options": ["rbind", "rprivate", "ro"],
    }
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests.index("/data") < dests.index("/data/deep/er")
    assert mount_at(spec, "/etc/hosts")["source"] == str(tmp_path / "a")  # CRI beats the pod's file
    assert mount_at(spec, "/dev/shm")["options"] == ["rbind", "rprivate", "rw", "noexec"]
    assert "rootfsPropagation" not in spec["linux"]


def test_cri_dev_mount_replaces_default_dev_subtree(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    config.mounts.add(container_path="/dev", host_path="/dev")
    spec = build(config, rootfs)
    assert not [m for m in spec["mounts"] if m["destination"].startswith("/dev/")]
    assert mount_at(spec, "/dev")["type"] == "bind"


def test_missing_host_path_is_invalid(rootfs: Path, tmp_path: Path) -> None:
    config = make_config("vol", command=["sh"])
    config.mounts.add(container_path="/data", host_path=str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument, match=f"'vol'.*{tmp_path / 'missing'}.*does not exist"):
        build(config, rootfs)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("container_path", "relative", InvalidArgument),
        ("host_path", "", InvalidArgument),
        ("recursive_read_only", True, InvalidArgument),
    ],
)
def test_bad_mounts(rootfs: Path, field: str, value: object, error: type[Exception]) -> None:
    config = make_config(command=["sh"])
    mount = config.mounts.add(container_path="/data", host_path="/tmp", readonly=True)
    setattr(mount, field, value)
    with pytest.raises(error):
        build(config, rootfs)


def test_image_volume_mount_needs_readonly_and_its_mounted_source(rootfs: Path, tmp_path: Path) -> None:
    config = make_config(command=["sh"])
    mount = config.mounts.add(container_path="/data", image=api_pb2.ImageSpec(image="busybox"))
    with pytest.raises(InvalidArgument, match="readonly must be true"):
        build(config, rootfs)
    mount.readonly = True
    with pytest.raises(Unimplemented, match="not mounted"):  # the caller mounts the image first
        build(config, rootfs)
    spec = build(config, rootfs, image_sources={0: str(tmp_path)})
    assert mount_at(spec, "/data") == {
        "destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind", "rprivate", "ro"]
    }


def test_propagation_tags_from_mountinfo() -> None:
    assert S.mount_propagation_tags("/mnt/shared/sub", SHARED_MOUNTINFO) == {"shared"}
    assert S.mount_propagation_tags("/mnt/shared/private/x", SHARED_MOUNTINFO) == set()
    assert S.mount_propagation_tags("/mnt/slave", SHARED_MOUNTINFO) == {"master"}
    assert S.mount_propagation_tags("/mnt/sharedother", SHARED_MOUNTINFO) == set()
    mounts, root = S.cri_mounts(
        [api_pb2.Mount(container_path="/x", host_path="/", propagation=api_pb2.PROPAGATION_PRIVATE)],
        "web",
        SHARED_MOUNTINFO,
    )
    assert root == "" and "rprivate" in mounts[0]["options"]


def test_propagation_needs_shared_or_slave_host_mount(tmp_path: Path) -> None:
    shared, slave = tmp_path / "s", tmp_path / "m"
    shared.mkdir()
    slave.mkdir()
    info = (
        "1 0 0:1 / / rw - ext4 x rw\n"
        f"2 1 0:2 / {shared} rw shared:1 - tmpfs t rw\n"
        f"3 1 0:3 / {slave} rw master:1 - tmpfs t rw\n"
    )
    bidir = api_pb2.Mount(container_path="/b", host_path=str(shared), propagation=api_pb2.PROPAGATION_BIDIRECTIONAL)
    h2c = api_pb2.Mount(container_path="/h", host_path=str(slave), propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)
    mounts, root = S.cri_mounts([h2c, bidir], "web", info)
    assert root == "rshared"
    assert "rslave" in mounts[0]["options"] and "rshared" in mounts[1]["options"]
    assert S.cri_mounts([h2c], "web", info)[1] == "rslave"
    with pytest.raises(InvalidArgument, match="shared mount"):
        S.cri_mounts(
            [api_pb2.Mount(container_path="/b", host_path=str(slave), propagation=api_pb2.PROPAGATION_BIDIRECTIONAL)],
            "web",
            info,
        )
    with pytest.raises(InvalidArgument, match="shared or slave"):
        S.cri_mounts(
            [
                api_pb2.Mount(
                    container_path="/h", host_path=str(tmp_path), propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER
                )
            ],
            "web",
            info,
        )


# --------------------------------------------------------------------------- devices


def test_cri_devices(rootfs: Path, tmp_path: Path) -> None:
    config = make_config(command=["sh"])
    config.devices.add(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")
    spec = build(config, rootfs)
    [device] = spec["linux"]["devices"]
    assert device["path"] == "/dev/mynull" and device["type"] == "c" and (device["major"], device["minor"]) == (1, 3)
    rules = spec["linux"]["resources"]["devices"]
    assert rules == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
    ]


def test_device_errors(rootfs: Path, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    for host, permissions, message in (
        (str(tmp_path / "nope"), "", "does not exist"),
        (str(tmp_path / "plain"), "", "not a device"),
        ("/dev/null", "rwx", "permissions"),
    ):
        config = make_config(command=["sh"])
        config.devices.add(container_path="/dev/d", host_path=host, permissions=permissions)
        with pytest.raises(InvalidArgument, match=message):
            build(config, rootfs)


def test_device_directory_brings_its_nodes(tmp_path: Path) -> None:
    nodes, rules = S.cri_devices([api_pb2.Device(container_path="/dev/cdev", host_path="/dev/", permissions="r")])
    paths = {node["path"] for node in nodes}
    assert "/dev/cdev/null" in paths and len(nodes) == len(rules)


# --------------------------------------------------------------------------- resources


def resources_config(**fields: object) -> api_pb2.ContainerConfig:
    config = make_config(command=["sh"])
    config.linux.resources.CopyFrom(api_pb2.LinuxContainerResources(**fields))  # type: ignore[arg-type]
    return config


def test_resources_map_to_oci(rootfs: Path) -> None:
    config = resources_config(
        cpu_shares=512,
        cpu_quota=50000,
        cpu_period=100000,
        cpuset_cpus="0-1",
        cpuset_mems="0",
        memory_limit_in_bytes=64 * MiB,
        oom_score_adj=500,
        hugepage_limits=[api_pb2.HugepageLimit(page_size="2MB", limit=4 * MiB)],
    )
    spec = build(config, rootfs)
    resources = spec["linux"]["resources"]
    assert resources["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"}
    assert resources["memory"] == {"limit": 64 * MiB, "swap": 64 * MiB}  # no swapping unless asked
    assert resources["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 * MiB}]
    assert spec["process"]["oomScoreAdj"] == 500
    assert spec["linux"]["cgroupsPath"] == "/kubepods/burstable/poduid-1/pycrio-ctr42"


def test_memory_swap_rules(rootfs: Path) -> None:
    spec = build(resources_config(memory_limit_in_bytes=64 * MiB, memory_swap_limit_in_bytes=128 * MiB), rootfs)
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 * MiB, "swap": 128 * MiB}
    spec = build(resources_config(memory_limit_in_bytes=64 * MiB, memory_swap_limit_in_bytes=-1), rootfs)
    assert spec["linux"]["resources"]["memory"]["swap"] == -1
    spec = build(resources_config(memory_limit_in_bytes=64 * MiB), rootfs, support=NO_SWAP)
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 * MiB}
    with pytest.raises(InvalidArgument, match="cannot be lower"):
        build(resources_config(memory_limit_in_bytes=64 * MiB, memory_swap_limit_in_bytes=MiB), rootfs)


def test_unified_and_hugepages_follow_host_support(rootfs: Path) -> None:
    config = resources_config(
        unified={"memory.high": "1000000"}, hugepage_limits=[api_pb2.HugepageLimit(page_size="2MB", limit=MiB)]
    )
    warnings: list[str] = []
    spec = build(config, rootfs, support=HYBRID_NO_HUGETLB, warnings=warnings)
    assert "unified" not in spec["linux"]["resources"] and "hugepageLimits" not in spec["linux"]["resources"]
    assert len(warnings) == 2
    spec = build(config, rootfs, support=V2)
    assert spec["linux"]["resources"]["unified"] == {"memory.high": "1000000"}
    assert {"type": "cgroup"} in spec["linux"]["namespaces"]


def test_pids_limit_and_oom_floor(rootfs: Path) -> None:
    warnings: list[str] = []
    spec = build(resources_config(oom_score_adj=-997), rootfs, pids_limit=1024, oom_floor=0, warnings=warnings)
    assert spec["linux"]["resources"]["pids"] == {"limit": 1024}
    assert spec["process"]["oomScoreAdj"] == 0 and "oom_score_adj" in warnings[0]


def test_cgroups_path() -> None:
    assert cgroups.cgroups_path("", "pod1", None) == "/pycrio/pod1"
    assert cgroups.cgroups_path("", "pod1", "c1") == "/pycrio/pod1/pycrio-c1"
    assert cgroups.cgroups_path("kubepods/besteffort/podU/", "pod1", "c1") == "/kubepods/besteffort/podU/pycrio-c1"
    with pytest.raises(ValueError):
        cgroups.cgroups_path("/kubepods/../../etc", "p", None)


# --------------------------------------------------------------------------- namespaces


def test_namespaces_join_the_pod(rootfs: Path) -> None:
    spec = build(make_config(command=["sh"]), rootfs)
    assert ns_map(spec) == {
        "mount": None,
        "network": "/run/netns/p",
        "uts": "/run/utsns/p",
        "ipc": "/run/ipcns/p",
        "pid": None,
    }
    assert spec["hostname"] == "mypod-host"


def test_empty_namespace_paths_mean_new_namespaces(rootfs: Path) -> None:
    spec = build(make_config(command=["sh"]), rootfs, make_sandbox(namespace_paths={}))
    assert ns_map(spec) == {"mount": None, "network": None, "uts": None, "ipc": None, "pid": None}


def test_host_namespaces(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    config.linux.security_context.namespace_options.pid = api_pb2.NODE
    spec = build(config, rootfs, make_sandbox(host_network=True, host_ipc=True, host_pid=True))
    assert ns_map(spec) == {"mount": None}
    assert "hostname" not in spec


@pytest.mark.parametrize(
    ("mode", "sandbox_pid", "target", "expected"),
    [
        (api_pb2.POD, "/proc/10/ns/pid", None, "/proc/10/ns/pid"),
        (api_pb2.TARGET, None, "/proc/20/ns/pid", "/proc/20/ns/pid"),
    ],
)
def test_pid_namespace_modes(
    rootfs: Path, mode: api_pb2.NamespaceMode, sandbox_pid: str | None, target: str | None, expected: str
) -> None:
    config = make_config(command=["sh"])
    config.linux.security_context.namespace_options.pid = mode
    spec = build(config, rootfs, make_sandbox(pid_ns_path=sandbox_pid), target_pid_ns_path=target)
    assert ns_map(spec)["pid"] == expected


def test_pid_namespace_errors(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    config.linux.security_context.namespace_options.pid = api_pb2.POD
    with pytest.raises(InvalidArgument, match="pod PID namespace"):
        build(config, rootfs)
    config.linux.security_context.namespace_options.pid = api_pb2.TARGET
    config.linux.security_context.namespace_options.target_id = "other"
    with pytest.raises(InvalidArgument, match="'other'"):
        build(config, rootfs)


def test_user_namespaces_unimplemented(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    userns = config.linux.security_context.namespace_options.userns_options
    userns.mode = api_pb2.POD
    userns.uids.add(host_id=100000, container_id=0, length=65536)
    with pytest.raises(Unimplemented):
        build(config, rootfs)


def test_sysctls(rootfs: Path) -> None:
    sandbox = make_sandbox(sysctls={"net/ipv4/conf/eth0.100/forwarding": "1", "kernel.shm_rmid_forced": "1"})
    spec = build(make_config(command=["sh"]), rootfs, sandbox)
    assert spec["linux"]["sysctl"] == {"net.ipv4.conf.eth0/100.forwarding": "1", "kernel.shm_rmid_forced": "1"}
    with pytest.raises(InvalidArgument, match="network"):
        build(
            make_config(command=["sh"]), rootfs, make_sandbox(host_network=True, sysctls={"net.ipv4.ip_forward": "1"})
        )
    with pytest.raises(InvalidArgument, match="not namespaced"):
        build(make_config(command=["sh"]), rootfs, make_sandbox(sysctls={"vm.swappiness": "1"}))


# --------------------------------------------------------------------------- security


def test_default_capabilities_are_cri_os(rootfs: Path) -> None:
    caps = build(make_config(command=["sh"]), rootfs)["process"]["capabilities"]
    assert set(caps["bounding"]) == set(S.DEFAULT_CAPABILITIES) == set(caps["effective"]) == set(caps["permitted"])
    assert "CAP_NET_RAW" not in caps["bounding"] and "inheritable" not in caps


def test_capability_add_drop() -> None:
    def sets(add: list[str] = [], drop: list[str] = [], ambient: list[str] = []) -> dict:  # noqa: B006
        return S.capability_sets(
            api_pb2.Capability(add_capabilities=add, drop_capabilities=drop, add_ambient_capabilities=ambient),
            False,
            S.ALL_CAPABILITIES,
        )

    assert sets(drop=["ALL"])["bounding"] == []
    assert sets(drop=["ALL"], add=["net_raw"])["bounding"] == ["CAP_NET_RAW"]
    all_but_chown = sets(add=["ALL"], drop=["CAP_CHOWN"])["bounding"]
    assert len(all_but_chown) == len(S.ALL_CAPABILITIES) - 1 and "CAP_CHOWN" not in all_but_chown
    assert "CAP_CHOWN" not in sets(drop=["chown"])["bounding"]
    assert "CAP_SYS_ADMIN" in sets(add=["SYS_ADMIN"])["effective"]
    ambient = sets(ambient=["NET_BIND_SERVICE"], drop=["ALL"])
    assert ambient["ambient"] == ambient["inheritable"] == ambient["bounding"] == ["CAP_NET_BIND_SERVICE"]
    with pytest.raises(InvalidArgument, match="NOT_A_CAP"):
        sets(add=["NOT_A_CAP"])
    with pytest.raises(InvalidArgument):
        S.capability_sets(api_pb2.Capability(add_capabilities=["SYS_RESOURCE"]), False, S.DEFAULT_CAPABILITIES)
    restricted = S.capability_sets(api_pb2.Capability(add_capabilities=["ALL"]), False, S.DEFAULT_CAPABILITIES)
    assert restricted["bounding"] == [c for c in S.ALL_CAPABILITIES if c in S.DEFAULT_CAPABILITIES]
    assert S.capability_sets(None, True, ["CAP_KILL"])["bounding"] == ["CAP_KILL"]


def test_privileged(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    config.linux.security_context.privileged = True
    config.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    with pytest.raises(InvalidArgument, match="not privileged"):
        build(config, rootfs)
    spec = build(config, rootfs, make_sandbox(privileged=True))
    linux = spec["linux"]
    assert spec["process"]["capabilities"]["bounding"] == list(S.available_capabilities())
    assert "seccomp" not in linux and linux["maskedPaths"] == [] and linux["readonlyPaths"] == []
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert any(d["path"] == "/dev/null" for d in linux["devices"])
    assert "rw" in mount_at(spec, "/sys")["options"] and "rw" in mount_at(spec, "/sys/fs/cgroup")["options"]


def test_masked_and_readonly_paths(rootfs: Path) -> None:
    spec = build(make_config(command=["sh"]), rootfs)
    assert spec["linux"]["maskedPaths"] == list(S.DEFAULT_MASKED_PATHS)
    assert spec["linux"]["readonlyPaths"] == list(S.DEFAULT_READONLY_PATHS)
    config = make_config(command=["sh"])
    config.linux.security_context.masked_paths.append("/proc/extra")
    config.linux.security_context.readonly_paths.append("/proc/ro")
    spec = build(config, rootfs)
    assert spec["linux"]["maskedPaths"][0] == "/proc/extra" and "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert spec["linux"]["readonlyPaths"] == ["/proc/ro"]


def test_readonly_rootfs_and_no_new_privs(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    config.linux.security_context.readonly_rootfs = True
    config.linux.security_context.no_new_privs = True
    spec = build(config, rootfs, make_sandbox(resolv_conf="/r"))
    assert spec["root"] == {"path": str(rootfs), "readonly": True}
    assert spec["process"]["noNewPrivileges"] is True
    assert "ro" in mount_at(spec, "/etc/resolv.conf")["options"]


def test_seccomp_modes(rootfs: Path, tmp_path: Path) -> None:
    def seccomp(**fields: object) -> dict | None:
        config = make_config(command=["sh"])
        sc = config.linux.security_context
        for key, value in fields.items():
            if key == "profile":
                sc.seccomp.CopyFrom(value)  # type: ignore[arg-type]
            else:
                setattr(sc, key, value)
        return build(config, rootfs)["linux"].get("seccomp")

    default = seccomp(profile=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault))
    assert default is not None and (default["defaultAction"], default["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    allowed = {name for rule in default["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    assert "read" in allowed and not {"mount", "keyctl", "add_key", "unshare"} & allowed
    assert seccomp(seccomp_profile_path="runtime/default") == default
    assert seccomp() is None  # nothing asked: unconfined, as the CRI defines it
    assert seccomp(profile=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined)) is None
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
                "syscalls": [
                    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                    {"name": "mount", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                ],
            }
        )
    )
    local = seccomp(
        profile=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref=str(profile))
    )
    assert local is not None and local["defaultAction"] == "SCMP_ACT_ERRNO"
    assert local["syscalls"] == [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]  # no SYS_ADMIN: no mount
    assert seccomp(seccomp_profile_path=f"localhost/{profile}") == local
    with pytest.raises(InvalidArgument, match="does not exist"):
        seccomp(
            profile=api_pb2.SecurityProfile(
                profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref=str(tmp_path / "missing.json")
            )
        )


def test_runtime_default_follows_capabilities() -> None:
    def allowed(profile: dict) -> set[str]:
        return {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
                for n in rule["names"]}

    plain = seccomp.runtime_default(S.DEFAULT_CAPABILITIES)
    admin = seccomp.runtime_default([*S.DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"])
    assert not {"mount", "unshare", "setns", "kcmp", "bpf"} & allowed(plain)
    assert {"mount", "unshare", "setns", "kcmp", "bpf", "clone", "clone3"} <= allowed(admin)
    assert [r["args"] for r in plain["syscalls"] if r["names"] == ["clone"]] == [
        [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    ]
    assert any(r["names"] == ["clone3"] and r["errnoRet"] == 38 for r in plain["syscalls"])
    assert not [r for r in admin["syscalls"] if r["names"] in (["clone"], ["clone3"])]  # both in the cap rule


def test_apparmor_is_ignored_with_a_warning(rootfs: Path) -> None:
    config = make_config(command=["sh"])
    config.linux.security_context.apparmor.profile_type = api_pb2.SecurityProfile.Localhost
    config.linux.security_context.apparmor.localhost_ref = "k8s-nginx"
    warnings: list[str] = []
    spec = build(config, rootfs, warnings=warnings)
    assert "apparmorProfile" not in spec["process"] and "k8s-nginx" in warnings[0]


def test_annotations(rootfs: Path) -> None:
    config = make_config("app", command=["sh"])
    config.annotations["io.kubernetes.container.hash"] = "abc"
    spec = build(config, rootfs, image=S.ImageConfig(stop_signal="SIGQUIT"))
    annotations = spec["annotations"]
    assert annotations["io.kubernetes.container.hash"] == "abc"
    assert annotations["io.kubernetes.container.name"] == "app"
    assert annotations["io.kubernetes.pod.name"] == "mypod" and annotations["io.kubernetes.pod.uid"] == "uid-1"
    assert annotations["io.kubernetes.cri.container-type"] == "container"
    assert annotations["org.opencontainers.image.stopSignal"] == "SIGQUIT"


def test_pod_config_fills_sysctls_and_privilege(rootfs: Path) -> None:
    pod = api_pb2.PodSandboxConfig()
    pod.linux.security_context.privileged = True
    pod.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    config = make_config(command=["sh"])
    config.linux.security_context.privileged = True
    spec = S.container_spec("c", config, make_sandbox(), S.ImageConfig(), rootfs, pod, support=V1, oom_floor=-1000)
    assert spec["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"} and "seccomp" not in spec["linux"]


def test_sandbox_info_from_config() -> None:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="p", namespace="ns", uid="u"), hostname="h"
    )
    config.linux.cgroup_parent = "/kubepods/podu"
    config.linux.security_context.namespace_options.network = api_pb2.NODE
    config.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    info = S.SandboxInfo.from_config("sb1", config, shm_path="/run/shm", namespace_paths={"ipc": "/x"})
    assert (info.id, info.name, info.namespace, info.uid, info.hostname) == ("sb1", "p", "ns", "u", "h")
    assert info.host_network and not info.host_ipc and info.shm_path == "/run/shm"
    assert info.sysctls == {"kernel.shm_rmid_forced": "1"} and info.cgroup_parent == "/kubepods/podu"


def test_infra_spec_and_rootfs(tmp_path: Path) -> None:
    root = S.infra_rootfs(tmp_path / "infra")
    assert os.access(root / "catatonit", os.X_OK)
    assert S.infra_rootfs(tmp_path / "infra") == root  # idempotent
    spec = S.sandbox_infra_spec(make_sandbox(), root, support=V1, oom_floor=-1000)
    assert spec["process"]["args"] == ["/catatonit", "-P"] and spec["root"]["readonly"] is True
    assert spec["process"]["oomScoreAdj"] == -998
    assert ns_map(spec) == {
        "mount": None,
        "network": "/run/netns/p",
        "uts": "/run/utsns/p",
        "ipc": "/run/ipcns/p",
        "pid": None,
    }
    assert spec["linux"]["cgroupsPath"] == "/kubepods/burstable/poduid-1/pycrio-pod0123"
    assert spec["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"


# --------------------------------------------------------------------------- cgroups helpers


def test_cgroup_mode_matches_mounts() -> None:
    mode = cgroups.cgroup_mode()
    mounts = Path("/proc/self/mounts").read_text()
    if " /sys/fs/cgroup cgroup2 " in mounts:
        assert mode == "v2"
    elif " /sys/fs/cgroup/unified cgroup2 " in mounts:
        assert mode == "hybrid"
    else:
        assert mode == "v1"


def test_v1_mounts_parsing() -> None:
    info = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    mounts = cgroups._v1_mounts(info)
    assert mounts == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "name=systemd": Path("/sys/fs/cgroup/systemd"),
    }


def test_v2_stats_parsing(tmp_path: Path) -> None:
    files = {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\n",
        "memory.current": "10000\n",
        "memory.stat": "anon 4000\nfile 6000\ninactive_file 2500\n",
        "memory.events": "low 0\noom 1\noom_kill 2\n",
        "pids.current": "3\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert cgroups._read_v2(tmp_path) == cgroups.CgroupStats(1_500_000, 10000, 7500, 4000, 2, 3)
    assert cgroups._read_v2(tmp_path / "gone") is None


def test_read_stats_of_missing_cgroup_is_none() -> None:
    assert cgroups.read_stats(f"/pycrio-test-missing-{uuid.uuid4().hex[:8]}") is None
    cgroups.remove_cgroup(f"/pycrio-test-missing-{uuid.uuid4().hex[:8]}")  # idempotent on nothing
    with pytest.raises(ValueError):
        cgroups.remove_cgroup("/")


# --------------------------------------------------------------------------- real runs under runc

needs_runc = pytest.mark.skipif(os.geteuid() != 0 or not os.access(RUNC, os.X_OK), reason="needs root and runc")


class Runc:
    """Bundles and state under a temp dir, every container under one test cgroup parent."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.parent = f"/pycrio-test-{uuid.uuid4().hex[:10]}"
        self.ids: list[str] = []

    def sandbox(self, **overrides: object) -> S.SandboxInfo:
        values: dict[str, object] = {
            "id": "pod" + uuid.uuid4().hex[:6],
            "name": "p",
            "namespace": "default",
            "uid": "u1",
            "hostname": "testpod",
            "cgroup_parent": self.parent,
            "namespace_paths": {},
        }
        values.update(overrides)
        return S.SandboxInfo(**values)  # type: ignore[arg-type]

    def bundle(self, spec: dict, name: str) -> Path:
        bundle = self.base / name
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(spec))
        self.ids.append(name)
        return bundle

    def run(self, spec: dict, name: str) -> subprocess.CompletedProcess[str]:
        """Foreground `runc run`, output captured."""
        bundle = self.bundle(spec, name)
        return subprocess.run(
            [RUNC, "--root", str(self.state), "run", "--bundle", str(bundle), name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, spec: dict, name: str) -> int:
        """Detached `runc run -d`; returns the container's host pid."""
        bundle = self.bundle(spec, name)
        with open(bundle / "runc.log", "w+") as errors:  # a file: the container keeps what it inherits open
            started = subprocess.run(
                [RUNC, "--root", str(self.state), "run", "-d", "--bundle", str(bundle), name],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                timeout=60,
            )
            errors.seek(0)
            assert started.returncode == 0, errors.read()
        state = subprocess.run(
            [RUNC, "--root", str(self.state), "state", name], capture_output=True, check=True, text=True
        )
        return int(json.loads(state.stdout)["pid"])

    def delete(self, name: str) -> None:
        subprocess.run([RUNC, "--root", str(self.state), "delete", "--force", name], capture_output=True, timeout=60)

    def cleanup(self) -> None:
        for name in reversed(self.ids):
            self.delete(name)
        cgroups.remove_cgroup(self.parent)


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[Runc]:
    runner = Runc(tmp_path)
    yield runner
    runner.cleanup()
    assert not glob.glob(f"/sys/fs/cgroup/*{runner.parent}*") and not glob.glob(f"/sys/fs/cgroup/*/*/{runner.parent}*")
    listing = subprocess.run([RUNC, "--root", str(runner.state), "list", "-q"], capture_output=True, text=True)
    assert listing.stdout.strip() == ""


def run_shell(
    runc: Runc, rootfs: Path, script: str, name: str, sandbox: S.SandboxInfo | None = None, **sc_fields: object
) -> subprocess.CompletedProcess[str]:
    config = make_config(name, command=["sh", "-c", script])
    for key, value in sc_fields.items():
        setattr(config.linux.security_context, key, value)
    spec = S.container_spec(name, config, sandbox or runc.sandbox(), S.ImageConfig(), rootfs)
    return runc.run(spec, name)


@needs_runc
def test_run_as_username_and_env(runc: Runc, rootfs: Path) -> None:
    config = make_config("whoami", command=["sh", "-c", 'id; echo "GREETING=$GREETING"; hostname; pwd'])
    config.linux.security_context.run_as_username = "app"
    config.envs.add(key="GREETING", value=b"hello")
    config.working_dir = "/home/app"
    spec = S.container_spec("whoami", config, runc.sandbox(), S.ImageConfig(), rootfs)
    result = runc.run(spec, "whoami")
    assert result.returncode == 0, result.stderr
    assert "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)" in result.stdout
    assert "GREETING=hello" in result.stdout and "testpod" in result.stdout and "/home/app" in result.stdout


@needs_runc
def test_memory_limit_reaches_the_cgroup(runc: Runc, rootfs: Path) -> None:
    config = make_config("limited", command=["sleep", "30"])
    config.linux.resources.memory_limit_in_bytes = 48 * MiB
    config.linux.resources.cpu_shares = 256
    spec = S.container_spec("limited", config, runc.sandbox(), S.ImageConfig(), rootfs)
    path = spec["linux"]["cgroupsPath"]
    assert path.startswith(runc.parent + "/")
    runc.start(spec, "limited")
    support = cgroups.detect_support()
    if support.mode == "v2":
        assert int(Path(f"/sys/fs/cgroup{path}/memory.max").read_text()) == 48 * MiB
    else:
        assert int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text()) == 48 * MiB
        assert int(Path(f"/sys/fs/cgroup/cpu{path}/cpu.shares").read_text()) == 256
    stats = cgroups.read_stats(path)
    assert stats is not None and stats.memory_usage_bytes > 0 and stats.cpu_usage_ns > 0
    assert stats.pids == (1 if support.pids else 0)
    runc.delete("limited")
    cgroups.remove_cgroup(path)
    assert cgroups.read_stats(path) is None
    # And from inside: the container sees its own limit through the cgroup mount.
    config.command[:] = [
        "cat",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes" if support.mode != "v2" else "/sys/fs/cgroup/memory.max",
    ]
    result = runc.run(S.container_spec("limited2", config, runc.sandbox(), S.ImageConfig(), rootfs), "limited2")
    assert result.stdout.strip() == str(48 * MiB), result.stderr


@needs_runc
def test_readonly_rootfs_refuses_writes(runc: Runc, rootfs: Path) -> None:
    result = run_shell(runc, rootfs, "touch /x", "ro", readonly_rootfs=True)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    result = run_shell(runc, rootfs, "touch /tmp-ok && rm /tmp-ok", "rw")
    assert result.returncode == 0, result.stderr


@needs_runc
def test_dropped_chown_capability(runc: Runc, rootfs: Path, tmp_path: Path) -> None:
    config = make_config("nochown", command=["sh", "-c", "chown 1000 /home/app && echo chowned"])
    config.linux.security_context.capabilities.drop_capabilities.append("CHOWN")
    result = runc.run(S.container_spec("nochown", config, runc.sandbox(), S.ImageConfig(), rootfs), "nochown")
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    config.linux.security_context.capabilities.ClearField("drop_capabilities")
    result = runc.run(S.container_spec("chown", config, runc.sandbox(), S.ImageConfig(), rootfs), "chown")
    assert result.returncode == 0 and "chowned" in result.stdout, result.stderr


@needs_runc
def test_seccomp_runtime_default(runc: Runc, rootfs: Path) -> None:
    default = api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault)
    result = run_shell(runc, rootfs, "echo normal; unshare -U true && echo userns-made", "sec")  # unconfined
    assert "normal" in result.stdout
    unconfined_made = "userns-made" in result.stdout
    config = make_config(
        "secd", command=["sh", "-c", "echo normal; ls / >/dev/null; unshare -U true && echo userns-made"]
    )
    config.linux.security_context.seccomp.CopyFrom(default)
    result = runc.run(S.container_spec("secd", config, runc.sandbox(), S.ImageConfig(), rootfs), "secd")
    assert "normal" in result.stdout, result.stderr
    assert "userns-made" not in result.stdout and "Operation not permitted" in result.stderr
    if not unconfined_made:
        pytest.skip("this kernel refuses user namespaces anyway: the seccomp difference is not visible")


@needs_runc
def test_privileged_sees_host_devices(runc: Runc, rootfs: Path) -> None:
    sandbox = runc.sandbox(privileged=True)
    result = run_shell(
        runc, rootfs, "ls -l /dev/kmsg && cat /proc/self/status | grep CapEff", "priv", sandbox, privileged=True
    )
    assert result.returncode == 0, result.stderr
    assert "/dev/kmsg" in result.stdout and "000001ff" in result.stdout
    result = run_shell(runc, rootfs, "ls /dev/kmsg", "unpriv")
    assert result.returncode != 0


@needs_runc
def test_infra_shares_its_pid_namespace(runc: Runc, rootfs: Path, tmp_path: Path) -> None:
    sandbox = runc.sandbox()
    infra_pid = runc.start(S.sandbox_infra_spec(sandbox, S.infra_rootfs(tmp_path / "infra-root")), "infra")
    sandbox.pid_ns_path = f"/proc/{infra_pid}/ns/pid"
    sandbox.namespace_paths = {
        kind: f"/proc/{infra_pid}/ns/{short}" for kind, short in (("network", "net"), ("ipc", "ipc"), ("uts", "uts"))
    }
    config = make_config("member", command=["sh", "-c", "cat /proc/1/cmdline; echo; hostname"])
    config.linux.security_context.namespace_options.pid = api_pb2.POD
    result = runc.run(S.container_spec("member", config, sandbox, S.ImageConfig(), rootfs), "member")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["/catatonit\x00-P\x00", "testpod"]
    stats = cgroups.read_stats(cgroups.cgroups_path(sandbox.cgroup_parent, sandbox.id, sandbox.id))
    assert stats is not None and stats.memory_usage_bytes > 0


def test_no_test_cgroups_left() -> None:
    """Last in the module: the runc tests above removed every cgroup they made."""
    assert not glob.glob("/sys/fs/cgroup/*/pycrio-test-*") and not glob.glob("/sys/fs/cgroup/pycrio-test-*")

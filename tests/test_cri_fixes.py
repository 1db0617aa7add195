"""critest expectations on a real daemon with real runc/conmon pods: ExecSync timeouts leave no
process behind, and stop/remove of unknown ids succeed (CRI idempotence)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

FX_BRIDGE = "pycriofx8"
FX_SUBNET = "10.132.0.0/24"


def fx_conflist(directory: Path) -> Path:
    return bridge_network(directory, "pycrio-fx", FX_BRIDGE, FX_SUBNET, filename="10-fx.conflist")


@pytest.fixture(scope="module", autouse=True)
def fx_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", FX_BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("fx/busybox", "1")


@pytest.fixture
def fx_daemon(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator[PycrioDaemon]:
    netdir = fx_conflist(tmp_path / "net.d")
    parent = f"/pycrio-fx-{tmp_path.name}"
    daemon = make_daemon(
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{parent}"\n'
        ),
    )
    daemon.crictl("pull", busybox.reference)
    yield daemon
    for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
        daemon.crictl("rmp", "-f", pod["id"], check=False)
    procs = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert str(daemon.base) not in procs, procs
    assert [p for p in Path(f"/sys/fs/cgroup/memory{parent}").glob("*") if p.is_dir()] == [], "pod cgroups left"
    cgroups.remove_cgroup(parent)


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def run_pod(
    d: PycrioDaemon, tmp_path: Path, image: str, name: str, command: list[str], pid_mode: int = 0,
    resources: dict | None = None,
) -> tuple[str, str]:
    """runp + create + start through crictl; returns (pod id, container id). pid_mode: 0 POD, 1 CONTAINER."""
    podfile = write_json(
        tmp_path / f"pod-{name}.json",
        {"metadata": {"name": name, "namespace": "fx", "uid": f"uid-{name}", "attempt": 0},
         "log_directory": str(tmp_path / "logs" / name)},
    )
    ctrfile = write_json(
        tmp_path / f"ctr-{name}.json",
        {"metadata": {"name": name}, "image": {"image": image}, "command": command, "log_path": f"{name}.log",
         "linux": {"security_context": {"namespace_options": {"pid": pid_mode}}, "resources": resources or {}}},
    )
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    cid = d.crictl("create", pod_id, str(ctrfile), str(podfile)).stdout.strip()
    d.crictl("start", cid)
    return pod_id, cid


def host_processes_in_pid_ns(ns: str) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every host process in the pid namespace `ns` (a readlink of ns/pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != ns:
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        found.append((int(entry.name), comm, stat.rsplit(")", 1)[1].split()[0]))
    return found


def container_process_names(rt, cid: str) -> list[str]:
    """The comm of every process the container sees (zombies included), as `pgrep` would match."""
    check = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "cat /proc/[0-9]*/comm"], timeout=10),
                        timeout=30)
    assert check.exit_code == 0, check
    return check.stdout.decode().split()


@pytest.mark.parametrize("pid_mode", [0, 1], ids=["pod-pid-ns", "container-pid-ns"])
def test_exec_sync_timeout_kills_and_reaps_the_command(
    fx_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path, pid_mode: int
) -> None:
    d = fx_daemon
    # busybox top, as critest runs it. With its own PID namespace it is PID 1 and never reaps, so a
    # zombie orphaned there would stay for good; in the pod's, the infra process reaps (late).
    pod_id, cid = run_pod(d, tmp_path, busybox.reference, "exectimeout", ["/bin/busybox", "top"], pid_mode)
    init_pid = int(json.loads(d.crictl("inspect", cid).stdout)["info"]["pid"])
    ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    with d.channel() as ch:
        rt = d.runtime(ch)
        for attempt in range(3):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["sleep", "4321"], timeout=1), timeout=30)
            elapsed = time.monotonic() - started
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert 1.0 <= elapsed < 2.5, f"attempt {attempt}: answered after {elapsed:.2f}s"
            # right after the answer: nothing named sleep in the container (critest's `pgrep sleep`)...
            names = container_process_names(rt, cid)
            assert "sleep" not in names, f"attempt {attempt}: {names}"
            # ...and on the host no process (zombie or not) of the container but its init (and the pod's).
            left = host_processes_in_pid_ns(ns)
            assert sorted(comm for _, comm, _ in left) == (["busybox"] if pid_mode else ["busybox", "catatonit"]), left
            assert [state for _, _, state in left if state == "Z"] == [], left
    # A shell with children of its own: the whole tree goes. Only where an init reaps: children
    # the shell does not reap before it dies are orphans of the container's PID 1 (top never reaps).
    if pid_mode == 0:
        assert_exec_tree_goes(d, cid, ns)
    runc_left = subprocess.run(["pgrep", "-af", f"runc .*exec .*{cid}"], capture_output=True, text=True).stdout
    assert runc_left == "", runc_left
    # crictl: a timed-out exec fails, a normal one still works
    slow = d.crictl("exec", "-s", "--timeout", "1", cid, "sleep", "4321", check=False)
    assert slow.returncode != 0 and "timed out" in slow.stderr.lower() + slow.stdout.lower(), slow
    assert d.crictl("exec", "-s", cid, "echo", "fine").stdout.strip() == "fine"
    d.crictl("rmp", "-f", pod_id)


def assert_exec_tree_goes(d: PycrioDaemon, cid: str, ns: str) -> None:
    with d.channel() as ch:
        with pytest.raises(grpc.RpcError):
            d.runtime(ch).ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "sleep 4322 & sleep 4323; echo"], timeout=1),
                timeout=30,
            )
        names = container_process_names(d.runtime(ch), cid)
    assert "sleep" not in names, names
    assert [p for p in host_processes_in_pid_ns(ns) if p[1] == "sleep" or p[2] == "Z"] == []


def test_stop_and_remove_of_unknown_ids_succeed(fx_daemon: PycrioDaemon) -> None:
    d = fx_daemon
    unknown = uuid.uuid4().hex
    # (`crictl rm`/`rmp` ask ContainerStatus/PodSandboxStatus first, which must fail for an unknown
    # id: their Remove calls are checked through gRPC below)
    for args in (("stop", unknown), ("stopp", unknown)):
        result = d.crictl(*args, check=False)
        assert result.returncode == 0, (args, result.stderr)
    with d.channel() as ch:
        rt = d.runtime(ch)
        rt.StopContainer(api_pb2.StopContainerRequest(container_id=str(uuid.uuid4()), timeout=0), timeout=10)
        rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=str(uuid.uuid4())), timeout=10)
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=str(uuid.uuid4())), timeout=10)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=str(uuid.uuid4())), timeout=10)
        # an empty id is still a bad request
        with pytest.raises(grpc.RpcError) as caught:
            rt.StopContainer(api_pb2.StopContainerRequest(container_id=""), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # other calls on an unknown container still say NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=unknown), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_and_remove_twice_succeed(fx_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path) -> None:
    d = fx_daemon
    pod_id, cid = run_pod(d, tmp_path, busybox.reference, "twice", ["sleep", "1000"])
    d.crictl("stop", "-t", "1", cid)
    d.crictl("stop", "-t", "1", cid)
    d.crictl("rm", cid)
    with d.channel() as ch:
        rt = d.runtime(ch)
        rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=10)
        rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=10)  # removed: fine
        d.crictl("stopp", pod_id)
        d.crictl("stopp", pod_id)
        d.crictl("rmp", pod_id)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=10)
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=10)
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []

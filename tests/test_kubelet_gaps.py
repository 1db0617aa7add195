"""What a real kubelet asks of pycrio beyond crictl's everyday calls, on a real daemon with the real
crictl, runc and cgroups: UpdatePodSandboxResources in kubelet's in-place resize order (pod cgroup
raised before the containers', lowered after), kept across a restart; stats with usage_nano_cores,
available bytes, page faults and swap; image.user_specified_image."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

BRIDGE = "pycriokg0"
SUBNET = "10.149.0.0/24"
RUNC = "/usr/sbin/runc"
MIB = 1024 * 1024
BUSY = ["sh", "-c", "while :; do :; done"]
SLEEP = ["sleep", "1000"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path(RUNC).exists(), reason="needs root and runc")
V1 = cgroups.detect_support().mode != "v2"


@pytest.fixture(scope="module", autouse=True)
def kg_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("kg/busybox", "1")


class Node:
    """A daemon with an "oci" default handler ("runc") and a "pod" one ("runc-pod")."""

    def __init__(self, daemon: PycrioDaemon, tmp: Path, image: BuiltImage, parent: str) -> None:
        self.daemon, self.tmp, self.image, self.parent = daemon, tmp, image, parent
        self.channel = daemon.channel()
        self.rt = daemon.runtime(self.channel)

    def crictl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.crictl(*args, check=check)

    def pod_config(self, name: str, **linux: Any) -> Path:
        path = self.tmp / f"pod-{name}.json"
        path.write_text(json.dumps({
            "metadata": {"name": name, "namespace": "kg", "uid": f"uid-{name}", "attempt": 0},
            "hostname": name, "log_directory": str(self.tmp / "logs" / name), "linux": linux,
        }))  # fmt: skip
        return path

    def runp(self, name: str, handler: str = "", **linux: Any) -> str:
        args = ["runp", *(["--runtime", handler] if handler else []), str(self.pod_config(name, **linux))]
        return self.crictl(*args).stdout.strip()

    def run(self, pod_id: str, pod: str, name: str, command: list[str], resources: dict | None = None) -> str:
        config = self.tmp / f"ctr-{name}.json"
        config.write_text(json.dumps({
            "metadata": {"name": name}, "image": {"image": self.image.reference}, "command": command,
            "log_path": f"{name}.log", "linux": {"resources": resources or {}},
        }))  # fmt: skip
        cid = self.crictl("create", pod_id, str(config), str(self.pod_config(pod))).stdout.strip()
        self.crictl("start", cid)
        return cid

    def pod_cgroup(self, pod_id: str) -> str:
        return f"{self.parent}/{pod_id}"

    def update_pod(self, pod_id: str, resources: dict | None = None, overhead: dict | None = None) -> None:
        request = api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod_id)
        if resources is not None:
            request.resources.CopyFrom(api_pb2.LinuxContainerResources(**resources))
        if overhead is not None:
            request.overhead.CopyFrom(api_pb2.LinuxContainerResources(**overhead))
        self.rt.UpdatePodSandboxResources(request, timeout=30)

    def info(self, pod_id: str) -> dict[str, Any]:
        return json.loads(self.crictl("inspectp", pod_id).stdout)["info"]


def cgroup_value(path: str, controller: str, name: str) -> int:
    """One integer of cgroup `path` (v1: in `controller`'s hierarchy)."""
    return int((cgroups.controller_dirs(path)[controller] / name).read_text().split()[0])


def quota(path: str) -> int:
    return cgroup_value(path, "cpu", "cpu.cfs_quota_us")


def memory_limit(path: str) -> int:
    return cgroup_value(path, "memory", "memory.limit_in_bytes")


@pytest.fixture
def node(make_daemon, tmp_path: Path, registry: TestRegistry, busybox: BuiltImage) -> Iterator[Node]:
    netdir = bridge_network(tmp_path / "net.d", "pycrio-kg", BRIDGE, SUBNET, filename="10-kg.conflist")
    parent = f"/pycrio-kg-{tmp_path.name}"
    daemon = make_daemon(config_text=(
        f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
        f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
        f'[pycrio.runtime]\ndefault_runtime = "runc"\npod_cgroup_parent = "{parent}"\n'
        f'[pycrio.runtime.runtimes.runc]\nruntime_type = "oci"\nruntime_path = "{RUNC}"\n'
        f'[pycrio.runtime.runtimes.runc-pod]\nruntime_type = "pod"\nruntime_path = "{RUNC}"\n'
    ))  # fmt: skip
    daemon.crictl("pull", busybox.reference)
    n = Node(daemon, tmp_path, busybox, parent)
    yield n
    n.channel.close()
    if not daemon.alive():
        daemon.start()
    for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
        daemon.crictl("rmp", "-f", pod["id"], check=False)
    dirs = cgroups.controller_dirs(parent).values()
    left = sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir() and "kubepods" not in p.name)
    cgroups.remove_cgroup(parent)  # the test's parent (and what a test made there as "kubelet")
    assert left == [], f"pod cgroups left: {left}"
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(daemon.base) in line]
    assert mounts == [], mounts


# --- UpdatePodSandboxResources -----------------------------------------------------------------


POD_RESOURCES = {"cpu_period": 100000, "cpu_quota": 50000, "cpu_shares": 512, "memory_limit_in_bytes": 256 * MIB}
POD_OVERHEAD = {"cpu_period": 100000, "cpu_quota": 10000, "cpu_shares": 102, "memory_limit_in_bytes": 16 * MIB}


def test_pod_resize_in_kubelet_order_reaches_the_cgroups_and_survives_a_restart(node: Node) -> None:
    pod_id = node.runp("resize", resources=POD_RESOURCES, overhead=POD_OVERHEAD)
    pod_cg = node.pod_cgroup(pod_id)
    # RunPodSandbox wrote resources + overhead to the pod cgroup pycrio made.
    assert quota(pod_cg) == 60000
    assert cgroup_value(pod_cg, "cpu", "cpu.shares") == 614
    assert memory_limit(pod_cg) == 272 * MIB
    cid = node.run(pod_id, "resize", "app", SLEEP, {"cpu_period": 100000, "cpu_quota": 50000,
                                                   "memory_limit_in_bytes": 128 * MIB})
    ctr_cg = f"{pod_cg}/pycrio-{cid}"
    assert quota(ctr_cg) == 50000

    # Growing, as kubelet does it: the pod first, then the container.
    node.update_pod(pod_id, {**POD_RESOURCES, "cpu_quota": 150000, "memory_limit_in_bytes": 512 * MIB})
    assert (quota(pod_cg), memory_limit(pod_cg)) == (160000, 528 * MIB)
    node.crictl("update", "--cpu-period", "100000", "--cpu-quota", "150000", "--memory", str(400 * MIB), cid)
    assert (quota(ctr_cg), memory_limit(ctr_cg)) == (150000, 400 * MIB)
    if V1:  # cgroup v1 refuses a child quota above its parent's: the order matters there
        refused = node.crictl("update", "--cpu-period", "100000", "--cpu-quota", "300000", cid, check=False)
        assert refused.returncode != 0
        assert "pod" in refused.stderr and "raise the pod" in refused.stderr, refused.stderr
        assert quota(ctr_cg) == 150000
        linux = json.loads(node.crictl("inspect", cid).stdout)["status"]["resources"]["linux"]
        assert linux["cpuQuota"] == "150000"  # ContainerStatus still says what is in effect

    # Shrinking: the container first, then the pod.
    node.crictl("update", "--cpu-period", "100000", "--cpu-quota", "20000", "--memory", str(64 * MIB), cid)
    node.update_pod(pod_id, {**POD_RESOURCES, "cpu_quota": 20000, "memory_limit_in_bytes": 96 * MIB})
    assert (quota(ctr_cg), quota(pod_cg), memory_limit(pod_cg)) == (20000, 30000, 112 * MIB)
    if V1:  # the pod below its container: refused, and nothing of the update is kept
        with pytest.raises(grpc.RpcError) as refused_pod:
            node.update_pod(pod_id, {**POD_RESOURCES, "cpu_shares": 1024, "cpu_quota": 2000},
                            {**POD_OVERHEAD, "cpu_quota": 1000})
        assert refused_pod.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cpu.cfs_quota_us" in refused_pod.value.details()
        # cpu.shares was written before the quota was refused: it is put back.
        assert (quota(pod_cg), cgroup_value(pod_cg, "cpu", "cpu.shares")) == (30000, 614)

    info = node.info(pod_id)
    assert info["resources"]["cpuQuota"] == "20000" and info["resources"]["memoryLimitInBytes"] == str(96 * MIB)
    assert info["overhead"]["cpuQuota"] == "10000"
    node.daemon.stop()
    node.daemon.start()
    assert node.info(pod_id)["resources"] == info["resources"]
    assert node.info(pod_id)["overhead"] == info["overhead"]
    assert quota(pod_cg) == 30000
    # Only the fields given change; a field left out keeps what was in effect.
    node.update_pod(pod_id, resources={**POD_RESOURCES, "cpu_quota": 40000})
    assert node.info(pod_id)["overhead"] == info["overhead"] and quota(pod_cg) == 50000


def test_update_pod_sandbox_resources_errors(node: Node) -> None:
    def code(pod_id: str, resources: dict | None = None) -> grpc.StatusCode:
        try:
            node.update_pod(pod_id, resources)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert code("f" * 64) == grpc.StatusCode.NOT_FOUND
    pod_id = node.runp("errors")
    for bad in ({"cpu_shares": -5}, {"cpu_period": 10}, {"cpu_quota": 10}, {"memory_limit_in_bytes": -2},
                {"cpuset_cpus": "zero"}, {"unified": {"../cpu.max": "1"}},
                {"memory_limit_in_bytes": 64 * MIB, "memory_swap_limit_in_bytes": 32 * MIB}):
        assert code(pod_id, bad) == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert "resources" not in node.info(pod_id)
    # What kubelet sends for a pod without CPU limits: quota -1 (less the overhead's), huge memory.
    assert code(pod_id, {"cpu_shares": 2, "cpu_quota": -10001, "cpu_period": 100000,
                         "memory_limit_in_bytes": 9223372036854771712}) == grpc.StatusCode.OK
    assert quota(node.pod_cgroup(pod_id)) == -1
    assert memory_limit(node.pod_cgroup(pod_id)) >= cgroups.UNLIMITED
    if V1:  # a cpuset cgroup made for the pod gets its parent's memory nodes, or no task could join it
        # The pod's infra process (it shares its PID namespace) has a cpuset cgroup below the pod's,
        # with every CPU: it is narrowed first, or the kernel refuses the pod's (EBUSY).
        assert code(pod_id, {"cpuset_cpus": "0"}) == grpc.StatusCode.OK
        cpuset = cgroups.controller_dirs(node.pod_cgroup(pod_id))["cpuset"]
        assert (cpuset / "cpuset.cpus").read_text().strip() == "0"
        assert (cpuset / f"pycrio-{pod_id}" / "cpuset.cpus").read_text().strip() == "0"
        assert (cpuset / "cpuset.mems").read_text().strip() == (cpuset.parent / "cpuset.mems").read_text().strip() != ""
        cid = node.run(pod_id, "errors", "pinned", SLEEP)
        assert (cpuset / f"pycrio-{cid}" / "cpuset.cpus").read_text().strip() == "0"
        assert code(pod_id, {"cpuset_cpus": f"0-{os.cpu_count() + 8}"}) == grpc.StatusCode.INVALID_ARGUMENT  # no such CPUs
        all_cpus = (cpuset.parent / "cpuset.cpus").read_text().strip()
        assert code(pod_id, {"cpuset_cpus": all_cpus}) == grpc.StatusCode.OK  # widened: the infra follows
        assert (cpuset / f"pycrio-{pod_id}" / "cpuset.cpus").read_text().strip() == all_cpus
    node.crictl("stopp", pod_id)
    assert code(pod_id, {"cpu_shares": 512}) == grpc.StatusCode.FAILED_PRECONDITION


def test_kubelet_cgroup_parent_is_recorded_and_left_to_kubelet(node: Node) -> None:
    """With kubelet's cgroup_parent, kubelet writes the pod cgroup itself between the calls (as this
    test does): pycrio records the resources and runs the containers' updates in that order."""
    kubelet_pod = f"{node.parent}/kubepods/podkg"
    cpu_dir = cgroups.controller_dirs(kubelet_pod)["cpu"]
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "cpu.cfs_quota_us").write_text("50000")
    pod_id = node.runp("kubelet", cgroup_parent=kubelet_pod, resources=POD_RESOURCES)
    cid = node.run(pod_id, "kubelet", "app", SLEEP, {"cpu_period": 100000, "cpu_quota": 50000})
    ctr_cg = f"{kubelet_pod}/pycrio-{cid}"
    update = api_pb2.LinuxContainerResources(cpu_period=100000, cpu_quota=100000, cpu_shares=1024)

    node.update_pod(pod_id, {**POD_RESOURCES, "cpu_quota": 100000})  # 1. kubelet tells the runtime
    assert quota(kubelet_pod) == 50000, "kubelet's pod cgroup is not pycrio's to write"
    (cpu_dir / "cpu.cfs_quota_us").write_text("100000")  # 2. kubelet raises its pod cgroup
    node.rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(container_id=cid, linux=update),
                                     timeout=30)  # 3. then each container
    assert quota(ctr_cg) == 100000
    update.cpu_quota = 30000  # shrinking: the containers first, then the pod
    node.rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(container_id=cid, linux=update),
                                     timeout=30)
    node.update_pod(pod_id, {**POD_RESOURCES, "cpu_quota": 30000})
    (cpu_dir / "cpu.cfs_quota_us").write_text("30000")
    assert quota(ctr_cg) == 30000
    assert node.info(pod_id)["resources"]["cpuQuota"] == "30000"
    node.crictl("rmp", "-f", pod_id)


def test_pod_runtime_type_updates_resources(node: Node) -> None:
    pod_id = node.runp("podrt", handler="runc-pod")
    cid = node.run(pod_id, "podrt", "app", SLEEP, {"memory_limit_in_bytes": 64 * MIB})
    pod_cg = node.pod_cgroup(pod_id)
    ctr_cg = f"{pod_cg}/pycrio-{cid}"
    assert memory_limit(ctr_cg) == 64 * MIB
    node.update_pod(pod_id, {"cpu_period": 100000, "cpu_quota": 80000, "memory_limit_in_bytes": 256 * MIB})
    assert (quota(pod_cg), memory_limit(pod_cg)) == (80000, 256 * MIB)
    node.crictl("update", "--cpu-period", "100000", "--cpu-quota", "70000", "--memory", str(128 * MIB), cid)
    assert (quota(ctr_cg), memory_limit(ctr_cg)) == (70000, 128 * MIB)
    assert memory_limit(f"{pod_cg}-monitor") >= cgroups.UNLIMITED, "the monitor's cgroup is not the pod's"
    linux = json.loads(node.crictl("inspect", cid).stdout)["status"]["resources"]["linux"]
    assert (linux["cpuQuota"], linux["memoryLimitInBytes"]) == ("70000", str(128 * MIB))


# --- stats -------------------------------------------------------------------------------------


def _by_name(stats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["attributes"]["metadata"]["name"]: s for s in stats}


def test_stats_have_rates_available_bytes_page_faults_and_swap(node: Node) -> None:
    pod_id = node.runp("stats")
    busy = node.run(pod_id, "stats", "busy", BUSY, {"memory_limit_in_bytes": 64 * MIB})
    node.run(pod_id, "stats", "idle", SLEEP)
    first = _by_name(json.loads(node.crictl("stats", "-o", "json").stdout)["stats"])
    assert "usageNanoCores" not in first["busy"]["cpu"], "no rate without an earlier sample"
    pods_first = json.loads(node.crictl("statsp", "-o", "json").stdout)["stats"]
    assert "usageNanoCores" not in pods_first[0]["linux"]["cpu"]
    time.sleep(1.2)
    stats = _by_name(json.loads(node.crictl("stats", "-o", "json").stdout)["stats"])
    busy_cores = int(stats["busy"]["cpu"]["usageNanoCores"]["value"])
    idle_cores = int(stats["idle"]["cpu"].get("usageNanoCores", {}).get("value", 0))
    assert busy_cores > 100_000_000, busy_cores  # > 0.1 core (2 shared cores here)
    assert "usageNanoCores" in stats["idle"]["cpu"] and idle_cores < 20_000_000, idle_cores
    memory = stats["busy"]["memory"]
    working_set = int(memory["workingSetBytes"]["value"])
    assert int(memory["availableBytes"]["value"]) == 64 * MIB - working_set
    assert "availableBytes" not in stats["idle"]["memory"], "no limit: nothing to subtract from"
    assert int(memory["pageFaults"]["value"]) > 0
    assert "majorPageFaults" in memory
    if cgroups.detect_support().memory_swap:  # this host: cgroup v1 with memory.memsw.*
        swap = stats["busy"]["swap"]
        assert int(swap.get("swapUsageBytes", {}).get("value", 0)) == 0  # no swap device here
        # pycrio's containers get swap = memory limit (no swap): nothing of it is available.
        assert int(swap.get("swapAvailableBytes", {}).get("value", 0)) == 0
        assert "swapAvailableBytes" in swap
        assert "swapAvailableBytes" not in stats["idle"].get("swap", {}), "unlimited: no available figure"
    # ContainerStats by id, and the pod's own cgroup through ListPodSandboxStats.
    one = node.rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=busy), timeout=10).stats
    assert one.cpu.HasField("usage_nano_cores") and one.memory.HasField("available_bytes")
    pod = json.loads(node.crictl("statsp", "-o", "json").stdout)["stats"][0]["linux"]
    assert int(pod["cpu"]["usageNanoCores"]["value"]) > 100_000_000
    assert int(pod["memory"]["pageFaults"]["value"]) >= int(memory["pageFaults"]["value"])


# --- image.user_specified_image ----------------------------------------------------------------


def test_user_specified_image_is_reported(node: Node) -> None:
    pod_id = node.runp("image")
    # crictl fills user_specified_image with the name given (as kubelet gives its pod spec's image).
    cid = node.run(pod_id, "image", "by-crictl", SLEEP)
    status = json.loads(node.crictl("inspect", cid).stdout)["status"]
    assert status["image"]["userSpecifiedImage"] == node.image.reference
    # kubelet's form: the image id as `image`, the pod spec's name as user_specified_image.
    image_id = node.daemon.images(node.channel).ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=node.image.reference)), timeout=10).image.id
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="by-kubelet"), command=SLEEP, log_path="by-kubelet.log",
        image=api_pb2.ImageSpec(image=image_id, user_specified_image="kg/busybox:as-in-the-pod-spec"),
    )
    created = node.rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=api_pb2.PodSandboxConfig()), timeout=30).container_id
    got = node.rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=created), timeout=10).status
    assert got.image.user_specified_image == "kg/busybox:as-in-the-pod-spec"
    assert got.image_id == image_id and got.image.image == node.image.reference
    listed = {c.id: c for c in node.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers}
    assert listed[created].image.user_specified_image == "kg/busybox:as-in-the-pod-spec"
    assert listed[cid].image.user_specified_image == node.image.reference


# --- the pieces on their own: rates, and the cgroup v2 writer on a tree laid out like one ----------


def test_cpu_rate_needs_an_earlier_sample_and_a_long_enough_window() -> None:
    from pycrio.server.stats_convert import CpuRates

    rates = CpuRates(min_window_ns=1_000_000_000)
    assert rates.rate("c", 0, at_ns=0) is None
    assert rates.rate("c", 500_000_000, at_ns=1_000_000_000) == 500_000_000  # half a core
    # A second caller 5 ms later: measured from the sample before, not over 5 ms of noise.
    assert rates.rate("c", 500_000_001, at_ns=1_005_000_000) == 497_512_438
    assert rates.rate("c", 2_500_000_000, at_ns=2_000_000_000) == 2_000_000_000
    assert rates.rate("c", 10, at_ns=3_000_000_000) is None  # a counter going back starts over


def test_v2_writer_converts_like_runc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cgroup v2 host (not this one) the pod cgroup gets cpu.weight, cpu.max, memory.max and
    memory.swap.max (swap alone), with the controllers enabled on the way down."""
    root = tmp_path / "cgroup"
    (root / "pods" / "p1").mkdir(parents=True)
    for directory in (root, root / "pods"):
        (directory / "cgroup.controllers").write_text("cpu cpuset memory io pids\n")
        (directory / "cgroup.subtree_control").write_text("")
    pod = root / "pods" / "p1"
    for name, value in {"cpu.weight": "100", "cpu.max": "max 100000", "memory.max": "max", "memory.swap.max": "max",
                        "cgroup.controllers": "", "cgroup.subtree_control": ""}.items():  # fmt: skip
        (pod / name).write_text(value + "\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    cgroups.set_resources("/pods/p1", {"cpu": {"shares": 1024, "quota": 50000, "period": 100000},
                                       "memory": {"limit": 256 * MIB, "swap": 384 * MIB}}, mode="v2")
    assert (pod / "cpu.weight").read_text() == "39"  # runc's 1 + (shares - 2) * 9999 / 262142
    assert (pod / "cpu.max").read_text() == "50000 100000"
    assert (pod / "memory.max").read_text() == str(256 * MIB)
    assert (pod / "memory.swap.max").read_text() == str(128 * MIB)
    assert set((root / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory"}
    cgroups.set_resources("/pods/p1", {"cpu": {"quota": -1}, "memory": {"limit": -1, "swap": -1}}, mode="v2")
    assert (pod / "cpu.max").read_text() == "max 100000"
    assert (pod / "memory.max").read_text() == "max" and (pod / "memory.swap.max").read_text() == "max"

"""A real kubelet (v1.37.2, standalone: static pods, no API server) on a real pycrio + runc.

What the user sees is read from both sides: kubelet's own pod status (its `/pods` API on loopback,
the status it would send an API server) and its log (PLEG events, back-off lines), and the
runtime's view through crictl against the same pycrio. One node (harness.KubeletNode) serves the
module: pycrio with the "oci" handler (conmon + runc), tracing on at rate 0, kubelet tracing every
call to a real OTLP receiver, and kubelet's reduced crash-loop back-off (1 s, doubling) so a
restart test takes seconds.
"""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest

from pycrio.oci import cgroups
from tests.kubelet.harness import (
    BRIDGE, LOGS, NODE_NAME, KubeletNode, ancestors, container, container_status, eventually, inspect, remove_pod,
    requires_kubelet, runtime_containers, runtime_pods, state, static_pod, wait,
)
from tests.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, OTLPReceiver, ReceivedSpan
from tests.registry_fixture import BuiltImage, TestRegistry

pytestmark = requires_kubelet

MiB = 1024 * 1024
RESIZE_SPANS: list[ReceivedSpan] = []  # pycrio's spans of the resize test's Update* calls


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, registry: TestRegistry, image: BuiltImage, traces: OTLPReceiver
) -> Iterator[KubeletNode]:
    kubelet = KubeletNode(
        tmp_path_factory.mktemp("kubelet-node"),
        registry.address,
        tracing_endpoint=traces.endpoint,
        feature_gates={"ReduceDefaultCrashLoopBackOffDecay": True},
    ).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
        kubelet.keep_logs(LOGS / "oci")
    assert kubelet.host_changes() == [], "the host is not as it was before kubelet ran"


# --------------------------------------------------------------------------- helpers


def cgroup_value(path: str, controller: str, name: str) -> int:
    return int((cgroups.controller_dirs(path)[controller] / name).read_text())


def pod_cgroup(node: KubeletNode, uid: str, qos: str) -> str:
    """kubelet's own cgroup of pod `uid` (cgroupfs driver) below its cgroupRoot."""
    return f"{node.cgroup_root}/kubepods/{qos}/pod{uid}" if qos != "guaranteed" else f"{node.cgroup_root}/kubepods/pod{uid}"


def pleg_events(node: KubeletNode, uid: str) -> list[tuple[str, str]]:
    """kubelet's PLEG events of pod `uid` in its log: (type, container or sandbox id)."""
    pattern = re.compile(r'"SyncLoop \(PLEG\): event for pod".*event=\{"ID":"' + re.escape(uid)
                         + r'","Type":"(\w+)","Data":"(\w+)"')
    return [(m[1], m[2]) for m in pattern.finditer(node.logs())]


# --------------------------------------------------------------------------- tests


def test_static_pod_runs_completes_logs_and_leaves_nothing(node: KubeletNode, image: BuiltImage) -> None:
    node.write_manifest("duo", static_pod("duo", [
        container("server", image, "echo serving from duo; echo a warning >&2; exec sleep 1000"),
        container("oneshot", image, "echo oneshot did its job; exit 0"),
    ], restartPolicy="OnFailure"))
    pod = node.wait_pod("duo", lambda p: p.get("status", {}).get("phase") == "Running"
                        and state(container_status(p, "oneshot")) == "terminated", what="Running + oneshot done")
    uid = pod["metadata"]["uid"]
    server, oneshot = container_status(pod, "server"), container_status(pod, "oneshot")
    assert state(server) == "running" and server["ready"] is True, server
    done = oneshot["state"]["terminated"]
    assert (done["exitCode"], done["reason"]) == (0, "Completed"), oneshot
    assert server["restartCount"] == 0 and oneshot["restartCount"] == 0

    # crictl (the runtime) agrees with kubelet, container by container
    by_name = {c["metadata"]["name"]: c for c in runtime_containers(node, "duo")}
    assert set(by_name) == {"server", "oneshot"}, by_name
    assert server["containerID"] == f"pycrio://{by_name['server']['id']}"
    assert oneshot["containerID"] == f"pycrio://{by_name['oneshot']['id']}"
    assert by_name["server"]["state"] == "CONTAINER_RUNNING"
    assert by_name["oneshot"]["state"] == "CONTAINER_EXITED"
    exited = inspect(node, by_name["oneshot"]["id"])["status"]
    assert (exited["exitCode"], exited["reason"]) == (0, "Completed"), exited
    sandboxes = runtime_pods(node, "duo")
    assert [p["state"] for p in sandboxes] == ["SANDBOX_READY"], sandboxes
    sandbox = sandboxes[0]["id"]
    assert sandboxes[0]["metadata"]["uid"] == uid
    assert pod["status"]["podIP"] == node.crictl_json("inspectp", sandbox)["status"]["network"]["ip"]
    # and kubelet saw both starts and the exit through its PLEG relisting pycrio
    for event in (("ContainerStarted", by_name["server"]["id"]), ("ContainerDied", by_name["oneshot"]["id"])):
        wait(lambda: event in pleg_events(node, uid), 10, f"kubelet logs PLEG event {event}")

    # logs, through the files kubelet asked for (its podLogsDir)
    assert node.crictl("logs", by_name["server"]["id"]).stdout == "serving from duo\n"
    both = node.crictl("logs", by_name["server"]["id"])
    assert "a warning" in both.stderr
    assert node.crictl("logs", by_name["oneshot"]["id"]).stdout == "oneshot did its job\n"
    assert inspect(node, by_name["server"]["id"])["status"]["logPath"].startswith(str(node.pod_logs) + "/")

    # what the pod holds on the host, to look for after its removal
    pids = [int(inspect(node, c["id"])["info"]["pid"]) for c in by_name.values() if c["state"] == "CONTAINER_RUNNING"]
    assert pids and all(Path(f"/proc/{pid}").exists() for pid in pids)
    qos = pod["status"]["qosClass"].lower()
    assert qos == "besteffort"
    kube_cgroup = pod_cgroup(node, uid, qos)
    assert all(d.is_dir() for d in cgroups.controller_dirs(kube_cgroup).values())
    assert _veths() != []

    started = time.monotonic()
    node.remove_manifest("duo")
    wait(lambda: node.pod("duo") is None, 60, "kubelet forgets the pod")
    wait(lambda: all(not Path(f"/proc/{pid}").exists() for pid in pids), 30, "container processes exit")
    wait(lambda: runtime_containers(node, "duo") == [], 30, "kubelet removes the containers")
    # kubelet's container GC (every minute) removes the stopped sandbox of a deleted pod
    wait(lambda: runtime_pods(node, "duo") == [], 90, "kubelet removes the sandbox", interval=2)
    print(f"duo: manifest deleted -> sandbox removed in {time.monotonic() - started:.1f}s")
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if sandbox in line]
    assert mounts == [], mounts
    assert not (node.daemon.base / "run" / "pods" / sandbox).exists()
    left = [str(d) for d in cgroups.controller_dirs(kube_cgroup).values() if d.exists()]
    assert left == [], f"pod cgroups left: {left}"
    assert _veths() == []
    conmons = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert sandbox not in conmons and not any(c["id"] in conmons for c in by_name.values()), conmons


def _veths() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if line.strip()]


def test_failing_container_restarts_with_growing_backoff(node: KubeletNode, image: BuiltImage) -> None:
    node.write_manifest("crashy", static_pod("crashy", [
        container("fails", image, "echo attempt failing; exit 1"),
    ], restartPolicy="Always"))
    sandbox = wait(lambda: runtime_pods(node, "crashy"), 30, "the sandbox")[0]["id"]
    created_line = re.compile(rf'^time=(\S+) .*msg="created container (\w+) \(fails\) in pod {sandbox}', re.M)
    attempts: dict[str, int] = {}  # container id -> its ATTEMPT, as crictl showed it

    def creations() -> list[tuple[float, str]]:
        """Every creation of the container, from pycrio's log (crictl may miss an instance that
        kubelet removed between two looks): (time, id), in order."""
        return [(datetime.fromisoformat(t).timestamp(), cid) for t, cid in created_line.findall(node.daemon.logs())]

    def five_starts() -> bool:
        for c in runtime_containers(node, "crashy"):
            attempts.setdefault(c["id"], int(c["metadata"]["attempt"]))
        return len(creations()) >= 5 and max(attempts.values(), default=0) >= 4

    wait(five_starts, 90, "five starts of the failing container, ATTEMPT 4 shown", interval=0.2)
    made = creations()
    order = [cid for _, cid in made]
    # ATTEMPT of each instance crictl showed = how many instances came before it
    assert {cid: order.index(cid) for cid in attempts} == attempts, (attempts, order)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(made, made[1:])]
    print("restart gaps (s):", [round(g, 2) for g in gaps])
    # each gap is kubelet's back-off (none, then 1 s doubling, up to +50% jitter) plus up to ~1 s
    # of PLEG relisting and container creation: two doublings always outgrow the noise
    assert all(later > earlier for earlier, later in zip(gaps, gaps[2:])), gaps
    assert gaps[-1] > 2 * gaps[0], gaps

    # crictl's ATTEMPT column, and kubelet's own count, back-off reason and logged back-offs
    table = node.crictl("ps", "-a", "--name", "^fails$").stdout.splitlines()
    column = table[0].index("ATTEMPT")  # CREATED ("3 seconds ago") has spaces: cut by position
    shown = [int(row[column:].split()[0]) for row in table[1:] if "crashy" in row]
    assert max(shown) >= 4, table
    pod = node.wait_pod("crashy", lambda p: container_status(p, "fails").get("restartCount", 0) >= 4)
    status = container_status(pod, "fails")
    assert status["lastState"]["terminated"]["exitCode"] == 1, status
    backoffs = re.findall(r'back-off (\d+)s restarting failed container=fails pod=crashy', node.logs())
    assert [int(b) for b in dict.fromkeys(backoffs)][:4] == [1, 2, 4, 8], backoffs

    def a_dead_instance_logged() -> None:
        # kubelet removes an older dead instance whenever a new one starts: read one still there
        for c in reversed(runtime_containers(node, "crashy")):
            if c["state"] == "CONTAINER_EXITED" and (out := node.crictl("logs", c["id"], check=False)).returncode == 0:
                assert out.stdout == "attempt failing\n", out.stdout
                return
        raise AssertionError("no exited instance to read the log of")

    eventually(a_dead_instance_logged, timeout=20)
    remove_pod(node, "crashy")


def test_exec_probes_run_through_execsync_and_act(node: KubeletNode, image: BuiltImage, traces: OTLPReceiver) -> None:
    probe = {"periodSeconds": 1, "failureThreshold": 1, "timeoutSeconds": 2}
    node.write_manifest("probed", static_pod("probed", [
        container("app", image, "touch /healthy /ready; sleep 4; rm /healthy; exec sleep 1000",
                  livenessProbe={"exec": {"command": ["cat", "/healthy"]}, **probe},
                  readinessProbe={"exec": {"command": ["cat", "/ready"]}, **probe}),
    ]))
    first = node.wait_pod("probed", lambda p: container_status(p, "app").get("ready") is True, what="ready")
    assert container_status(first, "app")["restartCount"] == 0
    pod = node.wait_pod("probed", lambda p: container_status(p, "app").get("restartCount", 0) >= 1, timeout=40,
                        what="restarted by its liveness probe")
    status = container_status(pod, "app")
    assert status["containerID"] != container_status(first, "app")["containerID"]
    assert status["lastState"]["terminated"]["exitCode"] == 137, status  # SIGKILL after the 2 s grace
    assert "Container app failed liveness probe, will be restarted" in node.logs()
    execs = traces.spans(lambda s: s.service == "pycrio" and s.name == "/runtime.v1.RuntimeService/ExecSync"
                         and s.attributes.get("rpc.grpc.status_code") == 0)
    assert execs, "no ExecSync reached pycrio"
    remove_pod(node, "probed")


@pytest.mark.parametrize("policy", ["Strict", "Merge"])
def test_supplemental_groups_policy(node: KubeletNode, image: BuiltImage, policy: str) -> None:
    name = f"groups-{policy.lower()}"
    node.write_manifest(name, static_pod(name, [
        container("app", image, "echo groups: $(id -G); exec sleep 1000"),
    ], securityContext={"runAsUser": 1000, "runAsGroup": 1000, "supplementalGroups": [60000],
                        "supplementalGroupsPolicy": policy}))
    pod = node.wait_pod(name, lambda p: state(container_status(p, "app")) == "running"
                        or p.get("status", {}).get("phase") == "Failed", what="admitted and running")
    assert pod["status"]["phase"] == "Running", pod["status"]  # Strict: admitted (the runtime says it can)
    expected = [1000, 60000] if policy == "Strict" else [1000, 50000, 60000]
    cid = container_status(pod, "app")["containerID"].removeprefix("pycrio://")
    in_container = node.crictl("exec", "-s", cid, "id", "-G").stdout.split()
    assert sorted(map(int, in_container)) == expected, in_container
    assert node.crictl("logs", cid).stdout == f"groups: {' '.join(map(str, expected))}\n"
    # kubelet reports what the runtime says the process started with
    user = container_status(pod, "app")["user"]["linux"]
    assert (user["uid"], user["gid"], sorted(user["supplementalGroups"])) == (1000, 1000, expected), user
    remove_pod(node, name)


def test_in_place_resize_reaches_the_cgroups(node: KubeletNode, image: BuiltImage, traces: OTLPReceiver) -> None:
    """A static pod's UID is a hash of its manifest unless the manifest sets metadata.uid
    (pkg/kubelet/config/common.go applyDefaults): with a fixed uid an edited manifest is an
    UPDATE of the same pod (config.go checkAndUpdatePod), and kubelet resizes it in place."""
    uid = "5e1f0c6a-7d8b-4c2e-9a31-0b6d2f4e8c11"

    def manifest(cpu_limit: str, memory_limit: str, cpu_request: str) -> dict[str, Any]:
        resources = {"requests": {"cpu": cpu_request, "memory": "64Mi"},
                     "limits": {"cpu": cpu_limit, "memory": memory_limit}}
        policy = [{"resourceName": "cpu", "restartPolicy": "NotRequired"},
                  {"resourceName": "memory", "restartPolicy": "NotRequired"}]
        return static_pod("resize", [container("app", image, "exec sleep 1000", resources=resources,
                                               resizePolicy=policy)], metadata={"uid": uid})

    node.write_manifest("resize", manifest("200m", "128Mi", "100m"))
    pod = node.wait_pod("resize", lambda p: state(container_status(p, "app")) == "running", what="running")
    assert pod["metadata"]["uid"] == uid and pod["status"]["qosClass"] == "Burstable"
    cid = container_status(pod, "app")["containerID"].removeprefix("pycrio://")
    sandbox = runtime_pods(node, "resize")[0]["id"]
    ours = inspect(node, cid)["info"]["runtimeSpec"]["linux"]["cgroupsPath"]
    kubes = pod_cgroup(node, uid, "burstable")
    assert ours.startswith(kubes + "/"), (ours, kubes)
    assert (cgroup_value(ours, "cpu", "cpu.cfs_quota_us"), cgroup_value(ours, "memory", "memory.limit_in_bytes")) \
        == (20000, 128 * MiB)
    assert cgroup_value(kubes, "cpu", "cpu.cfs_quota_us") == 20000

    traces.clear()
    node.write_manifest("resize", manifest("400m", "256Mi", "200m"))

    def resized() -> bool:
        status = container_status(node.pod("resize") or {}, "app")
        return (status.get("resources", {}).get("limits") == {"cpu": "400m", "memory": "256Mi"}
                and status.get("allocatedResources", {}).get("cpu") == "200m")

    wait(resized, 60, "kubelet reports the new resources")
    wait(lambda: cgroup_value(ours, "cpu", "cpu.cfs_quota_us") == 40000, 20, "the container's CPU quota")
    assert cgroup_value(ours, "memory", "memory.limit_in_bytes") == 256 * MiB
    assert cgroup_value(ours, "cpu", "cpu.shares") == 204  # 200m * 1024 / 1000
    assert cgroup_value(kubes, "cpu", "cpu.cfs_quota_us") == 40000
    assert cgroup_value(kubes, "memory", "memory.limit_in_bytes") == 256 * MiB
    assert cgroup_value(kubes, "cpu", "cpu.shares") == 204
    # in place: the same container and sandbox, no restart, and ContainerStatus says so too
    status = container_status(node.pod("resize"), "app")
    assert status["restartCount"] == 0 and status["containerID"] == f"pycrio://{cid}"
    assert runtime_pods(node, "resize")[0]["id"] == sandbox
    linux = inspect(node, cid)["status"]["resources"]["linux"]
    assert (int(linux["cpuQuota"]), int(linux["memoryLimitInBytes"]), int(linux["cpuShares"])) \
        == (40000, 256 * MiB, 204), linux
    # the CRI calls kubelet made for it, as pycrio's spans show them
    def both_calls() -> None:
        calls = traces.spans(lambda s: s.service == "pycrio" and "/runtime.v1.RuntimeService/Update" in s.name)
        names = {s.name.rsplit("/", 1)[1] for s in calls}
        assert names == {"UpdatePodSandboxResources", "UpdateContainerResources"}, names
        RESIZE_SPANS[:] = calls

    eventually(both_calls, timeout=15)
    remove_pod(node, "resize")


def test_update_pod_sandbox_resources_is_served() -> None:
    """kubelet's resize calls UpdatePodSandboxResources first (best effort: it goes on when the
    runtime answers UNIMPLEMENTED); pycrio should serve it. Reads the spans of the resize above."""
    spans = [s for s in RESIZE_SPANS if s.name.endswith("/UpdatePodSandboxResources")]
    if not spans:
        pytest.skip("no resize ran in this session (run the whole module)")
    codes = {s.attributes.get("rpc.grpc.status_code") for s in spans}
    if codes == {12}:
        pytest.xfail("pycrio answers UpdatePodSandboxResources with UNIMPLEMENTED (another change implements it)")
    assert codes == {0}, [(s.attributes, s.status_message) for s in spans]
    # kubelet grows the pod first, then its containers
    first_container_update = min(s.start_ns for s in RESIZE_SPANS if s.name.endswith("/UpdateContainerResources"))
    assert min(s.start_ns for s in spans) < first_container_update


def test_pycrio_spans_nest_under_kubelet(node: KubeletNode, image: BuiltImage, traces: OTLPReceiver) -> None:
    traces.clear()
    node.write_manifest("traced", static_pod("traced", [container("app", image, "exec sleep 1000")]))
    node.wait_pod("traced", lambda p: state(container_status(p, "app")) == "running", what="running")
    def nested() -> None:
        spans = traces.spans()
        sync = [s for s in spans if s.service == "kubelet" and s.name == "syncPod"
                and s.attributes.get("k8s.pod.name") == f"traced-{NODE_NAME}"]
        assert sync, sorted({(s.service, s.name) for s in spans})
        trace_ids = {s.trace_id for s in sync}
        everything = {s.span_id: s for s in spans}
        for method in ("RunPodSandbox", "CreateContainer", "StartContainer"):
            ours = [s for s in spans if s.service == "pycrio" and s.name == f"/runtime.v1.RuntimeService/{method}"
                    and s.trace_id in trace_ids]
            assert len(ours) == 1, (method, [(s.name, s.trace_id) for s in spans if method in s.name])
            parent = everything.get(ours[0].parent_span_id)
            assert parent is not None and parent.service == "kubelet" and parent.kind == SPAN_KIND_CLIENT, parent
            assert parent.name == f"runtime.v1.RuntimeService/{method}" and ours[0].kind == SPAN_KIND_SERVER
            assert any(s.service == "kubelet" and s.name == "syncPod" for s in ancestors(parent, spans)), method
        run = next(s for s in spans if s.name == "/runtime.v1.RuntimeService/RunPodSandbox" and s.trace_id in trace_ids)
        steps = {s.name for s in spans if s.parent_span_id == run.span_id}
        assert {"create_namespaces", "cni_add"} <= steps, steps

    eventually(nested, timeout=30)
    remove_pod(node, "traced")

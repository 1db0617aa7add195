"""ListPodSandbox while a RunPodSandbox is still running: the pod is not listed until it is ready
(kubelet's PLEG would otherwise see a NOTREADY sandbox appear and die before it starts)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from pycrio.cri import api_pb2, api_pb2_grpc
from tests.harness import PycrioDaemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

# A CNI plugin that takes its time on ADD and gives the pod no address: a real executable speaking
# the CNI protocol, so the daemon runs it as it runs bridge.
SLOW_PLUGIN = """#!/bin/sh
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  touch "$(dirname "$0")/add-started"
  sleep 2
  echo '{"cniVersion": "1.0.0", "interfaces": [], "ips": []}'
elif [ "$CNI_COMMAND" = VERSION ]; then
  echo '{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}'
fi
"""


@pytest.fixture
def slow_network_daemon(make_daemon, tmp_path: Path) -> PycrioDaemon:
    plugins = tmp_path / "cni-bin"
    plugins.mkdir()
    plugin = plugins / "pycrio-slowpass"
    plugin.write_text(SLOW_PLUGIN)
    plugin.chmod(0o755)
    netdir = tmp_path / "net.d"
    netdir.mkdir()
    (netdir / "10-slow.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "pycrio-slow", "plugins": [{"type": "pycrio-slowpass"}]}
    ))  # fmt: skip
    return make_daemon(config_text=(
        f'[pycrio.network]\nnetwork_dir = "{netdir}"\nplugin_dirs = ["{plugins}", "/usr/lib/cni", "/opt/cni/bin"]\n'
        f'[pycrio.runtime]\npod_cgroup_parent = "/pycrio-listtest-{tmp_path.name}"\n'
    ))  # fmt: skip


def test_a_pod_is_listed_only_once_its_run_pod_sandbox_finished(slow_network_daemon: PycrioDaemon, tmp_path: Path) -> None:
    channel = grpc.insecure_channel(slow_network_daemon.endpoint)
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    # no shared PID namespace: no infra container, the pod is namespaces and the network only
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="slow", namespace="listtest", uid="uid-slow"),
        linux=api_pb2.LinuxPodSandboxConfig(security_context=api_pb2.LinuxSandboxSecurityContext(
            namespace_options=api_pb2.NamespaceOption(pid=api_pb2.CONTAINER))),
    )  # fmt: skip
    result: dict[str, str] = {}
    runner = threading.Thread(target=lambda: result.update(
        id=stub.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id))  # fmt: skip
    runner.start()
    try:
        started = tmp_path / "cni-bin" / "add-started"
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline, "CNI ADD never ran"
            time.sleep(0.02)
        # the record is on disk (crash recovery) but the call is still in CNI ADD
        assert stub.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []
        streamed = [p for r in stub.StreamPodSandboxes(api_pb2.StreamPodSandboxesRequest()) for p in r.pod_sandboxes]
        assert streamed == []
        runner.join(30)
        pods = stub.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
        assert [(p.id, p.state) for p in pods] == [(result["id"], api_pb2.SANDBOX_READY)]
    finally:
        runner.join(30)
        if "id" in result:  # whatever was asserted, the pod goes (mounts and namespaces with it)
            stub.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=result["id"]))
            stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=result["id"]))
    assert stub.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []
    channel.close()
    assert [m for m in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in m] == []

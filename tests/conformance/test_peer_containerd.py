"""The containerd peer: mirrors through hosts.toml, a pod, and a stop() that leaves nothing behind.

Needs containerd and containerd-shim-runc-v2 in .venv/bin (`make peer-containerd-bin`); skipped
without them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.peer_containerd import CONTAINERD, SHIM, ContainerdPeer, hosts_toml
from tests.registry_fixture import ImageBuilder, TestRegistry

pytestmark = pytest.mark.skipif(not (CONTAINERD.is_file() and SHIM.is_file()) or os.geteuid() != 0,
                                reason="needs root and `make peer-containerd-bin`")

SOURCE = "registry.k8s.io"
IMAGE = f"{SOURCE}/e2e-test-images/busybox:1.29-2"
BRIDGE = "ctrdpeer2"
SUBNET = "10.138.0.0/24"
NETWORK = "pycrio-ctrdpeer-test"


@pytest.fixture
def mirrored(tmp_path: Path) -> Iterator[tuple[TestRegistry, ContainerdPeer]]:
    """A registry holding busybox as <registry>/registry.k8s.io/..., and a peer mirroring that host there."""
    with TestRegistry(tmp_path / "registry") as registry:
        ImageBuilder(tmp_path / "images", registry).busybox(IMAGE.rpartition(":")[0], IMAGE.rpartition(":")[2])
        peer = ContainerdPeer(tmp_path / "ctrd", {SOURCE: f"{registry.address}/{SOURCE}"}, bridge=BRIDGE,
                              subnet=SUBNET, network_name=NETWORK)
        try:
            yield registry, peer.start()
        finally:
            peer.stop()


def write(path: Path, value: object) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def leftovers(peer: ContainerdPeer, ids: list[str]) -> list[str]:
    """What of this peer is still on the host; `ids`: its pods' and containers' (their cgroups)."""
    found = [f"shim {pid}" for pid in peer._shims()]
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if f" {peer.directory}/" in line]
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    if peer.shim_socket_dir.exists():
        found.append(str(peer.shim_socket_dir))
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    found += [f"iptables {line[:80]}" for line in rules.splitlines() if NETWORK in line]
    found += [f"cgroup {p}" for i in ids for p in Path("/sys/fs/cgroup").glob(f"*/k8s.io/{i}")]
    return found


def test_hosts_toml_maps_a_namespaced_mirror_with_override_path() -> None:
    text = hosts_toml(SOURCE, f"127.0.0.1:5000/{SOURCE}")
    assert 'server = "https://registry.k8s.io"' in text
    assert '[host."http://127.0.0.1:5000/v2/registry.k8s.io"]' in text
    assert "override_path = true" in text
    assert "override_path" not in hosts_toml(SOURCE, "127.0.0.1:5000")


def test_pulls_by_source_name_through_the_mirror_and_runs_a_pod(mirrored: tuple[TestRegistry, ContainerdPeer],
                                                                  tmp_path: Path) -> None:
    registry, peer = mirrored
    assert "RuntimeName:  containerd" in peer.crictl("version").stdout
    peer.crictl("pull", IMAGE)
    # The repository was asked for below the mirror's path, not at the registry's root.
    assert f"/v2/{SOURCE}/e2e-test-images/busybox/manifests/" in registry.log.read_text()
    images = peer.crictl("images", "-o", "json").stdout
    assert IMAGE in images and peer.pause_image in images
    pod = write(tmp_path / "pod.json", {"metadata": {"name": "p", "namespace": "t", "uid": "u1"}, "linux": {}})
    ctr = write(tmp_path / "ctr.json", {"metadata": {"name": "c"}, "image": {"image": IMAGE},
                                        "command": ["/bin/sleep", "1000"], "linux": {}})
    cid = peer.crictl("run", ctr, pod).stdout.strip()
    pod_id = peer.crictl("pods", "-q").stdout.split()[0]
    assert list(Path("/sys/fs/cgroup").glob(f"*/k8s.io/{cid}")), "runc made the container's cgroup"
    assert peer.crictl("exec", cid, "/bin/echo", "hello").stdout == "hello\n"
    assert peer._shims(), "a pod runs in a shim of this containerd"
    peer.stop()
    assert leftovers(peer, [cid, pod_id]) == []
    assert not peer.state_file.exists()


def test_stop_cleans_up_after_a_killed_containerd(mirrored: tuple[TestRegistry, ContainerdPeer], tmp_path: Path) -> None:
    _, peer = mirrored
    pod = write(tmp_path / "pod.json", {"metadata": {"name": "p", "namespace": "t", "uid": "u2"}, "linux": {}})
    pod_id = peer.crictl("runp", pod).stdout.strip()
    pid = peer.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # A fresh object, as `python -m tests.conformance.peer_containerd stop` has: only the directory.
    ContainerdPeer(peer.directory, bridge=BRIDGE, network_name=NETWORK).stop()
    assert leftovers(peer, [pod_id]) == []

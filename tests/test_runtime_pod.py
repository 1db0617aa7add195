"""The "pod" runtime type on a real daemon with the real crictl, runc and pycrio-monitor: one
monitor per pod owns its containers (create, start, exec, logs, stop, remove), survives a daemon
SIGKILL, and its own SIGKILL leaves nothing behind; a mixed node runs "oci" and "pod" pods side by
side; one trace spans cri-tools, pycrio and pycrio-monitor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pycrio.oci import cgroups
from pycrio.procfs import all_pids, argv
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon, tool, tracing_args
from tests.otlp_receiver import OTLPReceiver
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

BRIDGE = "pycriopod0"
SUBNET = "10.146.0.0/24"
RUNC = "/usr/sbin/runc"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path(RUNC).exists(), reason="needs root and runc")


@pytest.fixture(scope="module", autouse=True)
def pod_bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


@pytest.fixture
def busybox(image_builder: ImageBuilder) -> BuiltImage:
    return image_builder.busybox("podrt/busybox", "1")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


class Node:
    """A daemon whose default handler "runc" is of type "pod" ("runc-oci" is an "oci" one)."""

    def __init__(self, daemon: PycrioDaemon, tmp: Path, image: str, parent: str) -> None:
        self.daemon, self.tmp, self.image, self.parent = daemon, tmp, image, parent

    def crictl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
               tracing_endpoint: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        cmd = [tool("crictl"), "--runtime-endpoint", self.daemon.endpoint, "--image-endpoint", self.daemon.endpoint,
               "--timeout", "30s"]  # fmt: skip
        if tracing_endpoint:
            cmd += ["--enable-tracing", "--tracing-endpoint", tracing_endpoint]
        done = subprocess.run([*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done

    def pod_config(self, name: str) -> Path:
        return write_json(self.tmp / f"pod-{name}.json", {
            "metadata": {"name": name, "namespace": "podrt", "uid": f"uid-{name}", "attempt": 0},
            "hostname": name, "log_directory": str(self.tmp / "logs" / name), "linux": {},
        })  # fmt: skip

    def runp(self, name: str, handler: str = "", **crictl: Any) -> str:
        args = ["runp", *(["--runtime", handler] if handler else []), str(self.pod_config(name))]
        return self.crictl(*args, **crictl).stdout.strip()

    def run(self, pod_id: str, pod: str, name: str, command: list[str], start: bool = True, **crictl: Any) -> str:
        config = write_json(self.tmp / f"ctr-{name}.json", {
            "metadata": {"name": name}, "image": {"image": self.image}, "command": command, "log_path": f"{name}.log",
        })  # fmt: skip
        cid = self.crictl("create", pod_id, str(config), str(self.pod_config(pod)), **crictl).stdout.strip()
        if start:
            self.crictl("start", cid)
        return cid

    def inspect(self, cid: str) -> dict[str, Any]:
        return json.loads(self.crictl("inspect", cid).stdout)["status"]

    def wait_for_state(self, cid: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.inspect(cid)
            if status["state"] == state or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def monitor_pid(self, pod_id: str) -> int:
        return int((self.daemon.base / "run" / "pods" / pod_id / "monitor" / "monitor.pid").read_text())

    def monitors(self) -> list[int]:
        """pids of pycrio-monitor processes of this daemon (its runroot in their command line)."""
        run = str(self.daemon.base / "run").encode()
        return [p for p in all_pids() if any(b"pycrio-monitor" in a for a in argv(p)[:2]) and any(run in a for a in argv(p))]


@pytest.fixture
def node(make_daemon, tmp_path: Path, registry: TestRegistry, receiver: OTLPReceiver, busybox: BuiltImage) -> Iterator[Node]:
    netdir = bridge_network(tmp_path / "net.d", "pycrio-podrt", BRIDGE, SUBNET, filename="10-podrt.conflist")
    parent = f"/pycrio-podrt-{tmp_path.name}"
    daemon = make_daemon(
        config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\ndefault_runtime = "runc"\npod_cgroup_parent = "{parent}"\n'
            f'[pycrio.runtime.runtimes.runc]\nruntime_type = "pod"\nruntime_path = "{RUNC}"\n'
            f'[pycrio.runtime.runtimes.runc-oci]\nruntime_type = "oci"\nruntime_path = "{RUNC}"\n'
        ),
        args=tracing_args(receiver.endpoint),
    )
    daemon.crictl("pull", busybox.reference)
    node = Node(daemon, tmp_path, busybox.reference, parent)
    yield node
    if not daemon.alive():
        daemon.start()
    for pod in json.loads(node.crictl("pods", "-o", "json").stdout).get("items", []):
        node.crictl("rmp", "-f", pod["id"], check=False)
    assert_nothing_left(node)


def assert_nothing_left(node: Node) -> None:
    base = str(node.daemon.base)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if base in line]
    assert mounts == [], mounts
    assert node.monitors() == [], "pycrio-monitor processes left"
    conmons = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert base not in conmons, conmons
    dirs = cgroups.controller_dirs(node.parent).values()
    left = sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir())
    assert left == [], f"cgroups left: {left}"
    cgroups.remove_cgroup(node.parent)
    links = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    assert links.strip() == "", links
    runc = subprocess.run([RUNC, "--root", f"{base}/run/runtimes/runc", "list", "-q"], capture_output=True, text=True)
    assert runc.stdout.strip() == "", runc.stdout


# --- the lifecycle ----------------------------------------------------------------------------


def test_pod_lifecycle_with_crictl(node: Node) -> None:
    pod_id = node.runp("life")
    pid = node.monitor_pid(pod_id)
    assert node.monitors() == [pid], "one monitor per pod"
    info = json.loads(node.crictl("inspectp", pod_id).stdout)
    assert info["status"]["runtimeHandler"] == "runc"
    assert info["status"]["network"]["ip"].startswith("10.146.0.")

    cid = node.run(pod_id, "life", "app", ["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 1000"])
    assert node.wait_for_state(cid, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"
    # the container's processes are the monitor's (it is their subreaper), not a conmon's
    init = int(json.loads(node.crictl("inspect", cid).stdout)["info"]["pid"])
    assert int(Path(f"/proc/{init}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid

    done = node.crictl("exec", "-s", cid, "sh", "-c", "echo sync-out; echo sync-err >&2")
    assert done.stdout.split() == ["sync-out", "sync-err"], done.stdout  # crictl prints both on stdout
    failed = node.crictl("exec", "-s", cid, "sh", "-c", "echo sync-err >&2; exit 3", check=False)
    assert failed.returncode == 1 and "exited with 3: sync-err" in failed.stderr, failed.stderr
    streamed = node.crictl("exec", cid, "sh", "-c", "echo streamed; exit 4", check=False)
    assert streamed.stdout == "streamed\n" and "exit code 4" in streamed.stderr, streamed.stderr
    piped = node.crictl("exec", "-i", cid, "cat", input="one\ntwo\n")
    assert piped.stdout == "one\ntwo\n"

    deadline = time.monotonic() + 10
    while "hello-err" not in (logs := node.crictl("logs", cid)).stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (logs.stdout, logs.stderr.splitlines()[-1]) == ("hello-out\n", "hello-err")  # after crictl's warning
    log_file = node.tmp / "logs" / "life" / "app.log"
    lines = log_file.read_text().splitlines()
    assert [line.split(" ", 3)[1:] for line in lines] == [["stdout", "F", "hello-out"], ["stderr", "F", "hello-err"]]

    quick = node.run(pod_id, "life", "quick", ["sh", "-c", "exit 7"])
    status = node.wait_for_state(quick, "CONTAINER_EXITED")
    assert (status["exitCode"], status["reason"]) == (7, "Error")

    node.crictl("stop", "-t", "5", cid)
    status = node.inspect(cid)
    assert (status["state"], status["exitCode"]) == ("CONTAINER_EXITED", 143)
    node.crictl("stopp", pod_id)
    node.crictl("rmp", pod_id)
    assert node.monitors() == []
    assert not (node.daemon.base / "run" / "pods" / pod_id).exists()

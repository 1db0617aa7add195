"""A real standalone kubelet (no API server) on a pycrio started for it, and the host put back.

`KubeletNode` starts a pycrio (tests/harness.PycrioDaemon: its own socket, dirs, CNI bridge
`pycriokub0` on 10.148.0.0/24, cgroup parent) and `.venv/bin/kubelet` with its own root dir, cert
dir, static pod dir, pod logs dir, cgroup root `/pycrio-kubelet-<id>` and a config rendered from
contrib/kubelet/kubelet-config.yaml, its log in `<base>/kubelet.log`. Pod status is read from
kubelet's own API (`/pods` on loopback: static pods with the status kubelet computed), the
runtime's view with crictl.

What kubelet changes on the host and cannot be told not to (sysctls, /var/lib/kubelet/device-plugins,
/var/log/containers, the bind mount of its root dir) is recorded before it starts, in
/run/pycrio-kubelet-tests/<pid>.json, and put back by `stop()`; `make clean-test-state` reads the
records a killed run left. One node at a time on a host (a lock): kubelets share the device
plugin socket dir.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import ssl
import string
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from pycrio import procfs
from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.harness import REPO, VENV_BIN, PycrioDaemon
from tests.otlp_receiver import ReceivedSpan
from tests.registry_fixture import BuiltImage, free_port

KUBELET = VENV_BIN / "kubelet"
CONFIG_TEMPLATE = REPO / "contrib" / "kubelet" / "kubelet-config.yaml"
STATE_DIR = Path("/run/pycrio-kubelet-tests")
LOGS = REPO / "build" / "kubelet-e2e"  # each run's kubelet and pycrio logs are kept here
NODE_NAME = "pycrio-kubelet"
NETWORK = "pycrio-kubelet"
BRIDGE = "pycriokub0"
SUBNET = "10.148.0.0/24"
CNI_NETWORKS = Path("/var/lib/cni/networks")
# kubelet's setupKernelTunables (pkg/kubelet/cm/container_manager_linux.go) sets these
SYSCTLS = (
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
)
# hard-coded in kubelet: the device plugin socket dir and the container log symlinks
HOST_PATHS = (Path("/var/lib/kubelet/device-plugins"), Path("/var/log/containers"),
              Path("/usr/libexec/kubernetes/kubelet-plugins/volume/exec"))
# kubelet's log lines about the runtime worth a look (klog: E/W severity, or any rpc error)
RUNTIME_LINE = re.compile(r"(?i)runtime|\bCRI\b|rpc error|failed")

requires_kubelet = pytest.mark.skipif(
    not KUBELET.exists(), reason=f"{KUBELET} not built: `make kubelet` (about 20 minutes on 2 cores)"
)


def _first_missing(path: Path) -> Path | None:
    """The topmost component of `path` that does not exist (what creating `path` would add)."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _top_cgroups(name: str) -> list[str]:
    """Top-level cgroups called `name` (e.g. a kubepods kubelet made at the host's root)."""
    return sorted(str(root / name) for root in cgroups._hierarchies(cgroups.detect_support().mode)
                  if (root / name).is_dir())


class HostState:
    """The host as it was before kubelet ran, and the means to put it back (record on disk)."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.sysctls = {key: Path("/proc/sys", key).read_text().strip() for key in SYSCTLS}
        self.created = [str(p) for p in map(_first_missing, HOST_PATHS) if p is not None]
        self.kubepods_before = _top_cgroups("kubepods")
        self.kubelet_pid = 0
        self.extra: dict[str, Any] = {}

    def save(self) -> None:
        STATE_DIR.mkdir(exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "sysctls": self.sysctls, "created": self.created, "kubepods_before": self.kubepods_before,
            "kubelet_pid": self.kubelet_pid, **self.extra,
        }))
        tmp.rename(self.record)

    def changes(self, pod_logs: Path) -> list[str]:
        """What differs from the recorded host (empty once restored)."""
        found = []
        for key, value in self.sysctls.items():
            now = Path("/proc/sys", key).read_text().strip()
            if now != value:
                found.append(f"sysctl {key.replace('/', '.')} = {now} (was {value})")
        found += [f"{p} created" for p in self.created if os.path.lexists(p)]
        found += [f"cgroup {p} created" for p in _top_cgroups("kubepods") if p not in self.kubepods_before]
        found += [f"{link} -> {os.readlink(link)}" for link in _our_log_links(pod_logs)]
        return found

    def restore(self, pod_logs: Path) -> None:
        for key, value in self.sysctls.items():
            path = Path("/proc/sys", key)
            if path.read_text().strip() != value:
                path.write_text(value)
        for created in self.created:
            if os.path.isdir(created) and not os.path.islink(created):
                shutil.rmtree(created, ignore_errors=True)
            elif os.path.lexists(created):
                os.unlink(created)
        for top in _top_cgroups("kubepods"):
            if top not in self.kubepods_before:
                cgroups._remove_tree(Path(top))
        for link in _our_log_links(pod_logs):
            link.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)


def _our_log_links(pod_logs: Path) -> list[Path]:
    """/var/log/containers symlinks into this node's pod logs dir (when the dir was there before)."""
    links = Path("/var/log/containers")
    if not links.is_dir():
        return []
    return [p for p in links.iterdir() if p.is_symlink() and os.readlink(p).startswith(str(pod_logs) + "/")]


def _mounts_under(base: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = cgroups.unescape_mountinfo(line.split()[4])
        if point == str(base) or point.startswith(str(base) + "/"):
            points.append(point)
    return points


def _other_kubelets() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "kubelet":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class KubeletNode:
    """pycrio + a standalone kubelet, each with everything of its own under `base`."""

    def __init__(
        self,
        base: Path,
        registry_address: str,
        *,
        runtime_type: str = "oci",
        tracing_endpoint: str | None = None,
        feature_gates: dict[str, bool] | None = None,
        config: dict[str, Any] | None = None,
        verbosity: int = 3,
    ) -> None:
        self.base = base
        self.id = uuid.uuid4().hex[:8]
        self.cgroup_root = f"/pycrio-kubelet-{self.id}"
        self.root_dir = base / "kubelet"
        self.cert_dir = base / "pki"
        self.manifests = base / "manifests"
        self.pod_logs = base / "pod-logs"
        self.config_file = base / "kubelet-config.yaml"
        self.log_file = base / "kubelet.log"
        self.port = free_port()
        self.healthz_port = free_port()
        self.tracing_endpoint = tracing_endpoint
        self.feature_gates = feature_gates or {}
        self.config = config or {}  # more KubeletConfiguration fields (not ones the template sets)
        self.verbosity = verbosity
        netdir = bridge_network(base / "net.d", NETWORK, BRIDGE, SUBNET, filename="10-kubelet.conflist")
        tracing = (
            f'[pycrio.tracing]\nenable_tracing = true\ntracing_endpoint = "{tracing_endpoint}"\n'
            "tracing_sampling_rate_per_million = 0\n" if tracing_endpoint else ""
        )
        self.daemon = PycrioDaemon(
            base / "pycrio",
            config_text=(
                f'[pycrio.image]\ninsecure_registries = ["{registry_address}"]\n'
                f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
                f'[pycrio.runtime]\ndefault_runtime = "runc"\npod_cgroup_parent = "{self.cgroup_root}-pycrio"\n'
                f'[pycrio.runtime.runtimes.runc]\nruntime_type = "{runtime_type}"\n'
                + tracing
            ),
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.host: HostState | None = None
        self._lock: int | None = None

    # --- start and stop ----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "KubeletNode":
        self._take_lock()
        try:
            others = _other_kubelets()
            if others:
                pytest.skip(f"a kubelet already runs on this host (pid {others}): not starting another")
            plugin_socket = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
            if plugin_socket.exists():
                pytest.skip(f"{plugin_socket} exists: this host has a kubelet of its own")
            self.host = HostState(STATE_DIR / f"{os.getpid()}-{self.id}.json")
            self.host.extra = {"base": str(self.base), "cgroup_root": self.cgroup_root, "bridge": BRIDGE,
                               "network": NETWORK}
            self.host.save()  # before anything changes: a killed run leaves this for clean-test-state
            self.daemon.start()
            for directory in (self.root_dir, self.cert_dir, self.manifests, self.pod_logs):
                directory.mkdir(parents=True, exist_ok=True)
            self._make_cgroup_root()
            self.config_file.write_text(self.render_config())
            with self.log_file.open("ab") as log:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self.host.kubelet_pid = self.proc.pid
            self.host.save()
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def command(self) -> list[str]:
        return [
            str(KUBELET),
            "--config", str(self.config_file),
            "--root-dir", str(self.root_dir),
            "--cert-dir", str(self.cert_dir),
            "--hostname-override", NODE_NAME,
            f"--v={self.verbosity}",
        ]

    def render_config(self) -> str:
        text = string.Template(CONFIG_TEMPLATE.read_text()).substitute(
            PYCRIO_SOCKET=self.daemon.socket,
            STATIC_POD_PATH=self.manifests,
            POD_LOGS_DIR=self.pod_logs,
            CGROUP_ROOT=self.cgroup_root,
            KUBELET_ROOT=self.root_dir,
            KUBELET_PORT=self.port,
            HEALTHZ_PORT=self.healthz_port,
            TRACING_ENDPOINT=self.tracing_endpoint or "127.0.0.1:4317",
            TRACING_RATE=1_000_000 if self.tracing_endpoint else 0,
        )
        text += "".join(f"{key}: {json.dumps(value)}\n" for key, value in self.config.items())  # JSON is YAML
        if self.feature_gates:
            text += "featureGates:\n" + "".join(f"  {k}: {str(v).lower()}\n" for k, v in self.feature_gates.items())
        return text

    def _make_cgroup_root(self) -> None:
        """kubelet wants its cgroupRoot in every hierarchy; cpuset gets its parent's cpus/mems."""
        for hierarchy in cgroups._hierarchies(cgroups.detect_support().mode):
            directory = hierarchy / self.cgroup_root.lstrip("/")
            directory.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (directory / name).exists():
                    (directory / name).write_text((hierarchy / name).read_text())

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"kubelet exited ({self.proc and self.proc.returncode}):\n{self.logs()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=2) as reply:
                    if reply.read() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"kubelet not healthy within {timeout}s:\n{self.logs()[-4000:]}")

    def stop(self) -> None:
        """Stop kubelet, then remove its pods through the CRI, stop pycrio, put the host back."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.daemon.alive():
            self.remove_all_pods()
            self.daemon.stop()
        for point in sorted(_mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        try:
            cgroups.remove_cgroup(self.cgroup_root)
            cgroups.remove_cgroup(f"{self.cgroup_root}-pycrio")
        except OSError:
            pass
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        shutil.rmtree(CNI_NETWORKS / NETWORK, ignore_errors=True)
        if self.host is not None:
            self.host.restore(self.pod_logs)
        self._release_lock()

    def keep_logs(self, directory: Path) -> None:
        """Copy kubelet's and pycrio's logs and kubelet's runtime lines to `directory` (build/...)."""
        directory.mkdir(parents=True, exist_ok=True)
        for source in (self.log_file, self.daemon.log_file):
            if source.exists():
                shutil.copy(source, directory / source.name)
        (directory / "kubelet-runtime-lines.txt").write_text("".join(f"{line}\n" for line in self.runtime_lines()))

    def remove_all_pods(self) -> None:
        with self.daemon.channel() as ch:
            rt = self.daemon.runtime(ch)
            for pod in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
                rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)

    def host_changes(self) -> list[str]:
        """What still differs from the host before the node started, after `stop()`."""
        left = self.host.changes(self.pod_logs) if self.host else []
        left += [f"mount {p}" for p in _mounts_under(self.base)]
        left += [f"process {pid} {name}" for pid, name in self._processes()]
        left += [f"cgroup {d}" for d in cgroups.controller_dirs(self.cgroup_root).values() if d.exists()]
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
            left.append(f"bridge {BRIDGE}")
        if self.host is not None and self.host.record.exists():
            left.append(f"host record {self.host.record}")
        return left

    def _processes(self) -> list[tuple[int, str]]:
        """Processes of this node: its dirs in their command line, or in its cgroups."""
        base = str(self.base).encode()
        found = []
        for pid in procfs.all_pids():
            if pid == os.getpid():
                continue
            try:
                mine = any(base in arg for arg in procfs.argv(pid)) or \
                    f":{self.cgroup_root}" in Path(f"/proc/{pid}/cgroup").read_text()
                if mine:
                    found.append((pid, Path(f"/proc/{pid}/comm").read_text().strip()))
            except OSError:
                continue
        return found

    def _take_lock(self, timeout: float = 600.0) -> None:
        STATE_DIR.mkdir(exist_ok=True)
        fd = os.open(STATE_DIR / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError("another kubelet test node holds /run/pycrio-kubelet-tests/lock")
                time.sleep(1)

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # --- what kubelet says -------------------------------------------------------------------

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def runtime_lines(self) -> list[str]:
        """kubelet's warnings and errors (klog W/E) about the runtime, and any rpc error line."""
        return [line for line in self.logs().splitlines()
                if (line[:1] in "WE" and RUNTIME_LINE.search(line)) or "rpc error" in line]

    def pods(self) -> list[dict[str, Any]]:
        """kubelet's own pods with the status it computed (GET /pods on its API)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/pods", timeout=10, context=context) as reply:
            items: list[dict[str, Any]] = json.load(reply).get("items") or []
            return items

    def pod(self, name: str) -> dict[str, Any] | None:
        """The static pod of manifest `name` (kubelet names it `<name>-<node>`)."""
        return next((p for p in self.pods() if p["metadata"]["name"] == f"{name}-{NODE_NAME}"), None)

    def wait_pod(self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
                 what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        pod = None
        while time.monotonic() < deadline:
            pod = self.pod(name)
            if pod is not None and predicate(pod):
                return pod
            time.sleep(0.5)
        raise AssertionError(f"pod {name}: {what or 'condition'} not reached in {timeout}s; "
                             f"kubelet says:\n{json.dumps(pod and pod.get('status'), indent=1)}\n"
                             f"kubelet log tail:\n{self.logs()[-3000:]}")

    # --- manifests ---------------------------------------------------------------------------

    def write_manifest(self, name: str, pod: dict[str, Any]) -> Path:
        """Write (or replace) a static pod manifest at once (kubelet skips files starting with '.')."""
        target = self.manifests / f"{name}.json"
        tmp = self.manifests / f".{name}.json.tmp"
        tmp.write_text(json.dumps(pod, indent=1))
        tmp.rename(target)
        return target

    def remove_manifest(self, name: str) -> None:
        (self.manifests / f"{name}.json").unlink()

    # --- the runtime's view ------------------------------------------------------------------

    def crictl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.crictl(*args, check=check)

    def crictl_json(self, *args: str) -> Any:
        return json.loads(self.crictl(args[0], "-o", "json", *args[1:]).stdout)


# --- manifests and the runtime's view of them ----------------------------------------------


def static_pod(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A Pod manifest; `metadata=` adds to its metadata, the rest goes into its spec."""
    metadata = {"name": name, **spec.pop("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": containers, "terminationGracePeriodSeconds": 2, **spec}}


def container(name: str, image: BuiltImage, script: str, **extra: Any) -> dict[str, Any]:
    """A container running `sh -c script`."""
    return {"name": name, "image": image.reference, "command": ["sh", "-c", script], **extra}


def state(status: dict[str, Any]) -> str:
    """"running", "terminated", "waiting" (or "none") of a container status kubelet reported."""
    return next(iter(status.get("state") or {"none": None}))


def container_status(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next((c for c in pod.get("status", {}).get("containerStatuses", []) if c["name"] == name), {})


def runtime_containers(node: KubeletNode, pod: str) -> list[dict[str, Any]]:
    """crictl's containers of static pod `pod` (every state), oldest first."""
    items = node.crictl_json("ps", "-a").get("containers", [])
    ours = [c for c in items if c["labels"].get("io.kubernetes.pod.name") == f"{pod}-{NODE_NAME}"]
    return sorted(ours, key=lambda c: int(c["createdAt"]))


def runtime_pods(node: KubeletNode, pod: str) -> list[dict[str, Any]]:
    items = node.crictl_json("pods").get("items", [])
    return [p for p in items if p["metadata"]["name"] == f"{pod}-{NODE_NAME}"]


def inspect(node: KubeletNode, cid: str) -> dict[str, Any]:
    info: dict[str, Any] = node.crictl_json("inspect", cid)
    return info


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s")


def eventually(check: Callable[[], None], timeout: float = 20.0, interval: float = 0.5) -> None:
    """Run `check` (which asserts) until it passes; its last AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def remove_pod(node: KubeletNode, name: str) -> None:
    """Delete a manifest and wait until kubelet no longer has the pod (its stopped sandbox stays
    until kubelet's container GC, every minute)."""
    node.remove_manifest(name)
    wait(lambda: node.pod(name) is None, 60, f"kubelet forgets {name}")


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """`span`'s parent, its parent, ... as far as they arrived."""
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain

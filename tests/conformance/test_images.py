"""The critest image stand-ins (images/build.py), run for real: pushed to a loopback registry,
pulled by a pycrio daemon with the real crictl, each doing what its critest spec expects of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from tests.cni_fixture import bridge_network
from tests.conformance.images import build
from tests.harness import PycrioDaemon
from tests.registry_fixture import TestRegistry

BRIDGE = "pycriocf7"
SUBNET = "10.131.0.0/24"
CGROUP_PARENT = "/pycrio-conformance-images"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"

BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
NGINX = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
HTTPD = "registry.k8s.io/e2e-test-images/httpd:2.4.39-4"
NNP = "registry.k8s.io/e2e-test-images/nonewprivs:1.3"
PAUSE = "registry.k8s.io/pause:3.9"
STAGING = "gcr.io/k8s-staging-cri-tools/"


class Env:
    """The registry the stand-ins went to, the daemon pulling them, and pod/container helpers."""

    def __init__(self, registry: TestRegistry, daemon: PycrioDaemon, work: Path, pushed: list[str]) -> None:
        self.registry = registry
        self.daemon = daemon
        self.work = work
        self.pushed = pushed
        self._pulled: set[str] = set()
        self._count = 0

    def ref(self, original: str) -> str:
        return build.mirror_reference(self.registry.address, original)

    def pull(self, original: str) -> str:
        reference = self.ref(original)
        if reference not in self._pulled:
            self.daemon.crictl("pull", reference)
            self._pulled.add(reference)
        return reference

    def run(
        self, original: str, command: list[str] | None = None, pod_linux: dict | None = None,
        security: dict | None = None,
    ) -> tuple[str, str, Path]:
        """runp + create + start with crictl: (pod id, container id, container log).

        `security` is the container's linux.security_context."""
        self._count += 1
        name = f"c{self._count}"
        logs = self.work / "logs" / name
        pod = self._write(f"pod-{name}.json", {
            "metadata": {"name": name, "namespace": "conformance", "uid": f"uid-{name}", "attempt": 0},
            "hostname": name,
            "log_directory": str(logs),
            "linux": pod_linux or {},
        })
        config: dict[str, object] = {"metadata": {"name": name}, "image": {"image": self.pull(original)},
                                     "log_path": f"{name}.log", "linux": {"security_context": security or {}}}
        if command is not None:
            config["command"] = command
        ctr = self._write(f"ctr-{name}.json", config)
        pod_id = self.daemon.crictl("runp", str(pod)).stdout.strip()
        cid = self.daemon.crictl("create", pod_id, str(ctr), str(pod)).stdout.strip()
        self.daemon.crictl("start", cid)
        return pod_id, cid, logs / f"{name}.log"

    def status(self, cid: str) -> dict:
        return json.loads(self.daemon.crictl("inspect", cid).stdout)["status"]

    def wait_state(self, cid: str, state: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(cid)
            if status["state"] == state or time.monotonic() > deadline:
                assert status["state"] == state, status
                return status
            time.sleep(0.2)

    def exec(self, cid: str, *cmd: str, timeout: int = 10) -> tuple[str, str, int]:
        """ExecSync as critest calls it: (stdout, stderr, exit code)."""
        with self.daemon.channel() as ch:
            r = self.daemon.runtime(ch).ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout), timeout=timeout + 20
            )
        return r.stdout.decode(), r.stderr.decode(), r.exit_code

    def pod_ip(self, pod_id: str) -> str:
        return json.loads(self.daemon.crictl("inspectp", pod_id).stdout)["status"]["network"]["ip"]

    def _write(self, name: str, data: dict) -> Path:
        path = self.work / name
        path.write_text(json.dumps(data))
        return path


def conflist(directory: Path) -> Path:
    return bridge_network(directory, "pycrio-conformance-images", BRIDGE, SUBNET, portmap="portmap", hairpin=True,
                          filename="10-conformance.conflist")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("conformance-images")
    with TestRegistry(work / "registry") as registry:
        pushed = build.build_and_push(registry.address, build.DEFAULT_CACHE, log=lambda line: None)
        netdir = conflist(work / "net.d")
        daemon = PycrioDaemon(work / "daemon", config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{CGROUP_PARENT}"\n'
        )).start()
        try:
            yield Env(registry, daemon, work, pushed)
        finally:
            for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
                daemon.crictl("rmp", "-f", pod["id"], check=False)
            daemon.stop()
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
            cgroups.remove_cgroup(CGROUP_PARENT)


def http_get(url: str, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=2.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_for_log(path: Path, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.2)


def stopped_quickly(env: Env, cid: str) -> tuple[float, dict]:
    """crictl stop with a 30 s grace: how long it took and the final status."""
    started = time.monotonic()
    env.daemon.crictl("stop", "-t", "30", cid)
    return time.monotonic() - started, env.wait_state(cid, "CONTAINER_EXITED")


# -- the set ----------------------------------------------------------------------------------


def test_every_reference_is_pushed_and_a_second_build_is_cached(env: Env) -> None:
    assert sorted(env.pushed) == sorted(build.IMAGES)
    hosts = {ref.split("/", 1)[0] for ref in env.pushed}
    assert hosts == set(build.SOURCE_REGISTRIES)
    digest = {}
    for ref in env.pushed:
        name, tag = build.split_reference(env.ref(ref))
        repository = name.removeprefix(env.registry.address + "/")
        r = httpx.get(f"{env.registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
        assert r.status_code == 200, (ref, r.text)
        digest[ref] = r.headers["Docker-Content-Digest"]
    # one image under two registries; one image under three tags; distinct images otherwise
    assert digest[PAUSE] == digest["k8s.gcr.io/pause:3.9"]
    assert len({digest[STAGING + f"test-image-tags:{n}"] for n in (1, 2, 3)}) == 1
    distinct = [r for r in env.pushed if r not in ("k8s.gcr.io/pause:3.9", STAGING + "test-image-tags:2",
                                                   STAGING + "test-image-tags:3")]
    assert len({digest[r] for r in distinct}) == len(distinct)
    assert not any("@sha256:" in r for r in env.pushed)

    started = time.monotonic()
    again = build.build(build.DEFAULT_CACHE, log=lambda line: None)
    assert time.monotonic() - started < 10
    assert all(b.cached for b in again.built.values()), [b.tag for b in again.built.values() if not b.cached]


def test_image_status_reports_the_users(env: Env) -> None:
    for original, uid, username in [
        (STAGING + "test-image-user-uid:latest", "1002", ""),
        (STAGING + "test-image-user-username:latest", None, "www-data"),
        (STAGING + "test-image-user-uid-group:latest", "1003", ""),
        (STAGING + "test-image-user-username-group:latest", None, "www-data"),
        (PAUSE, "65535", ""),
    ]:
        status = json.loads(env.daemon.crictl("inspecti", env.pull(original)).stdout)["status"]
        assert (status.get("uid") or {}).get("value") == uid, (original, status)
        assert status.get("username", "") == username, (original, status)


# -- busybox ----------------------------------------------------------------------------------


def test_busybox_runs_the_default_command_and_its_tools(env: Env) -> None:
    pod_id, cid, _ = env.run(BUSYBOX, ["top"], security={"masked_paths": ["/bin/ls"]})
    env.wait_state(cid, "CONTAINER_RUNNING")
    time.sleep(1)
    assert env.status(cid)["state"] == "CONTAINER_RUNNING", "top (no tty) must keep running"
    # MaskedPaths: the shell must exec /bin/ls (a hard link, masked alone) and fail on it
    assert env.exec(cid, "/bin/sh", "-c", "ls")[1:] == ("/bin/sh: ls: Permission denied\n", 127)
    assert env.exec(cid, "busybox", "true")[2] == 0, "masking /bin/ls must leave busybox alone"
    assert env.exec(cid, "id", "-u") == ("0\n", "", 0)
    assert env.exec(cid, "echo", "-n", "hello") == ("hello", "", 0)
    # execSync timeout: a timed-out sleep is gone, and pgrep says so on stdout
    with pytest.raises(grpc.RpcError):
        env.exec(cid, "sleep", "4321", timeout=1)
    assert env.exec(cid, "sh", "-c", "pgrep sleep || true") == ("", "", 0)
    # (the backgrounded shell may not have exec'd sleep yet when pgrep first looks)
    out, _, code = env.exec(cid, "sh", "-c", "sleep 30 >/dev/null 2>&1 & for i in 1 2 3 4 5 6 7 8 9 10; do "
                                             "pgrep sleep && exit 0; sleep 0.1; done; exit 1")
    assert code == 0 and out.strip().isdigit(), out
    ipcs, _, code = env.exec(cid, "ipcs", "-m")
    assert code == 0 and "Shared Memory Segments" in ipcs, ipcs
    for tool in ("brctl", "ping", "netstat", "pidof", "hostname", "mount", "dd", "seq", "grep", "chmod", "touch"):
        assert env.exec(cid, "sh", "-c", f"[ -x /bin/{tool} ] && [ /bin/{tool} -ef /bin/busybox ]")[2] == 0, tool
    assert env.exec(cid, "hostname")[0].strip() == f"c{env._count}"
    netstat, _, code = env.exec(cid, "netstat", "-ln")
    assert code == 0 and "Proto" in netstat, netstat
    env.daemon.crictl("rmp", "-f", pod_id)


def test_busybox_users_and_groups(env: Env) -> None:
    pod_id, cid, _ = env.run(BUSYBOX, ["sleep", "infinity"], security={
        "run_as_username": "nobody", "supplemental_groups": [1234, 5678]})
    env.wait_state(cid, "CONTAINER_RUNNING")
    assert env.exec(cid, "id", "-nu") == ("nobody\n", "", 0)
    assert env.exec(cid, "id", "-u")[0] == "65534\n"
    groups = env.exec(cid, "id", "-G")[0].split()
    assert {"1234", "5678"} <= set(groups), groups
    assert env.exec(cid, "sh", "-c", "grep -c . /etc/passwd; grep ^www-data: /etc/passwd")[0].split("\n")[1] == \
        "www-data:x:33:33:www-data:/var/www:/bin/false"
    env.daemon.crictl("rmp", "-f", pod_id)


def test_busybox_ping_without_net_raw_fails_with_permission_denied(env: Env) -> None:
    pod_id, cid, _ = env.run(BUSYBOX, ["sh", "-c", "top"], security={
        "capabilities": {"drop_capabilities": ["NET_RAW"]}})
    env.wait_state(cid, "CONTAINER_RUNNING")
    out, err, code = env.exec(cid, "ping", "127.0.0.1")
    assert code != 0 and out != "" and "permission denied" in err, (out, err, code)
    env.daemon.crictl("rmp", "-f", pod_id)


def test_busybox_read_only_paths_message(env: Env) -> None:
    pod_id, cid, _ = env.run(BUSYBOX, ["sh", "-c", "top"], security={"readonly_paths": ["/tmp"]})
    env.wait_state(cid, "CONTAINER_RUNNING")
    assert env.exec(cid, "touch", "/tmp/test")[1:] == ("touch: /tmp/test: Read-only file system\n", 1)
    env.daemon.crictl("rmp", "-f", pod_id)


# -- the user images --------------------------------------------------------------------------


@pytest.mark.parametrize(("original", "expected"), [
    (STAGING + "test-image-user-uid:latest", "1002:0:1002"),
    (STAGING + "test-image-user-username:latest", "33:33:www-data"),
    (STAGING + "test-image-user-uid-group:latest", "1003:1004:1003"),
    (STAGING + "test-image-user-username-group:latest", "33:1004:www-data"),
    (STAGING + "test-image-predefined-group:latest", "1000:1000:default-user"),
])
def test_user_images_run_as_their_user(env: Env, original: str, expected: str) -> None:
    script = "echo $(id -u):$(id -g):$(id -nu 2>/dev/null); grep ^group-defined-in-image: /etc/group"
    pod_id, cid, log = env.run(original, ["sh", "-c", script])
    env.wait_state(cid, "CONTAINER_EXITED")
    lines = [line.split(" ", 3)[3] for line in wait_for_log(log, "\n").splitlines() if " stdout " in line]
    assert lines[0] == expected, lines
    if "predefined-group" in original:  # what SupplementalGroupsPolicy=Merge adds from the image
        assert lines[1:] == ["group-defined-in-image:x:50000:default-user"], lines
    env.daemon.crictl("rmp", "-f", pod_id)


# -- nginx, hostnet-nginx, httpd --------------------------------------------------------------


def test_nginx_serves_and_looks_like_the_nginx_master(env: Env) -> None:
    own_pid = {"namespace_options": {"pid": 1}}  # CONTAINER: /proc/1 is nginx itself
    pod_id, cid, _ = env.run(NGINX, pod_linux={"security_context": own_pid}, security=own_pid)
    env.wait_state(cid, "CONTAINER_RUNNING")
    response = http_get(f"http://{env.pod_ip(pod_id)}:80/")
    assert response.status_code == 200 and "nginx" in response.text
    out, _, code = env.exec(cid, "sh", "-c", 'while ! cat /proc/1/cmdline | grep "master process"; do sleep 1; done')
    assert code == 0 and "nginx: master process nginx -g daemon off;" in out
    assert env.exec(cid, "cat", "/proc/1/comm")[0] == "nginx\n"
    pid = env.exec(cid, "sh", "-c", "while [ ! -f /var/run/nginx.pid ]; do sleep 1; done && cat /var/run/nginx.pid")[0]
    assert pid.strip() == "1"
    assert env.exec(cid, "pidof", "nginx")[0].split() == ["1"]
    seconds, status = stopped_quickly(env, cid)
    assert seconds < 10 and status["exitCode"] == 0, (seconds, status)
    env.daemon.crictl("rmp", "-f", pod_id)


def test_hostnet_nginx_listens_on_12003(env: Env) -> None:
    # in a pod network, not the host's: critest's own runs may hold the host's 12003
    pod_id, cid, _ = env.run(STAGING + "hostnet-nginx-amd64:latest")
    env.wait_state(cid, "CONTAINER_RUNNING")
    assert http_get(f"http://{env.pod_ip(pod_id)}:12003/").status_code == 200
    env.daemon.crictl("rmp", "-f", pod_id)


def test_httpd_serves_logs_httpd_and_stops_on_sigterm(env: Env) -> None:
    pod_id, cid, log = env.run(HTTPD)
    env.wait_state(cid, "CONTAINER_RUNNING")
    response = http_get(f"http://{env.pod_ip(pod_id)}:80/")
    assert response.status_code == 200 and "It works!" in response.text
    assert "httpd" in wait_for_log(log, "httpd")
    assert env.exec(cid, "echo", "httpd") == ("httpd\n", "", 0)
    seconds, status = stopped_quickly(env, cid)
    assert seconds < 10 and status["exitCode"] == 0, (seconds, status)
    env.daemon.crictl("rmp", "-f", pod_id)


# -- nonewprivs, pause ------------------------------------------------------------------------


@pytest.mark.parametrize(("no_new_privs", "expected"), [(False, "Effective uid: 0"), (True, "Effective uid: 1000")])
def test_nonewprivs_prints_its_effective_uid(env: Env, no_new_privs: bool, expected: str) -> None:
    pod_id, cid, log = env.run(NNP, security={"run_as_user": {"value": 1000}, "no_new_privs": no_new_privs})
    status = env.wait_state(cid, "CONTAINER_EXITED")
    assert status["exitCode"] == 0
    assert f" stdout F {expected}" in wait_for_log(log, expected)
    env.daemon.crictl("rmp", "-f", pod_id)


def test_pause_stays_up_and_stops_on_sigterm(env: Env) -> None:
    for original in (PAUSE, "k8s.gcr.io/pause:3.9"):
        pod_id, cid, log = env.run(original)
        env.wait_state(cid, "CONTAINER_RUNNING")
        time.sleep(1)
        assert env.status(cid)["state"] == "CONTAINER_RUNNING"
        seconds, status = stopped_quickly(env, cid)
        assert seconds < 10 and status["exitCode"] == 0, (seconds, status)
        assert "Shutting down, got signal: Terminated" in wait_for_log(log, "Shutting down")
        env.daemon.crictl("rmp", "-f", pod_id)


def children(pid: int) -> dict[int, str]:
    """pid -> state letter of the processes whose parent is `pid`."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[int(stat.parent.name)] = fields[0]
    return found


def test_pause_reaps_orphans_as_pid_1(env: Env) -> None:
    """As a PID namespace's init, pause inherits orphans and must reap them when they exit."""
    pause = build.DEFAULT_CACHE / "bin" / "pause"  # built by the env fixture
    proc = subprocess.Popen(["unshare", "--fork", "--pid", "--kill-child", str(pause)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while not (inner := children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        [pause_pid] = inner
        subprocess.run(["nsenter", "-t", str(pause_pid), "-p", "--", "sh", "-c", "sleep 1 & exit 0"], check=True)
        orphans = children(pause_pid)
        assert len(orphans) == 1, orphans  # the sleep, reparented to pause
        time.sleep(1.5)
        assert children(pause_pid) == {}, "the exited orphan is still a zombie"
        os.kill(pause_pid, signal.SIGTERM)
        assert proc.wait(5) == 0
        assert "Shutting down, got signal: Terminated" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

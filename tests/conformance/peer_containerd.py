"""containerd v2.4.2 as a peer CRI runtime on this machine, isolated from anything else running here.

`ContainerdPeer(directory, mirrors)` writes a config (version 3) whose root, state, temp, opt,
gRPC/ttrpc/debug sockets, runc root, netns mounts, CNI config and IPAM state all live under
`directory`; its shim sockets go to a short /run/pycrio-ctrd-<hash>/ (unix socket paths are
limited to 108 bytes), never /run/containerd. Pods get a network of their own (bridge
`ctrdpeer0`, 10.134.0.0/16, never the host's /etc/cni/net.d). NRI is off. `restrict_oom_score_adj`
is on: this VM's bounding set lacks CAP_SYS_RESOURCE, and without it every RunPodSandbox fails.

Mirrors: `{"registry.k8s.io": "127.0.0.1:PORT/registry.k8s.io"}` serves registry.k8s.io/x/y:t from
the loopback registry's repository `registry.k8s.io/x/y` (plain HTTP). containerd's hosts.toml
maps it with a path in the host URL and `override_path = true`:
`[host."http://127.0.0.1:PORT/v2/registry.k8s.io"]` makes it ask
`GET /v2/registry.k8s.io/x/y/manifests/t` (without override_path it appends `/v2` after the path).

The sandbox (pause) image is ours, `<registry>/pycrio-peer/pause:1` (Debian's static catatonit as
/pause, `-P`, user 65535), built with umoci and pushed with skopeo to the registry of the first
mirror (or `registry`, or a docker-registry of the peer's own): never critest's pause:3.9, which
critest removes by id.

CLI, for make targets (the daemon outlives the command; `stop` finds it through <dir>/peer.json):

    python -m tests.conformance.peer_containerd start --dir build/peer-containerd \\
        [--mirror HOST=127.0.0.1:PORT/HOST ...] [--registry 127.0.0.1:PORT]
    python -m tests.conformance.peer_containerd stop --dir build/peer-containerd
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pycrio import procfs  # noqa: E402
from tests.harness import VENV_BIN, tool  # noqa: E402
from tests.registry_fixture import TestRegistry  # noqa: E402

CONTAINERD = VENV_BIN / "containerd"
SHIM = VENV_BIN / "containerd-shim-runc-v2"
RUNC = "/usr/bin/runc"
CNI_BIN_DIR = "/usr/lib/cni"
CATATONIT = "/usr/bin/catatonit"
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
PAUSE_REPOSITORY = "pycrio-peer/pause"
PAUSE_TAG = "1"
BRIDGE = "ctrdpeer0"
SUBNET = "10.134.0.0/16"
NETWORK_NAME = "pycrio-ctrdpeer"  # `pycrio-*`: make clean-test-state knows its iptables rules
CGROUP_FS = Path("/sys/fs/cgroup")
CNI_RESULTS = Path("/var/lib/cni/results")
# Snapshotters that cannot work here (or would touch devices); overlayfs stays the default.
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
)


def say(message: str) -> None:
    print(f"peer-containerd: {message}", file=sys.stderr, flush=True)


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def hosts_toml(host: str, mirror: str) -> str:
    """certs.d/<host>/hosts.toml serving `host` from `mirror` ("[scheme://]addr[/path]", http by default)."""
    scheme, _, rest = mirror.rpartition("://")
    address, _, path = rest.partition("/")
    base = f"{scheme or 'http'}://{address}"
    lines = [f"server = {toml_str('https://' + host)}", ""]
    if path.strip("/"):
        # The repository lives under <path>/ in the mirror: the API root is /v2/<path>, given whole.
        url = f"{base}/v2/{path.strip('/')}"
        lines += [f"[host.{toml_str(url)}]", '  capabilities = ["pull", "resolve"]', "  override_path = true"]
    else:
        lines += [f"[host.{toml_str(base)}]", '  capabilities = ["pull", "resolve"]']
    return "\n".join(lines) + "\n"


class ContainerdPeer:
    """One containerd with everything under `directory`; start() returns once CRI answers."""

    def __init__(
        self,
        directory: Path,
        mirrors: dict[str, str] | None = None,
        registry: str | None = None,
        bridge: str = BRIDGE,
        subnet: str = SUBNET,
        network_name: str = NETWORK_NAME,
        log_level: str = "info",
    ) -> None:
        self.directory = directory.resolve()
        self.mirrors = dict(mirrors or {})
        self.registry = registry or self._registry_of_mirrors()
        self.bridge = bridge
        self.subnet = subnet
        self.network_name = network_name
        self.log_level = log_level
        self.config_file = self.directory / "config.toml"
        self.log_file = self.directory / "containerd.log"
        self.state_file = self.directory / "peer.json"
        self.socket = self.directory / "containerd.sock"
        self.runc_root = self.directory / "runc"
        digest = hashlib.sha256(str(self.directory).encode()).hexdigest()[:8]
        self.shim_socket_dir = Path(f"/run/pycrio-ctrd-{digest}")
        self.proc: subprocess.Popen[bytes] | None = None
        self._own_registry: TestRegistry | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pause_image(self) -> str:
        if not self.registry:
            raise RuntimeError("the pause image's registry is not known before start()")
        return f"{self.registry}/{PAUSE_REPOSITORY}:{PAUSE_TAG}"

    @property
    def pid(self) -> int | None:
        state = self._read_state()
        pid = state.get("containerd_pid")
        return int(pid) if pid and _alive(int(pid)) else None

    def start(self, timeout: float = 90.0) -> ContainerdPeer:
        """Config, pause image, containerd; returns once CRI answers and the pod network is ready."""
        for binary in (CONTAINERD, SHIM):
            if not binary.is_file():
                raise RuntimeError(f"{binary} not found: run `make peer-containerd`")
        if self.state_file.exists():
            self.stop()  # what a killed run left: this directory is ours alone
        self.directory.mkdir(parents=True, exist_ok=True)
        state: dict[str, object] = {}
        if not self.registry:
            self._own_registry = TestRegistry(self.directory / "registry").start()
            self.registry = self._own_registry.address
            assert self._own_registry.proc is not None
            state["registry_pid"] = self._own_registry.proc.pid
        self._write_state(state)
        self._push_pause_image()
        self._write_config()
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        with self.log_file.open("ab") as log:
            # Its own session: a Ctrl-C of the caller's terminal must not reach it mid-teardown.
            self.proc = subprocess.Popen([str(CONTAINERD), "--config", str(self.config_file)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        state["containerd_pid"] = self.proc.pid
        state["endpoint"] = self.endpoint
        self._write_state(state)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n{self._log_tail()}")
            if self.socket.exists() and self._network_ready():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd not ready on {self.endpoint} within {timeout}s:\n{self._log_tail()}")
            time.sleep(0.2)
        # Pulled now, so no pod pays for it (and it is pinned from the start).
        self.crictl("pull", self.pause_image, timeout=120)
        return self

    def stop(self) -> None:
        """Pods, containerd, leftover shims and containers, mounts, cgroups, bridge, own registry."""
        state = self._read_state()
        pid = state.get("containerd_pid")
        ids: set[str] = set()
        if pid and _alive(int(pid)) and self.socket.exists():
            for kind in ("pods", "ps"):
                listed = self.crictl(kind, "-q", *(["-a"] if kind == "ps" else []), check=False)
                ids.update(listed.stdout.split())
            removed = self.crictl("rmp", "-a", "-f", check=False, timeout=180)
            if removed.returncode != 0:
                say(f"crictl rmp -fa failed: {removed.stderr.strip()}")
        if pid:
            _terminate(int(pid), timeout=20)
        if self.proc is not None:
            self.proc.poll()  # reap our child
            self.proc = None
        ids.update(self._remove_runc_containers())
        for shim in self._shims():
            _terminate(shim, timeout=5, sig=signal.SIGKILL)
        self._unmount_all()
        shutil.rmtree(self.shim_socket_dir, ignore_errors=True)
        self._remove_cgroups(ids)
        self._remove_network_leftovers()
        if self._own_registry is not None:
            self._own_registry.stop()
            self._own_registry = None
        elif state.get("registry_pid"):
            _terminate(int(str(state["registry_pid"])), timeout=5)
        self.state_file.unlink(missing_ok=True)

    def crictl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The real crictl against this containerd."""
        cmd = [tool("crictl"), "--runtime-endpoint", self.endpoint, "--image-endpoint", self.endpoint,
               "--timeout", f"{int(timeout)}s", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
        if check and result.returncode != 0:
            raise RuntimeError(f"crictl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def process_tree(self) -> list[int]:
        """containerd and its shims (and nothing the shims run): what `containerd` costs in memory."""
        pid = self.pid
        return ([pid] if pid else []) + self._shims()

    # -- config ------------------------------------------------------------------------------

    def _registry_of_mirrors(self) -> str | None:
        for mirror in self.mirrors.values():
            return mirror.rpartition("://")[2].partition("/")[0]
        return None

    def _write_config(self) -> None:
        d = self.directory
        certs = d / "certs.d"
        shutil.rmtree(certs, ignore_errors=True)
        for host, mirror in self.mirrors.items():
            (certs / host).mkdir(parents=True)
            (certs / host / "hosts.toml").write_text(hosts_toml(host, mirror))
        certs.mkdir(exist_ok=True)
        net = d / "net.d"
        shutil.rmtree(net, ignore_errors=True)
        net.mkdir()
        (net / "10-ctrdpeer.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": self.network_name,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=2))
        for sub in ("root", "state", "tmp", "opt"):
            (d / sub).mkdir(exist_ok=True)
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        self.config_file.write_text(f"""# written by tests/conformance/peer_containerd.py
version = 3
root = {toml_str(str(d / "root"))}
state = {toml_str(str(d / "state"))}
temp = {toml_str(str(d / "tmp"))}
disabled_plugins = {json.dumps(list(DISABLED_PLUGINS))}

[grpc]
  address = {toml_str(str(self.socket))}

[ttrpc]
  address = {toml_str(str(self.socket) + ".ttrpc")}

[debug]
  address = {toml_str(str(d / "debug.sock"))}
  level = {toml_str(self.log_level)}

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = {toml_str(str(d / "opt"))}

  [plugins.'io.containerd.nri.v1.nri']
    disable = true
    socket_path = {toml_str(str(d / "nri.sock"))}

  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = {toml_str(str(self.shim_socket_dir / "s"))}

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = {toml_str(self.pause_image)}
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = {toml_str(str(certs))}

  [{runtime}]
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    enable_selinux = false
    disable_apparmor = true
    [{runtime}.containerd]
      default_runtime_name = "runc"
      [{runtime}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [{runtime}.containerd.runtimes.runc.options]
          BinaryName = {toml_str(RUNC)}
          Root = {toml_str(str(self.runc_root))}
          SystemdCgroup = false
    [{runtime}.cni]
      bin_dirs = [{toml_str(CNI_BIN_DIR)}]
      conf_dir = {toml_str(str(net))}
      max_conf_num = 1
""")

    # -- pause image -------------------------------------------------------------------------

    def _push_pause_image(self) -> None:
        """Build (once per directory) and push the sandbox image: static catatonit as /pause -P."""
        layout = self.directory / "pause-image"
        image = f"{layout}:pause"
        if not (layout / "index.json").exists():
            shutil.rmtree(layout, ignore_errors=True)
            bundle = self.directory / "pause-bundle"
            shutil.rmtree(bundle, ignore_errors=True)
            _run("umoci", "init", "--layout", str(layout))
            _run("umoci", "new", "--image", image)
            _run("umoci", "unpack", "--image", image, str(bundle))
            shutil.copy2(CATATONIT, bundle / "rootfs" / "pause")
            _run("umoci", "repack", "--image", image, str(bundle))
            _run("umoci", "config", "--image", image, "--os", "linux", "--architecture", "amd64",
                 "--config.entrypoint=/pause", "--config.entrypoint=-P", "--config.user=65535:65535")
            shutil.rmtree(bundle)
        _run("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{image}", f"docker://{self.pause_image}")

    # -- teardown helpers --------------------------------------------------------------------

    def _network_ready(self) -> bool:
        try:
            info = self.crictl("info", check=False, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        if info.returncode != 0:
            return False
        conditions = json.loads(info.stdout).get("status", {}).get("conditions", [])
        return any(c.get("type") == "NetworkReady" and c.get("status") for c in conditions)

    def _remove_runc_containers(self) -> set[str]:
        """Kill and delete what is left in our runc root (a killed run); their ids."""
        root = self.runc_root / NAMESPACE
        if not root.is_dir():
            return set()
        listed = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True)
        ids = set(listed.stdout.split())
        for cid in ids:
            subprocess.run([RUNC, "--root", str(root), "delete", "-f", cid], capture_output=True)
        return ids

    def _shims(self) -> list[int]:
        """Pids of containerd-shim-runc-v2 processes serving this instance (`-address <our socket>`)."""
        pids = []
        for pid in procfs.all_pids():
            argv = procfs.argv(pid)
            if not argv or not argv[0].endswith(b"containerd-shim-runc-v2"):
                continue
            if b"-address" in argv and argv.index(b"-address") + 1 < len(argv):
                if argv[argv.index(b"-address") + 1] == str(self.socket).encode():
                    pids.append(pid)
        return pids

    def _unmount_all(self) -> None:
        """Lazily unmount everything below our directory (rootfs, shm, netns), deepest first."""
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = _unescape(line.split()[4])
                if point == str(self.directory) or point.startswith(f"{self.directory}/"):
                    mounts.append(point)
        for point in sorted(set(mounts), key=lambda p: -p.count("/")):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def _remove_cgroups(self, ids: set[str]) -> None:
        """Cgroups runc made for our pods and containers that are still there, and an empty /k8s.io."""
        if not CGROUP_FS.is_dir():
            return
        hierarchies = [h for h in [CGROUP_FS, *CGROUP_FS.iterdir()] if h.is_dir() and not h.is_symlink()]
        for hierarchy in hierarchies:
            for cid in ids:
                for found in [hierarchy / NAMESPACE / cid, *hierarchy.glob(f"*/{cid}")]:
                    _rmdir_tree(found)
            try:
                (hierarchy / NAMESPACE).rmdir()  # refused while another containerd's pods live there
            except OSError:
                pass

    def _remove_network_leftovers(self) -> None:
        """The bridge; iptables rules and chains CNI made for our network and never deleted (a pod
        whose CNI DEL did not run); libcni's cached results for it."""
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        marker = f'name: \\"{self.network_name}\\"'
        for table in ("nat", "filter"):
            dump = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
            chains = set()
            for line in dump.splitlines():
                if not line.startswith("-A ") or marker not in line:
                    continue
                words = line.split()
                if "-j" in words and words[words.index("-j") + 1].startswith("CNI-") and \
                        not words[words.index("-j") + 1].startswith(("CNI-HOSTPORT", "CNI-FORWARD", "CNI-ADMIN")):
                    chains.add(words[words.index("-j") + 1])
                subprocess.run(["iptables", "-t", table, "-D", *shlex.split(line[3:])], capture_output=True)
            for chain in sorted(chains):
                subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
                subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
        for cached in CNI_RESULTS.glob(f"{self.network_name}-*"):
            cached.unlink(missing_ok=True)

    # -- state -------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, object]:
        try:
            state: dict[str, object] = json.loads(self.state_file.read_text())
            return state
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict[str, object]) -> None:
        self.state_file.write_text(json.dumps(state) + "\n")

    def _log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _terminate(pid: int, timeout: float, sig: int = signal.SIGTERM) -> None:
    """`sig`, then SIGKILL after `timeout`; reaps it if it is our child."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid):
        _reap(pid)
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
        time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _rmdir_tree(directory: Path) -> None:
    if not directory.is_dir():
        return
    for child in [p for p in directory.iterdir() if p.is_dir()]:
        _rmdir_tree(child)
    for _ in range(20):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _unescape(field: str) -> str:
    """A mountinfo path: octal escapes (\\040 for a space) back to characters."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, default=ROOT / "build" / "peer-containerd", help="everything of this peer")
    parser.add_argument("--mirror", action="append", default=[], metavar="HOST=ADDR[/PATH]",
                        help="serve HOST's images from ADDR[/PATH] (plain HTTP), e.g. "
                             "registry.k8s.io=127.0.0.1:5000/registry.k8s.io; repeatable")
    parser.add_argument("--registry", help="where to push the pause image (default: the first mirror's, "
                                           "else a docker-registry of the peer's own under --dir)")
    args = parser.parse_args(argv)
    mirrors = {}
    for item in args.mirror:
        host, sep, location = item.partition("=")
        if not sep or not host or not location:
            parser.error(f"--mirror wants HOST=ADDR[/PATH], not {item!r}")
        mirrors[host] = location
    peer = ContainerdPeer(args.dir, mirrors, registry=args.registry)
    if args.command == "stop":
        peer.stop()
        say(f"stopped; state left in {peer.directory} (logs, images)")
        return 0
    peer.start()
    say(f"containerd {peer.pid} serving CRI on {peer.endpoint} (log {peer.log_file}, pause {peer.pause_image})")
    say(f"try: crictl --runtime-endpoint {peer.endpoint} version; stop: {sys.executable} -m "
        f"tests.conformance.peer_containerd stop --dir {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

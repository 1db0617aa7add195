"""CNI (spec 1.0) for pods: the lexically first valid network of `network_dir`, plugin by plugin.

ADD runs the list in order, each plugin's result becoming the next one's `prevResult`; DEL runs it
in reverse with the cached ADD result. The loopback plugin brings `lo` up on every ADD, apart from
the network (as CRI-O and containerd do). Each ADD is cached in `cache_dir/<pod id>.json` with the
exact network config and runtime arguments used, so a DEL after a daemon restart or a config change
undoes what that ADD did.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import grpc

from pycrio import durable
from pycrio.errors import AlreadyExists, CRIError, InvalidArgument
from pycrio.locks import KeyedLocks
from pycrio.network.namespaces import is_namespace, pin_namespaces, run_in_netns, unpin_namespaces
from pycrio.tracing import step_span

log = logging.getLogger("pycrio.network")

CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
POD_IFNAME = "eth0"
LOOPBACK_PLUGIN: dict[str, Any] = {"type": "loopback"}
_CACHE_KIND = "pycrio-cni-v1"
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_EXTRA_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NetworkError(CRIError):
    """A CNI plugin failed, or no usable CNI network is configured.

    A plugin failure is UNKNOWN: its cause (IP pool exhausted, iptables busy, a plugin bug) is the
    plugin's, and CRI-O and containerd surface it the same way. A missing or unusable network
    configuration is FAILED_PRECONDITION: the node is not ready for pods until one is installed.
    """

    code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        plugin: str | None = None,
        cni_code: int | None = None,
        details: str = "",
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message, code)
        self.plugin = plugin
        self.cni_code = cni_code
        self.details = details


@dataclass(frozen=True)
class PortMapping:
    """A CRI port mapping, handed to plugins with the `portMappings` capability (portmap)."""

    container_port: int
    host_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry


@dataclass(frozen=True)
class PodNetworkRequest:
    """What ADD needs to know about a pod."""

    pod_id: str
    name: str
    namespace: str
    uid: str
    netns: Path
    port_mappings: list[PortMapping] = field(default_factory=list)


@dataclass(frozen=True)
class CNIInterface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass
class PodNetworkResult:
    """The pod's IPs (those on interfaces inside its netns, in the plugin's order) and the raw result."""

    ips: list[str]
    interfaces: list[CNIInterface]
    raw: dict[str, Any]

    @classmethod
    def from_cni(cls, raw: dict[str, Any]) -> PodNetworkResult:
        interfaces = [
            CNIInterface(str(i.get("name", "")), str(i.get("mac", "")), str(i.get("sandbox", "")))
            for i in raw.get("interfaces") or []
        ]
        return cls([cidr.split("/")[0] for cidr in _sandbox_cidrs(raw)], interfaces, raw)


@dataclass(frozen=True)
class Network:
    """One network configuration list, as plugins receive it."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": self.plugins}


@dataclass(frozen=True)
class _Attachment:
    """One pod on one network: what every plugin call for it gets."""

    pod_id: str
    network: Network
    netns: str
    cni_args: str
    capability_args: dict[str, Any]
    ifname: str = POD_IFNAME

    def loopback(self) -> _Attachment:
        net = Network("cni-loopback", self.network.cni_version, [LOOPBACK_PLUGIN])
        return replace(self, network=net, capability_args={}, ifname="lo")


def _sandbox_cidrs(result: dict[str, Any] | None) -> list[str]:
    """Addresses (with prefix) of the result's interfaces that live in the pod's netns."""
    if not result:
        return []
    interfaces = result.get("interfaces") or []
    inside = {n for n, i in enumerate(interfaces) if i.get("sandbox")}
    if "ips" not in result and "ip4" in result:  # results of spec 0.1/0.2
        return [r["ip"] for r in (result.get("ip4"), result.get("ip6")) if r and r.get("ip")]
    return [
        ip["address"]
        for ip in result.get("ips") or []
        if ip.get("address") and (ip.get("interface") is None or ip["interface"] in inside)
    ]


def _cni_args(pod: PodNetworkRequest) -> str:
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod.namespace),
        ("K8S_POD_NAME", pod.name),
        ("K8S_POD_INFRA_CONTAINER_ID", pod.pod_id),
        ("K8S_POD_UID", pod.uid),
    ]
    for key, value in pairs:
        if ";" in value or "=" in value:
            raise InvalidArgument(f"{key} {value!r} cannot be passed to CNI plugins (contains ';' or '=')")
    return ";".join(f"{k}={v}" for k, v in pairs)


def _capability_args(pod: PodNetworkRequest) -> dict[str, Any]:
    for m in pod.port_mappings:
        if not (0 < m.container_port < 65536 and 0 < m.host_port < 65536):
            raise InvalidArgument(f"invalid port mapping {m.host_port}->{m.container_port}")
        if m.protocol.lower() not in ("tcp", "udp", "sctp"):
            raise InvalidArgument(f"invalid port mapping protocol {m.protocol!r}")
    return {"portMappings": [m.to_cni() for m in pod.port_mappings]} if pod.port_mappings else {}


def _plugin_config(
    network: Network, plugin: dict[str, Any], prev_result: dict[str, Any] | None, capability_args: dict[str, Any]
) -> dict[str, Any]:
    """The stdin of one plugin: its own config plus name, version, runtimeConfig and prevResult."""
    conf = dict(plugin)
    conf["name"] = network.name
    conf["cniVersion"] = network.cni_version
    wanted = plugin.get("capabilities") or {}
    runtime = {cap: capability_args[cap] for cap, on in wanted.items() if on and cap in capability_args}
    if runtime:
        conf["runtimeConfig"] = runtime
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


def _plugin_error(plugin: str, command: str, pod_id: str, done: subprocess.CompletedProcess[bytes]) -> NetworkError:
    """The plugin's error JSON ({code, msg, details}) as a NetworkError; stderr when it printed none."""
    out = done.stdout.decode(errors="replace").strip()
    err = done.stderr.decode(errors="replace").strip()
    try:
        payload = json.loads(out)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "msg" in payload:
        msg, details, code = str(payload["msg"]), str(payload.get("details") or ""), payload.get("code")
    else:
        msg, details, code = err or out or f"exit status {done.returncode}", "", None
    text = f'CNI plugin "{plugin}" {command} failed for pod {pod_id}: {msg}' + (f": {details}" if details else "")
    return NetworkError(text, plugin=plugin, cni_code=code if isinstance(code, int) else None, details=details)


def parse_network_file(path: Path) -> Network:
    """A .conflist, or a single-plugin .conf/.json turned into a list; ValueError says what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "plugins" in data:
        plugins = data["plugins"]
    elif "type" in data:
        plugins = [{k: v for k, v in data.items() if k not in ("name", "cniVersion")}]
    else:
        raise ValueError("neither a plugin list ('plugins') nor a plugin ('type')")
    if not isinstance(plugins, list) or not plugins:
        raise ValueError("'plugins' must be a non-empty list")
    for plugin in plugins:
        ptype = plugin.get("type") if isinstance(plugin, dict) else None
        if not isinstance(ptype, str) or not ptype or "/" in ptype or ptype in (".", ".."):
            raise ValueError(f"invalid plugin type {ptype!r}")
    name, version = data.get("name", path.stem), data.get("cniVersion")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid network name {name!r}")
    if not isinstance(version, str) or not version:
        raise ValueError("no cniVersion")
    return Network(name, version, plugins, path)


class CNIManager:
    """Attach pods to, and detach them from, the node's CNI network."""

    def __init__(self, network_dir: Path, plugin_dirs: list[Path], cache_dir: Path, *, timeout: float = 120.0) -> None:
        self.network_dir = Path(network_dir)
        self.plugin_dirs = [Path(d) for d in plugin_dirs]
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self._versions: dict[tuple[str, int], list[str]] = {}
        self._locks = KeyedLocks()

    # -- configuration ------------------------------------------------------------------------

    def status(self) -> tuple[bool, str]:
        """(True, which network) when a valid network and its plugins are there, else (False, why)."""
        try:
            network = self.load_network()
        except NetworkError as exc:
            return False, exc.message
        return True, f"CNI network {network.name!r} from {network.path}"

    def load_network(self) -> Network:
        """The lexically first valid network of network_dir; invalid files are skipped, as CRI-O does."""
        problems = []
        for path in self._config_files():
            try:
                network = parse_network_file(path)
                self._check_plugins(network)
                return network
            except (ValueError, NetworkError) as exc:
                log.debug("skipping CNI config %s: %s", path, exc)
                problems.append(f"{path.name}: {exc}")
        if problems:
            message = f"No valid CNI configuration in {self.network_dir}/: " + "; ".join(problems)
        else:
            message = f"No CNI configuration file in {self.network_dir}/. Has your network provider started?"
        raise NetworkError(message, code=grpc.StatusCode.FAILED_PRECONDITION)

    def _config_files(self) -> list[Path]:
        try:
            entries = list(self.network_dir.iterdir())
        except OSError:
            return []
        return sorted(p for p in entries if p.suffix in CONFIG_EXTENSIONS and p.is_file())

    def find_plugin(self, plugin_type: str) -> Path | None:
        """The first executable `plugin_type` in plugin_dirs (CNI_PATH order)."""
        for directory in self.plugin_dirs:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None

    def _check_plugins(self, network: Network) -> None:
        """Every plugin of the list, and loopback, exists and speaks the list's cniVersion."""
        for ptype in [p["type"] for p in network.plugins] + [LOOPBACK_PLUGIN["type"]]:
            binary = self._require_plugin(ptype)
            supported = self._supported_versions(ptype, binary, network.cni_version)
            if network.cni_version not in supported:
                raise NetworkError(
                    f'CNI plugin "{ptype}" does not support cniVersion {network.cni_version} '
                    f"(supports {', '.join(supported)})",
                    plugin=ptype,
                )

    def _require_plugin(self, ptype: str) -> Path:
        binary = self.find_plugin(ptype)
        if binary is None:
            dirs = ", ".join(str(d) for d in self.plugin_dirs)
            raise NetworkError(
                f'CNI plugin "{ptype}" not found in {dirs}', plugin=ptype, code=grpc.StatusCode.FAILED_PRECONDITION
            )
        return binary

    def _supported_versions(self, ptype: str, binary: Path, version: str) -> list[str]:
        """CNI VERSION of a plugin, asked once per binary (kubelet polls Status every few seconds)."""
        key = (str(binary), binary.stat().st_mtime_ns)
        if key not in self._versions:
            env = {"PATH": os.environ.get("PATH", "") + ":" + _EXTRA_PATH, "CNI_COMMAND": "VERSION"}
            stdin = json.dumps({"cniVersion": version}).encode()
            try:
                done = subprocess.run([str(binary)], input=stdin, env=env, capture_output=True, timeout=self.timeout)
                supported = json.loads(done.stdout)["supportedVersions"]
            except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
                raise NetworkError(f'CNI plugin "{ptype}" ({binary}) does not answer VERSION', plugin=ptype) from None
            self._versions[key] = [str(v) for v in supported]
        return self._versions[key]

    # -- pod operations -----------------------------------------------------------------------

    def add(self, pod: PodNetworkRequest) -> PodNetworkResult:
        """Bring up `lo`, run ADD through the network's plugins and cache the result for DEL."""
        with step_span("cni_add", **{"pod.id": pod.pod_id}), self._locks.hold(pod.pod_id):
            if self._cache_path(pod.pod_id).exists():
                raise AlreadyExists(f"pod {pod.pod_id} is already attached to a CNI network")
            network = self.load_network()
            if not is_namespace(Path(pod.netns)):
                raise NetworkError(
                    f"{pod.netns} is not a network namespace (pod {pod.pod_id})",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                )
            att = _Attachment(pod.pod_id, network, str(pod.netns), _cni_args(pod), _capability_args(pod))
            log.info("adding pod %s_%s (%s) to CNI network %s", pod.namespace, pod.name, pod.pod_id, network.name)
            self._invoke(att.loopback(), "ADD", LOOPBACK_PLUGIN, None)
            result = self._add_all(att)
            return PodNetworkResult.from_cni(result)

    def _add_all(self, att: _Attachment) -> dict[str, Any]:
        """ADD through the list, then cache; on any failure DEL what was done so no IP leaks."""
        result: dict[str, Any] | None = None
        try:
            for plugin in att.network.plugins:
                result = self._invoke(att, "ADD", plugin, result)
            final = cast(dict[str, Any], result)  # ADD always returns a dict; the list is never empty
            self._write_cache(att, final)
            return final
        except BaseException:
            for plugin in reversed(att.network.plugins):
                try:
                    self._invoke(att, "DEL", plugin, result)
                except NetworkError as exc:
                    log.warning("pod %s: cleaning up after a failed ADD: %s", att.pod_id, exc.message)
            raise

    def delete(self, pod_id: str, netns: Path | None) -> None:
        """Run DEL for the pod (reverse order, cached ADD result); no netns or no cache is fine."""
        with step_span("cni_del", **{"pod.id": pod_id}), self._locks.hold(pod_id):
            live = netns is not None and is_namespace(netns)
            record = self._read_cache(pod_id)
            if record is not None:
                att, prev = self._attachment_from_cache(record), record.get("result")
            else:
                try:
                    network = self.load_network()
                except NetworkError:
                    log.info("pod %s: no cached CNI attachment and no CNI network: nothing to delete", pod_id)
                    return
                args = f"IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID={pod_id}"
                att, prev = _Attachment(pod_id, network, "", args, {}), None
            log.info("removing pod %s from CNI network %s", pod_id, att.network.name)
            standin = None if live else self._standin_netns(pod_id, att.ifname, prev)
            att = replace(att, netns=str(netns) if live else str(standin or ""))
            try:
                for plugin in reversed(att.network.plugins):
                    self._invoke(att, "DEL", plugin, prev)
            finally:
                if standin is not None:
                    unpin_namespaces(standin.parent)
            if live:
                try:
                    self._invoke(att.loopback(), "DEL", LOOPBACK_PLUGIN, None)
                except NetworkError as exc:  # lo goes away with the netns anyway
                    log.warning("pod %s: %s", pod_id, exc.message)
            self._cache_path(pod_id).unlink(missing_ok=True)

    def cached_result(self, pod_id: str) -> PodNetworkResult | None:
        """The result of the pod's last successful ADD (survives daemon restarts), if any."""
        record = self._read_cache(pod_id)
        return PodNetworkResult.from_cni(record["result"]) if record else None

    # -- plugin execution ---------------------------------------------------------------------

    def _invoke(
        self, att: _Attachment, command: str, plugin: dict[str, Any], prev_result: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Run one plugin; ADD returns its result, other commands None. Failures raise NetworkError."""
        ptype = plugin["type"]
        binary = self._require_plugin(ptype)
        stdin = json.dumps(_plugin_config(att.network, plugin, prev_result, att.capability_args)).encode()
        log.debug("running CNI plugin %s %s for pod %s", ptype, command, att.pod_id)
        try:
            done = subprocess.run(
                [str(binary)], input=stdin, env=self._env(att, command), capture_output=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            raise NetworkError(
                f'CNI plugin "{ptype}" {command} for pod {att.pod_id} timed out after {self.timeout:g}s', plugin=ptype
            ) from None
        except OSError as exc:
            raise NetworkError(f'CNI plugin "{ptype}" could not be run: {exc}', plugin=ptype) from None
        if done.returncode != 0:
            raise _plugin_error(ptype, command, att.pod_id, done)
        if command != "ADD":
            return None
        try:
            result = json.loads(done.stdout)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise NetworkError(
                f'CNI plugin "{ptype}" ADD for pod {att.pod_id} printed no result: {done.stdout[:200]!r}', plugin=ptype
            )
        return result

    def _env(self, att: _Attachment, command: str) -> dict[str, str]:
        # Plugins run iptables and friends: keep our environment (PATH), but no stray CNI_* of ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env["PATH"] = env.get("PATH", "") + ":" + _EXTRA_PATH
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=att.pod_id,
            CNI_NETNS=att.netns,
            CNI_IFNAME=att.ifname,
            CNI_ARGS=att.cni_args,
            CNI_PATH=os.pathsep.join(str(d) for d in self.plugin_dirs),
        )
        return env

    def _standin_netns(self, pod_id: str, ifname: str, result: dict[str, Any] | None) -> Path | None:
        """A throwaway netns with `ifname` holding the pod's old addresses, for DEL once its netns is gone.

        The bridge plugin finds which ipMasq rules to delete from the addresses on the pod's
        interface; without a netns it releases the IP but leaves those iptables rules behind
        (containernetworking/plugins#810).
        """
        cidrs = _sandbox_cidrs(result)
        if not cidrs:
            return None
        directory = self.cache_dir / "standin" / pod_id
        try:
            net = pin_namespaces(directory, ("net",))["net"]
            script = f"link add {ifname} type veth peer name standin0\n"
            script += "".join(f"addr add {cidr} dev {ifname}\n" for cidr in cidrs)
            done = run_in_netns(net, ["ip", "-batch", "-"], input=script)
            if done.returncode != 0:
                raise CRIError(done.stderr.strip())
            return net
        except (CRIError, OSError, subprocess.SubprocessError) as exc:
            log.warning("pod %s: no stand-in netns for DEL (%s); plugin rules may remain", pod_id, exc)
            unpin_namespaces(directory)
            return None

    # -- cache --------------------------------------------------------------------------------

    def _cache_path(self, pod_id: str) -> Path:
        if not pod_id or "/" in pod_id or pod_id.startswith("."):
            raise InvalidArgument(f"invalid pod id {pod_id!r}")
        return self.cache_dir / f"{pod_id}.json"

    def _write_cache(self, att: _Attachment, result: dict[str, Any]) -> None:
        record = {
            "kind": _CACHE_KIND,
            "podId": att.pod_id,
            "ifName": att.ifname,
            "netns": att.netns,
            "cniArgs": att.cni_args,
            "capabilityArgs": att.capability_args,
            "configPath": str(att.network.path or ""),
            "network": att.network.as_dict(),
            "result": result,
        }
        path = self._cache_path(att.pod_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_atomic(path, json.dumps(record))  # a DEL after a crash needs all of it

    def _read_cache(self, pod_id: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._cache_path(pod_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("pod %s: unreadable CNI cache (%s): using the current network config", pod_id, exc)
            return None
        return record if isinstance(record, dict) and record.get("kind") == _CACHE_KIND else None

    @staticmethod
    def _attachment_from_cache(record: dict[str, Any]) -> _Attachment:
        net = record["network"]
        path = Path(record["configPath"]) if record.get("configPath") else None
        network = Network(net["name"], net["cniVersion"], net["plugins"], path)
        return _Attachment(
            record["podId"], network, record.get("netns", ""), record.get("cniArgs", ""),
            record.get("capabilityArgs") or {}, record.get("ifName", POD_IFNAME),
        )

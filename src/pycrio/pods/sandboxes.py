"""Pod sandbox lifecycle: pinned namespaces, pod files, CNI network, infra process when needed."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from pycrio.config import Config
from pycrio.cri import api_pb2
from pycrio.errors import CRIError, FailedPrecondition, InvalidArgument, NotFound
from pycrio.network.cni import CNIManager, PodNetworkRequest, PortMapping
from pycrio.network.namespaces import pin_namespaces, unmount_below, unpin_namespaces
from pycrio.oci import cgroups, spec
from pycrio.oci.runtime import ContainerHandle, SandboxHandle
from pycrio.pods.events import CREATED, DELETED, STARTED, STOPPED
from pycrio.pods.containers import ContainerManager, infra_handle, sandbox_info
from pycrio.pods.runtimes import RuntimeHandlers
from pycrio.state import SandboxRecord, StateStore
from pycrio.state.records import SANDBOX_NOTREADY, SANDBOX_READY, encode_message
from pycrio.tracing import step_span

log = logging.getLogger("pycrio.pods")

SHM_SIZE = "64m"
MAX_CPU_SHARES = 262144  # the kernel's (and kubelet's MilliCPUToShares') ceiling
CPU_PERIOD_RANGE_US = (1000, 1_000_000)
MIN_CPU_QUOTA_US = 1000
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_PAGE_SIZE = re.compile(r"^\d+[KMG]B$")
_UNIFIED_KEY = re.compile(r"^[a-z][a-z0-9_]*\.[a-z0-9_.]+$")


def sandbox_name(config: api_pb2.PodSandboxConfig) -> str:
    md = config.metadata
    return f"k8s_POD_{md.name}_{md.namespace}_{md.uid}_{md.attempt}"


def validate(config: api_pb2.PodSandboxConfig) -> None:
    md = config.metadata
    missing = [f for f in ("name", "namespace", "uid") if not getattr(md, f)]
    if not config.HasField("metadata") or missing:
        raise InvalidArgument(f"pod sandbox metadata must have name, namespace and uid (missing: {', '.join(missing) or 'metadata'})")
    # Before anything is made: a parent escaping the cgroup root raises ValueError (INVALID_ARGUMENT).
    cgroups.cgroups_path(config.linux.cgroup_parent, "", None)
    if not config.linux.cgroup_parent:  # pycrio makes the pod's cgroup and writes these to it
        for what in ("resources", "overhead"):
            if config.linux.HasField(what):
                validate_pod_resources(getattr(config.linux, what), f"pod sandbox linux.{what}")


def validate_pod_resources(r: api_pb2.LinuxContainerResources, what: str) -> None:
    """INVALID_ARGUMENT for values no cgroup takes. 0 means "not set"; a negative CPU quota is
    "unlimited" (kubelet sends -1, minus the overhead's quota when it subtracts that)."""
    problems = []
    if not 0 <= r.cpu_shares <= MAX_CPU_SHARES:
        problems.append(f"cpu_shares {r.cpu_shares} is outside 0..{MAX_CPU_SHARES}")
    if r.cpu_period and not CPU_PERIOD_RANGE_US[0] <= r.cpu_period <= CPU_PERIOD_RANGE_US[1]:
        problems.append(f"cpu_period {r.cpu_period} is outside {CPU_PERIOD_RANGE_US[0]}..{CPU_PERIOD_RANGE_US[1]} µs")
    if 0 < r.cpu_quota < MIN_CPU_QUOTA_US:
        problems.append(f"cpu_quota {r.cpu_quota} is below {MIN_CPU_QUOTA_US} µs")
    if r.memory_limit_in_bytes < 0:
        problems.append(f"memory_limit_in_bytes {r.memory_limit_in_bytes} is negative")
    if r.memory_swap_limit_in_bytes < -1:
        problems.append(f"memory_swap_limit_in_bytes {r.memory_swap_limit_in_bytes} is below -1")
    elif 0 < r.memory_swap_limit_in_bytes < r.memory_limit_in_bytes:
        problems.append(
            f"memory_swap_limit_in_bytes {r.memory_swap_limit_in_bytes} is below memory_limit_in_bytes "
            f"{r.memory_limit_in_bytes}"
        )
    for field in ("cpuset_cpus", "cpuset_mems"):
        value = getattr(r, field)
        if value and not _CPU_LIST.match(value):
            problems.append(f"{field} {value!r} is not a list like 0-3,7")
    for hugepage in r.hugepage_limits:
        if not _PAGE_SIZE.match(hugepage.page_size):
            problems.append(f"hugepage page_size {hugepage.page_size!r} is not like 2MB or 1GB")
    for key in r.unified:
        if not _UNIFIED_KEY.match(key):
            problems.append(f"unified key {key!r} is not a cgroup file name")
    if problems:
        raise InvalidArgument(f"{what}: {'; '.join(problems)}")


def pod_cgroup_resources(
    resources: api_pb2.LinuxContainerResources, overhead: api_pb2.LinuxContainerResources
) -> api_pb2.LinuxContainerResources:
    """What the pod's cgroup gets: the pod's resources plus its overhead, as kubelet sizes its own
    pod cgroups (`resources` is that sum with the overhead taken out). Unset stays unset."""
    total = api_pb2.LinuxContainerResources()
    total.CopyFrom(resources)
    total.ClearField("oom_score_adj")  # a process property, not a cgroup's
    if resources.cpu_shares:
        total.cpu_shares = min(MAX_CPU_SHARES, resources.cpu_shares + overhead.cpu_shares)
    if resources.cpu_quota < 0:
        total.cpu_quota = -1
    elif resources.cpu_quota > 0:
        total.cpu_quota = resources.cpu_quota + max(0, overhead.cpu_quota)
    if total.cpu_quota and not total.cpu_period:
        total.cpu_period = overhead.cpu_period
    if 0 < resources.memory_limit_in_bytes < cgroups.UNLIMITED:
        total.memory_limit_in_bytes = resources.memory_limit_in_bytes + overhead.memory_limit_in_bytes
        if resources.memory_swap_limit_in_bytes > 0:
            total.memory_swap_limit_in_bytes = resources.memory_swap_limit_in_bytes + overhead.memory_limit_in_bytes
    elif resources.memory_limit_in_bytes >= cgroups.UNLIMITED:
        total.memory_limit_in_bytes = -1
    return total


class SandboxManager:
    """Runs, stops and removes pod sandboxes."""

    def __init__(
        self,
        config: Config,
        state: StateStore,
        handlers: RuntimeHandlers,
        cni: CNIManager,
        containers: ContainerManager,
    ) -> None:
        self.state = state
        self.handlers = handlers
        self.cni = cni
        self.containers = containers
        self.events = containers.events
        self.directory = Path(config.runroot) / "pods"
        self.pod_cgroup_parent = config.runtime.pod_cgroup_parent.rstrip("/")
        # pods whose RunPodSandbox is still running: not listed yet (as containerd), or kubelet's
        # PLEG sees a NOTREADY sandbox appear and "die" before it is ready
        self.creating: set[str] = set()

    def run(self, config: api_pb2.PodSandboxConfig, runtime_handler: str) -> str:
        validate(config)
        handler = self.handlers.name_of(runtime_handler)
        runtime = self.handlers.get(handler)
        pod_id = secrets.token_hex(32)
        name = sandbox_name(config)
        self.state.reserve_name(name, pod_id)
        record = SandboxRecord(
            id=pod_id,
            config=encode_message(config),
            runtime_handler=handler,
            created_at=time.time_ns(),
            state=SANDBOX_NOTREADY,
            cgroup_parent=config.linux.cgroup_parent or f"{self.pod_cgroup_parent}/{pod_id}",
            owns_cgroup=not config.linux.cgroup_parent,
            directory=str(self.directory / pod_id),
            resources=encode_message(config.linux.resources) if config.linux.HasField("resources") else "",
            overhead=encode_message(config.linux.overhead) if config.linux.HasField("overhead") else "",
        )
        self.creating.add(pod_id)
        try:
            with self.state.locks.hold(pod_id):
                self._setup(record, config, runtime)
        except BaseException:
            if self._undo(record, runtime):
                self.state.remove_pod(pod_id)
            self.state.release_name(name)
            raise
        finally:
            self.creating.discard(pod_id)
        self.events.publish(pod_id, pod_id, CREATED)
        self.events.publish(pod_id, pod_id, STARTED)
        log.info("pod sandbox %s (%s/%s) ready, ip %s", pod_id, config.metadata.namespace, config.metadata.name,
                 ", ".join(record.ips) or "host network")
        return pod_id

    def _undo(self, record: SandboxRecord, runtime) -> bool:
        """Release what a failed RunPodSandbox made. False when something could not be: the record
        then stays (NOTREADY, with what is left) for RemovePodSandbox or the next start-up."""
        try:
            self._teardown(record)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("pod %s: undoing the failed RunPodSandbox is left for later: %s", record.id, exc)
            self.state.save_pod(record)
            return False
        try:
            runtime.remove_sandbox(sandbox_handle(record))
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("pod %s: removing its runtime side: %s", record.id, exc)
        try:
            self._delete_files(record)
        except OSError as exc:
            log.warning("pod %s: removing its files is left for later: %s", record.id, exc)
            self.state.save_pod(record)
            return False
        return True

    def _setup(self, record: SandboxRecord, config: api_pb2.PodSandboxConfig, runtime) -> None:
        directory = Path(record.directory)
        directory.mkdir(parents=True)
        self.state.save_pod(record)  # from here on a crash leaves a record restart can clean up
        if record.owns_cgroup and (record.resources or record.overhead):
            with step_span("set_pod_cgroup", **{"pod.id": record.id}):
                self._set_cgroup(record, record.pod_resources, record.pod_overhead)
        runtime.create_sandbox(sandbox_handle(record))
        opts = config.linux.security_context.namespace_options
        host_network = opts.network == api_pb2.NODE
        kinds = [] if host_network else ["net", "uts"]
        if opts.ipc != api_pb2.NODE:
            kinds.append("ipc")
        with step_span("create_namespaces", **{"pod.id": record.id, "kinds": ",".join(kinds)}):
            pinned = pin_namespaces(
                directory / "ns", kinds, hostname=config.hostname or None, sysctls=dict(config.linux.sysctls)
            ) if kinds else {}
        record.namespaces = {k: str(v) for k, v in pinned.items()}
        with step_span("pod_files", **{"pod.id": record.id}):
            self._write_files(directory, config)
            if opts.ipc != api_pb2.NODE:
                self._mount_shm(directory / "shm")
        self.state.save_pod(record)
        if not host_network:
            result = self.cni.add(
                PodNetworkRequest(
                    pod_id=record.id,
                    name=config.metadata.name,
                    namespace=config.metadata.namespace,
                    uid=config.metadata.uid,
                    netns=Path(record.namespaces["net"]),
                    port_mappings=[
                        PortMapping(
                            container_port=p.container_port,
                            host_port=p.host_port,
                            protocol={0: "tcp", 1: "udp", 2: "sctp"}.get(p.protocol, "tcp"),
                            host_ip=p.host_ip,
                        )
                        for p in config.port_mappings
                        if p.host_port
                    ],
                )
            )
            record.ips = list(result.ips)
            self._write_hosts(directory, config, record.ips)
        runtime.wait_sandbox(sandbox_handle(record))
        if opts.pid == api_pb2.POD:
            self._start_infra(record, runtime.for_sandbox(record.id))
        record.state = SANDBOX_READY
        record.complete = True
        self.state.save_pod(record)

    @staticmethod
    def _write_files(directory: Path, config: api_pb2.PodSandboxConfig) -> None:
        (directory / "hostname").write_text((config.hostname or os.uname().nodename) + "\n")
        dns = config.dns_config
        if dns.servers or dns.searches or dns.options:
            lines = [f"nameserver {s}" for s in dns.servers]
            if dns.searches:
                lines.append("search " + " ".join(dns.searches))
            if dns.options:
                lines.append("options " + " ".join(dns.options))
            (directory / "resolv.conf").write_text("\n".join(lines) + "\n")
        elif Path("/etc/resolv.conf").exists():
            shutil.copyfile("/etc/resolv.conf", directory / "resolv.conf")
        SandboxManager._write_hosts(directory, config, [])

    @staticmethod
    def _write_hosts(directory: Path, config: api_pb2.PodSandboxConfig, ips: list[str]) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        hostname = config.hostname or config.metadata.name
        lines += [f"{ip}\t{hostname}" for ip in ips]
        (directory / "hosts").write_text("\n".join(lines) + "\n")

    @staticmethod
    def _mount_shm(path: Path) -> None:
        path.mkdir(exist_ok=True)
        _run(["mount", "-t", "tmpfs", "-o", f"mode=1777,size={SHM_SIZE},nosuid,nodev,noexec", "shm", str(path)])

    def _start_infra(self, record: SandboxRecord, runtime) -> None:
        """A catatonit process holding the pod's PID namespace (only when containers share it)."""
        infra_id = f"{record.id[:52]}infra"
        bundle = Path(record.directory) / "infra"
        rootfs = spec.infra_rootfs(bundle / "rootfs")
        oci_spec = spec.sandbox_infra_spec(sandbox_info(record), rootfs)
        (bundle / "config.json").write_text(json.dumps(oci_spec))
        record.infra_id = infra_id
        handle = infra_handle(runtime, record)
        self.state.save_pod(record)
        record.infra_pid = runtime.create(handle)
        runtime.start(handle)

    def _infra_handle(self, record: SandboxRecord) -> ContainerHandle:
        return infra_handle(self.handlers.for_pod(record.runtime_handler, record.id), record)

    def update_resources(
        self,
        pod_id: str,
        resources: api_pb2.LinuxContainerResources | None,
        overhead: api_pb2.LinuxContainerResources | None,
    ) -> None:
        """UpdatePodSandboxResources, kubelet's in-place pod resize: keep the pod-level resources
        (and overhead) given as the ones in effect, and write their sum to the pod's cgroup when
        pycrio made it. A cgroup kubelet gave as cgroup_parent is kubelet's: it writes it itself
        right after this call (before the containers' UpdateContainerResources when growing,
        after them when shrinking), as containerd and CRI-O leave it to kubelet too.
        A field left out keeps what was in effect."""
        for what, value in (("resources", resources), ("overhead", overhead)):
            if value is not None:
                validate_pod_resources(value, what)
        record = self.state.get_pod(pod_id)
        with self.state.locks.hold(record.id):
            record = self.state.get_pod(record.id)
            if record.state != SANDBOX_READY:
                raise FailedPrecondition(f"pod sandbox {record.id} is not ready: cannot update its resources")
            new_resources = resources if resources is not None else record.pod_resources
            new_overhead = overhead if overhead is not None else record.pod_overhead
            if record.owns_cgroup:
                with step_span("set_pod_cgroup", **{"pod.id": record.id}):
                    self._set_cgroup(record, new_resources, new_overhead)
            else:
                log.debug("pod sandbox %s: its cgroup %s is kubelet's: resources recorded, not written",
                          record.id, record.cgroup_parent)
            if resources is not None:
                record.resources = encode_message(resources)
            if overhead is not None:
                record.overhead = encode_message(overhead)
            self.state.save_pod(record)
        log.info("pod sandbox %s: resources updated", record.id)

    def _set_cgroup(
        self,
        record: SandboxRecord,
        resources: api_pb2.LinuxContainerResources | None,
        overhead: api_pb2.LinuxContainerResources | None,
    ) -> None:
        """Write resources + overhead to the pod cgroup pycrio made (all or nothing)."""
        total = pod_cgroup_resources(resources or api_pb2.LinuxContainerResources(),
                                     overhead or api_pb2.LinuxContainerResources())
        warnings: list[str] = []
        oci = spec.linux_resources(total, cgroups.detect_support(), warnings, container=f"pod {record.id}")
        for warning in warnings:
            log.warning("pod sandbox %s: %s", record.id, warning)
        path = cgroups.cgroups_path(record.cgroup_parent, record.id, None)
        # The infra process (a shared PID namespace) is pycrio's, not kubelet's: its cpuset follows the pod's.
        infra = (cgroups.cgroups_path(record.cgroup_parent, record.id, record.id),) if record.infra_id else ()
        try:
            cgroups.set_resources(path, oci, followers=infra)
        except cgroups.CgroupWriteError as exc:
            raise _refused(record.id, exc) from exc

    def stop(self, pod_id: str) -> None:
        """Stop every container, tear down network and namespaces; stopping twice is fine."""
        try:
            record = self.state.get_pod(pod_id)
        except NotFound:
            return
        with self.state.locks.hold(record.id):
            for container in self.state.containers_of(record.id):
                self.containers.stop(container.id, 0)
            failure: Exception | None = None
            try:
                self._teardown(record)
            except Exception as exc:  # noqa: BLE001 - the pod is stopped all the same; the caller retries
                failure = exc
            was_ready = record.state == SANDBOX_READY
            record.state = SANDBOX_NOTREADY
            self.state.save_pod(record)  # with what a retry still has to release
            if was_ready:
                self.events.publish(record.id, record.id, STOPPED)
            if failure is not None:
                raise failure
            log.info("pod sandbox %s stopped", record.id)

    def _teardown(self, record: SandboxRecord) -> None:
        """Release what a pod holds on the host, the network first (as CRI-O does).

        CNI DEL needs the pod's netns, its IPs and the cached ADD result: until DEL succeeded none
        of them is released (the netns stays pinned, `record.ips` and the CNI cache stay), so a
        retry runs DEL again instead of leaking the IP, the portmap rules and the cache. Every other
        step runs even if an earlier one failed (and tolerates having been done already); the
        first failure is raised at the end.
        """
        failures: list[Exception] = []

        def step(what: str, action: Callable[[], None]) -> bool:
            try:
                action()
                return True
            except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                log.warning("pod %s: %s: %s", record.id, what, exc)
                failures.append(exc)
                return False

        network_down = True
        net = record.namespaces.get("net")
        if net or record.ips:
            network_down = step(
                "CNI DEL", lambda: self.cni.delete(record.id, Path(net) if net and Path(net).exists() else None)
            )
            if network_down:
                record.ips = []
        if record.infra_id:
            step("removing the infra process", lambda: self._remove_infra(record))
        shm = Path(record.directory) / "shm"
        if os.path.ismount(shm):
            step("unmounting /dev/shm", lambda: _run(["umount", "-l", str(shm)]))
        if record.namespaces and network_down:  # a failed DEL runs again in this netns
            with step_span("remove_namespaces", **{"pod.id": record.id}):
                if step("unpinning namespaces", lambda: unpin_namespaces(Path(record.directory) / "ns")):
                    record.namespaces = {}
        if record.owns_cgroup:  # a kubelet-given parent is kubelet's to remove
            with step_span("remove_cgroup", **{"pod.id": record.id}):
                step("removing the pod cgroup", lambda: cgroups.remove_cgroup(record.cgroup_parent))
        if failures:
            raise failures[0]

    def _remove_infra(self, record: SandboxRecord) -> None:
        runtime = self.handlers.for_pod(record.runtime_handler, record.id)
        handle = self._infra_handle(record)
        try:
            runtime.stop(handle, 0)
        except NotFound:  # the runtime has no trace of it (a reboot took it): nothing to stop
            log.info("pod %s: infra container %s is already gone", record.id, record.infra_id)
        runtime.delete(handle)
        record.infra_pid = 0

    def remove(self, pod_id: str) -> None:
        """Stop the pod, remove its containers and everything it made; removing twice is fine."""
        try:
            record = self.state.get_pod(pod_id)
        except NotFound:
            return
        self.stop(record.id)
        with self.state.locks.hold(record.id):
            for container in self.state.containers_of(record.id):
                self.containers.remove(container.id)
            self.handlers.get(record.runtime_handler).remove_sandbox(sandbox_handle(record))
            with step_span("remove_pod_files", **{"pod.id": record.id}):
                self._delete_files(record)
            self.state.remove_pod(record.id)
            self.state.release_name(sandbox_name(record.pod_config))
            self.events.publish(record.id, record.id, DELETED)
            log.info("pod sandbox %s removed", record.id)

    def reconcile(self) -> None:
        """After a crash: remove pods whose RunPodSandbox never finished, with all they hold."""
        for record in self.state.list_pods():
            if record.complete:
                self.state.reserve_name(sandbox_name(record.pod_config), record.id)
                try:
                    self.handlers.get(record.runtime_handler).restore_sandbox(sandbox_handle(record))
                except CRIError as exc:
                    log.warning("pod sandbox %s: cannot reattach its runtime side: %s", record.id, exc)
                continue
            log.warning("pod sandbox %s was left half-created by an earlier run: removing it", record.id)
            try:
                try:  # its runtime side (a "pod" handler's monitor) may be running already
                    self.handlers.get(record.runtime_handler).remove_sandbox(sandbox_handle(record))
                except CRIError as exc:
                    log.warning("pod sandbox %s: releasing its runtime side: %s", record.id, exc)
                self._teardown(record)
                self._delete_files(record)
            except Exception as exc:  # noqa: BLE001 - the daemon starts; the record stays for the next try
                self.state.save_pod(record)
                log.warning("pod sandbox %s: cleaning it up failed, kept for the next try: %s", record.id, exc)
                continue
            self.state.remove_pod(record.id)

    @staticmethod
    def _delete_files(record: SandboxRecord) -> None:
        """Unmount whatever is still mounted below the pod's directory, then remove it."""
        directory = Path(record.directory)
        unmount_below(directory)
        if directory.exists():
            shutil.rmtree(directory)


def _refused(pod_id: str, exc: cgroups.CgroupWriteError) -> CRIError:
    """A value the kernel refused for the pod's cgroup, with what usually causes it."""
    name = exc.file.name
    what = f"pod sandbox {pod_id}: the kernel refused {name} = {exc.value} ({os.strerror(exc.errno or 0)})"
    if exc.errno == errno.ERANGE:  # CPUs or memory nodes this host does not have
        return InvalidArgument(f"{what}: out of range on this host")
    if exc.errno in (errno.EINVAL, errno.EBUSY, errno.EACCES, errno.ENOSPC):  # v1 cpuset: EACCES, ENOSPC
        if name.startswith("cpu.cfs") or name == "cpu.max":
            hint = "a container of the pod may have a higher CPU quota: lower the containers first, raise the pod first"
        elif name.startswith("memory."):
            hint = "the pod may use more memory than that, or a value is out of range"
        elif name.startswith("cpuset."):
            hint = ("a container of the pod may use CPUs or memory nodes outside that set, or the set is not "
                    "inside the parent cgroup's")
        else:
            hint = "the value is out of range for this kernel"
        return FailedPrecondition(f"{what}: {hint}")
    return CRIError(what)


def sandbox_handle(record: SandboxRecord) -> SandboxHandle:
    """What the pod's runtime is told about the pod (its sandbox hooks)."""
    return SandboxHandle(id=record.id, directory=Path(record.directory), cgroup_parent=record.cgroup_parent)


def _run(argv: list[str]) -> None:
    log.debug("running: %s", " ".join(argv))
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise CRIError(f"{' '.join(argv)} failed: {result.stderr.strip()}")

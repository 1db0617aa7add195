"""Container lifecycle: create (rootfs + spec + runtime), start, stop, remove, status refresh, exec."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

from pycrio.config import Config
from pycrio.cri import api_pb2
from pycrio.errors import CRIError, FailedPrecondition, InvalidArgument, NotFound
from pycrio.images import ImageManager, volumes
from pycrio.oci import cgroups, features, spec
from pycrio.oci.runtime import ContainerHandle, ExecResult, Runtime, RuntimeStatus
from pycrio.pods.events import CREATED, DELETED, STARTED, STOPPED, EventBus
from pycrio.pods.runtimes import RuntimeHandlers
from pycrio.state import ContainerRecord, SandboxRecord, StateStore
from pycrio.state.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    SANDBOX_READY,
    encode_message,
)
from pycrio.tracing import step_span

import grpc

log = logging.getLogger("pycrio.pods")


class DeadlineExceeded(CRIError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def container_name(config: api_pb2.ContainerConfig, pod: SandboxRecord) -> str:
    """kubelet's unique name for a container: k8s_<name>_<pod>_<namespace>_<uid>_<attempt>."""
    md, pmd = config.metadata, pod.pod_config.metadata
    return f"k8s_{md.name}_{pmd.name}_{pmd.namespace}_{pmd.uid}_{md.attempt}"


class ContainerManager:
    """Runs containers of pods through their pod's runtime handler."""

    def __init__(
        self, config: Config, state: StateStore, handlers: RuntimeHandlers, images: ImageManager, events: EventBus
    ) -> None:
        self.state = state
        self.handlers = handlers
        self.images = images
        self.events = events
        self.directory = Path(config.runroot) / "containers"
        self._stop_watching = threading.Event()

    def watch_exits(self, interval: float = 1.0) -> None:
        """Notice exits of running containers while nobody asks, so events go out promptly."""
        self._stop_watching.clear()

        def loop() -> None:
            # wait() returns False after each `interval`, True once stop_watching() is called.
            while not self._stop_watching.wait(interval):
                for record in self.state.list_containers(state=api_pb2.CONTAINER_RUNNING):
                    try:
                        with self.state.locks.hold(record.id):
                            self.refresh(record)
                    except Exception as exc:  # noqa: BLE001 - keep watching the others
                        log.debug("exit check of %s: %s", record.id, exc)

        threading.Thread(target=loop, name="exit-watcher", daemon=True).start()

    def reconcile(self) -> None:
        """After a crash: drop bundles and root filesystems of containers that were never recorded,
        and reserve the names of those that were."""
        known = {c.id for c in self.state.list_containers()}
        for record in self.state.list_containers():
            pod = self._pod_or_none(record.pod_id)
            if pod is not None:
                self.state.reserve_name(container_name(record.container_config, pod), record.id)
        for bundle in self.directory.glob("*") if self.directory.exists() else []:
            if bundle.name not in known:
                log.warning("container %s was left half-created by an earlier run: removing it", bundle.name)
                for runtime_name in self.handlers.names():
                    try:
                        self.handlers.get(runtime_name).delete(self._orphan_handle(bundle))
                    except CRIError:
                        pass
                self.images.release_rootfs(bundle.name)
                shutil.rmtree(bundle, ignore_errors=True)
        for rootfs in self.images.containers_dir.glob("*"):
            if rootfs.name not in known:
                self.images.release_rootfs(rootfs.name)

    @staticmethod
    def _orphan_handle(bundle: Path) -> ContainerHandle:
        return ContainerHandle(id=bundle.name, bundle=bundle, log_path=bundle / "orphan.log", state_dir=bundle / "conmon")

    def stop_watching(self) -> None:
        self._stop_watching.set()

    # --- helpers ---------------------------------------------------------------------------

    def handle(self, record: ContainerRecord) -> ContainerHandle:
        config = record.container_config
        return ContainerHandle(
            id=record.id,
            bundle=Path(record.bundle),
            log_path=Path(record.log_path),
            state_dir=Path(record.bundle) / "conmon",
            terminal=config.tty,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
            pod_id=record.pod_id,
        )

    def runtime(self, record: ContainerRecord) -> Runtime:
        return self.handlers.get(record.runtime_handler)

    # --- lifecycle -------------------------------------------------------------------------

    def create(
        self, pod_id: str, config: api_pb2.ContainerConfig, sandbox_config: api_pb2.PodSandboxConfig
    ) -> str:
        if not config.HasField("metadata") or not config.metadata.name:
            raise InvalidArgument("container config must have metadata with a name")
        if not config.image.image:
            raise InvalidArgument(f"container {config.metadata.name!r}: image must not be empty")
        pod = self.state.get_pod(pod_id)
        if pod.state != SANDBOX_READY:
            raise FailedPrecondition(f"pod sandbox {pod.id} is not ready: cannot create container {config.metadata.name!r}")
        image = self.images.lookup(config.image.image)
        if image is None:
            raise NotFound(f"image {config.image.image!r} is not present: pull it first")
        container_id = secrets.token_hex(32)
        name = container_name(config, pod)
        self.state.reserve_name(name, container_id)
        bundle = self.directory / container_id
        try:
            with self.state.locks.hold(container_id):
                return self._create(container_id, pod, config, sandbox_config, image.id, bundle)
        except BaseException:
            self._discard(container_id, bundle, pod.runtime_handler)
            self.state.release_name(name)
            raise

    def _create(
        self,
        container_id: str,
        pod: SandboxRecord,
        config: api_pb2.ContainerConfig,
        sandbox_config: api_pb2.PodSandboxConfig,
        image_id: str,
        bundle: Path,
    ) -> str:
        bundle.mkdir(parents=True)
        log_path = self._log_path(pod, config, container_id)
        with step_span("mount_rootfs", **{"container.id": container_id}):
            rootfs = self.images.prepare_rootfs(image_id, container_id)
        stored = api_pb2.ContainerConfig()
        stored.CopyFrom(config)
        image_sources = self._mount_image_volumes(container_id, stored)
        handler_features = features.of_runtime(self.handlers.get(pod.runtime_handler))
        image_config = json.loads(self.images.store.blobs.read(image_id))
        with step_span("generate_spec", **{"container.id": container_id}):
            oci_spec = spec.container_spec(
                container_id,
                config,
                sandbox_info(pod),
                spec.ImageConfig.from_image_config(image_config),
                rootfs,
                sandbox_config if sandbox_config.ByteSize() else pod.pod_config,
                rro_supported=handler_features.recursive_read_only_mounts,
                image_sources=image_sources,
            )
        (bundle / "config.json").write_text(json.dumps(oci_spec))
        user = oci_spec["process"]["user"]
        record = ContainerRecord(
            id=container_id,
            pod_id=pod.id,
            config=encode_message(stored),
            user=[user["uid"], user["gid"], *user.get("additionalGids", [])],
            image=config.image.image,
            image_ref=image_id,
            image_name=self._image_name(config.image.image, image_id),
            runtime_handler=pod.runtime_handler,
            created_at=time.time_ns(),
            log_path=str(log_path),
            bundle=str(bundle),
        )
        record.pid = self.runtime(record).create(self.handle(record))
        self.state.save_container(record)
        self.events.publish(container_id, pod.id, CREATED)
        log.info("created container %s (%s) in pod %s", container_id, config.metadata.name, pod.id)
        return container_id

    def _mount_image_volumes(self, container_id: str, config: api_pb2.ContainerConfig) -> dict[int, str]:
        """Mount the image volumes of `config` (read-only binds later); their image ids go into `config`."""
        sources: dict[int, str] = {}
        name = config.metadata.name
        for index, mount in enumerate(config.mounts):
            if not spec.is_image_mount(mount):
                continue
            spec.check_image_mount(mount, name)
            where = f"container {name!r}: image volume at {mount.container_path!r}"
            image = self.images.lookup(mount.image.image)
            if image is None:
                raise NotFound(f"{where}: image {mount.image.image!r} is not present: pull it first")
            with step_span("mount_image_volume", **{"container.id": container_id, "image.id": image.id}):
                rootfs = self.images.mount_image_volume(image, container_id, index)  # leased: RemoveImage refuses it
            sources[index] = str(volumes.sub_path_source(rootfs, mount.image_sub_path, where))
            mount.image.image_ref = image.id  # reported by ContainerStatus (the KEP's digest field)
        return sources

    def _image_name(self, requested: str, image_id: str) -> str:
        record = self.images.store.find_record(image_id)
        if record is None:
            return requested
        return (record.repo_tags or record.repo_digests or [requested])[0]

    @staticmethod
    def _log_path(pod: SandboxRecord, config: api_pb2.ContainerConfig, container_id: str) -> Path:
        directory = pod.pod_config.log_directory
        if directory and config.log_path:
            path = Path(directory) / config.log_path
        else:
            path = Path(pod.directory) / "logs" / f"{container_id}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _discard(self, container_id: str, bundle: Path, runtime_handler: str) -> None:
        """Undo a half-made container: runtime state, rootfs, bundle, record."""
        try:
            record = self.state.get_container(container_id)
            self.runtime(record).delete(self.handle(record))
        except CRIError:
            pass
        self.images.release_rootfs(container_id)
        shutil.rmtree(bundle, ignore_errors=True)
        self.state.remove_container(container_id)

    def start(self, container_id: str) -> None:
        record = self.state.get_container(container_id)
        with self.state.locks.hold(record.id):
            self.refresh(record)
            if record.state != CONTAINER_CREATED:
                raise FailedPrecondition(f"container {record.id} is {record.state}, not created: cannot start it")
            self.runtime(record).start(self.handle(record))
            record.state = CONTAINER_RUNNING
            record.started_at = time.time_ns()
            self.state.save_container(record)
            self.events.publish(record.id, record.pod_id, STARTED)
            log.info("started container %s", record.id)

    def stop(self, container_id: str, timeout: int) -> None:
        """Stop a container; stopping one that is stopped or gone is fine (CRI idempotence)."""
        try:
            record = self.state.get_container(container_id)
        except NotFound:
            return
        with self.state.locks.hold(record.id):
            self._stop(record, timeout)

    def _stop(self, record: ContainerRecord, timeout: int) -> None:
        self.refresh(record)
        if record.state in (CONTAINER_EXITED, CONTAINER_UNKNOWN):
            return
        self.runtime(record).stop(self.handle(record), timeout, self._stop_signal(record))
        self.refresh(record)

    def _stop_signal(self, record: ContainerRecord) -> int:
        image = self.images.store.find_record(record.image_ref)
        name = ""
        if image is not None:
            config = json.loads(self.images.store.blobs.read(image.config_digest))
            name = str(config.get("config", {}).get("StopSignal", ""))
        return parse_signal(name) or signal.SIGTERM

    def remove(self, container_id: str) -> None:
        """Stop (at once) and delete a container; removing one that is gone is fine."""
        try:
            record = self.state.get_container(container_id)
        except NotFound:
            return
        with self.state.locks.hold(record.id):
            self._stop(record, 0)
            self.runtime(record).delete(self.handle(record))
            with step_span("unmount_rootfs", **{"container.id": record.id}):
                self.images.release_rootfs(record.id)
                shutil.rmtree(record.bundle, ignore_errors=True)
            pod = self._pod_or_none(record.pod_id)
            if pod is not None:
                self.state.release_name(container_name(record.container_config, pod))
            self.state.remove_container(record.id)
            self.events.publish(record.id, record.pod_id, DELETED)
            log.info("removed container %s", record.id)

    def _pod_or_none(self, pod_id: str) -> SandboxRecord | None:
        try:
            return self.state.get_pod(pod_id)
        except NotFound:
            return None

    def refresh(self, record: ContainerRecord) -> ContainerRecord:
        """Bring the record up to date with the runtime (exits happen while nobody asks)."""
        if record.state not in (CONTAINER_CREATED, CONTAINER_RUNNING):
            return record
        try:
            status = self.runtime(record).status(self.handle(record))
        except NotFound:
            status = RuntimeStatus(
                state="stopped", exit_code=255, message="the runtime has no trace of this container any more"
            )
        changed = False
        if status.state == "stopped" and record.state != CONTAINER_EXITED:
            record.state = CONTAINER_EXITED
            record.exit_code = status.exit_code if status.exit_code is not None else -1
            record.finished_at = status.finished_at or time.time_ns()
            if not record.started_at:
                record.started_at = status.started_at or record.finished_at
            record.reason = "OOMKilled" if status.oom_killed else ("Completed" if record.exit_code == 0 else "Error")
            record.message = status.message
            changed = True
        elif status.state == "running" and record.state == CONTAINER_CREATED:
            record.state = CONTAINER_RUNNING
            record.started_at = status.started_at or time.time_ns()
            changed = True
        elif status.state == "unknown":
            record.state = CONTAINER_UNKNOWN
            changed = True
        if status.pid:
            record.pid = status.pid
        if changed:
            self.state.save_container(record)
            if record.state == CONTAINER_EXITED:
                self.events.publish(record.id, record.pod_id, STOPPED)
        return record

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        if not cmd:
            raise InvalidArgument("exec command must not be empty")
        record = self.refresh(self.state.get_container(container_id))
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state}, not running: cannot exec in it")
        result = self.runtime(record).exec_sync(self.handle(record), cmd, timeout or None)
        if result.timed_out:
            raise DeadlineExceeded(f"command {cmd!r} in container {record.id} timed out after {timeout}s")
        return result

    def update_resources(self, container_id: str, resources: api_pb2.LinuxContainerResources) -> None:
        record = self.refresh(self.state.get_container(container_id))
        if record.state not in (CONTAINER_CREATED, CONTAINER_RUNNING):
            raise FailedPrecondition(f"container {record.id} is {record.state}: cannot update its resources")
        warnings: list[str] = []
        oci = spec.linux_resources(resources, cgroups.detect_support(), warnings, container=record.id)
        for warning in warnings:
            log.warning("container %s: %s", record.id, warning)
        self.runtime(record).update_resources(self.handle(record), oci)

    def reopen_log(self, container_id: str) -> None:
        record = self.refresh(self.state.get_container(container_id))
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state}, not running: no log to reopen")
        self.runtime(record).reopen_log(self.handle(record))

    def stats(self, record: ContainerRecord) -> cgroups.CgroupStats | None:
        config = json.loads((Path(record.bundle) / "config.json").read_text())
        return cgroups.read_stats(config.get("linux", {}).get("cgroupsPath", ""))


def parse_signal(name: str) -> int | None:
    """An image's StopSignal ("SIGQUIT", "QUIT", "3") as a number."""
    name = name.strip().upper()
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals(name if name.startswith("SIG") else f"SIG{name}"))
    except ValueError:
        return None


def sandbox_info(pod: SandboxRecord) -> spec.SandboxInfo:
    """What the spec generator needs to know about a container's pod."""
    config = pod.pod_config
    opts = config.linux.security_context.namespace_options
    directory = Path(pod.directory)
    return spec.SandboxInfo(
        id=pod.id,
        name=config.metadata.name,
        namespace=config.metadata.namespace,
        uid=config.metadata.uid,
        hostname=config.hostname,
        cgroup_parent=pod.cgroup_parent,
        namespace_paths={kind_to_spec(k): v for k, v in pod.namespaces.items()},
        host_network=opts.network == api_pb2.NODE,
        host_ipc=opts.ipc == api_pb2.NODE,
        host_pid=opts.pid == api_pb2.NODE,
        resolv_conf=str(directory / "resolv.conf") if (directory / "resolv.conf").exists() else None,
        hosts_file=str(directory / "hosts") if (directory / "hosts").exists() else None,
        shm_path=str(directory / "shm") if os.path.ismount(directory / "shm") else None,
        pid_ns_path=f"/proc/{pod.infra_pid}/ns/pid" if pod.infra_pid else None,
    )


def kind_to_spec(kind: str) -> str:
    """Pinned namespace kinds (net, ipc, uts) as OCI spec namespace types (network, ipc, uts)."""
    return {"net": "network"}.get(kind, kind)

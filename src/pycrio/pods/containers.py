"""Container lifecycle: create (rootfs + spec + runtime), start, stop, remove, status, exec.

One owner per container state. Every change of a container's state is one call of `_apply()`,
made with that container's lock held, on the record as the store has it; records in the store
are never changed in place (a change saves a new record), so readers and the store's writer
always see a whole one. Container events are published by `_apply()` (STARTED, STOPPED) and by
create and remove (CREATED, DELETED) only, so each exit gives exactly one STOPPED event.

Exits arrive from the runtime (`exit_reported()`, called by its exit monitor) and are recorded
at once if the container's lock is free; otherwise the call holding it records them as it lets
go. So an exit never waits behind another container's lock (a StopContainer waiting out a grace
period delays no other exit), and readers (ContainerStatus, ListContainers, stats) bring a
record up to date only when its lock is free, else they return the record as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from pycrio import durable
from pycrio.config import Config
from pycrio.cri import api_pb2
from pycrio.errors import CRIError, FailedPrecondition, InvalidArgument, NotFound
from pycrio.images import ImageManager, volumes
from pycrio.images.store import ImageRecord
from pycrio.oci import cgroups, features, spec
from pycrio.oci.runtime import (
    EXEC_OUTPUT_LIMIT,
    STATE_CREATED,
    STATE_RUNNING,
    STATE_STOPPED,
    ContainerHandle,
    ExecResult,
    Runtime,
    RuntimeCommandError,
    RuntimeStatus,
)
from pycrio.pods.events import CREATED, DELETED, STARTED, STOPPED, EventBus
from pycrio.pods.runtimes import RuntimeHandlers
from pycrio.procfs import process_start_time, same_process
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
from pycrio.trash import Trash

log = logging.getLogger("pycrio.pods")

LIVE_STATES = (CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_UNKNOWN)
# What runc says when the kernel refuses a cgroup value on update (EINVAL, EBUSY).
_REFUSED_LIMIT_HINTS = ("invalid argument", "device or resource busy")
# Exits are events; this re-check only catches one a runtime could not report (no watch left).
SAFETY_RECHECK_SECONDS = 30.0


class DeadlineExceeded(CRIError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def container_name(config: api_pb2.ContainerConfig, pod: SandboxRecord) -> str:
    """kubelet's unique name for a container: k8s_<name>_<pod>_<namespace>_<uid>_<attempt>."""
    md, pmd = config.metadata, pod.pod_config.metadata
    return f"k8s_{md.name}_{pmd.name}_{pmd.namespace}_{pmd.uid}_{md.attempt}"


class ContainerManager:
    """Runs containers of pods through their pod's runtime; owns every container state change."""

    def __init__(
        self, config: Config, state: StateStore, handlers: RuntimeHandlers, images: ImageManager, events: EventBus
    ) -> None:
        self.state = state
        self.handlers = handlers
        self.images = images
        self.events = events
        self.directory = Path(config.runroot) / "containers"
        self.bundle_trash = Trash(Path(config.runroot) / ".trash")  # removed bundles, deleted in the background
        self._stop_watching = threading.Event()
        self._pending: set[str] = set()  # containers whose exit was reported and not yet recorded
        self._pending_lock = threading.Lock()
        self._held = threading.local()  # the container locks this thread holds (see _owning)
        self._retiring: queue.SimpleQueue[str] = queue.SimpleQueue()  # exited on their own, to retire
        self._retirer: threading.Thread | None = None
        self._retirer_lock = threading.Lock()

    # --- exits -----------------------------------------------------------------------------

    def watch_exits(self, recheck_interval: float = SAFETY_RECHECK_SECONDS) -> None:
        """Record exits as the runtimes report them, and re-check live containers every
        `recheck_interval` s in case a report was lost."""
        self.handlers.report_exits(self.exit_reported)
        self._stop_watching.clear()

        def loop() -> None:
            # wait() returns False after each `interval`, True once stop_watching() is called.
            while not self._stop_watching.wait(recheck_interval):
                for record in self.state.list_containers():
                    if record.state in LIVE_STATES:
                        self.exit_reported(record.id)

        threading.Thread(target=loop, name="exit-recheck", daemon=True).start()

    def stop_watching(self) -> None:
        self._stop_watching.set()
        self.handlers.report_exits(None)

    def exit_reported(self, container_id: str) -> None:
        """The runtime says `container_id` may have exited: record it now if its lock is free,
        else the holder records it as it lets go. Never waits; safe from any thread."""
        with self._pending_lock:
            self._pending.add(container_id)
        self._drain(container_id)

    def _drain(self, container_id: str) -> None:
        """Record the reported exit of `container_id`, unless another thread holds its lock
        (that thread drains after letting go, so no report is lost)."""
        if container_id in self._held_here():
            return  # reported from inside our own call: recorded when it lets go, not midway
        while True:
            with self._pending_lock:
                if container_id not in self._pending:
                    return
            with self.state.locks.try_hold(container_id) as held:
                if not held:
                    return
                with self._pending_lock:
                    if container_id not in self._pending:
                        continue
                    self._pending.discard(container_id)
                try:
                    self._observe(container_id)
                except NotFound:  # removed, or not a container of ours: a pod's infra process?
                    self.state.infra_exit_reported(container_id)
                except Exception as exc:  # noqa: BLE001 - the next report or the re-check retries
                    log.warning("recording the exit of container %s: %s", container_id, exc)

    @contextmanager
    def _owning(self, container_id: str, wait: bool = True) -> Iterator[bool]:
        """Hold the container's lock (or, with wait=False, only if it is free: yields whether
        it is held); exits reported meanwhile are recorded on the way out."""
        held_here = self._held_here()
        outermost = container_id not in held_here
        try:
            if wait:
                with self.state.locks.hold(container_id):
                    held_here.add(container_id)
                    try:
                        yield True
                    finally:
                        if outermost:
                            held_here.discard(container_id)
            else:
                with self.state.locks.try_hold(container_id) as held:
                    if held:
                        held_here.add(container_id)
                    try:
                        yield held
                    finally:
                        if held and outermost:
                            held_here.discard(container_id)
        finally:
            if outermost:
                self._drain(container_id)

    def _held_here(self) -> set[str]:
        held: set[str] | None = getattr(self._held, "ids", None)
        if held is None:
            held = self._held.ids = set()
        return held

    # --- restart ---------------------------------------------------------------------------

    def reconcile(self) -> None:
        """At start-up: take over the containers earlier runs made (report their exits, record
        those that happened meanwhile), reserve their names, and drop bundles and root
        filesystems of containers that were never recorded."""
        self.handlers.report_exits(self.exit_reported)
        self.bundle_trash.empty()
        self.images.trash.empty()
        known = {c.id for c in self.state.list_containers()}
        for record in self.state.list_containers():
            pod = self._pod_or_none(record.pod_id)
            if pod is not None:
                self.state.reserve_name(container_name(record.container_config, pod), record.id)
            if record.state in LIVE_STATES:
                try:
                    self.runtime(record).restore(self.handle(record))
                except CRIError as exc:
                    log.warning("container %s: cannot supervise it again: %s", record.id, exc)
        for bundle in self.directory.glob("*") if self.directory.exists() else []:
            if bundle.name not in known:
                log.warning("container %s was left half-created by an earlier run: removing it", bundle.name)
                for runtime_name in self.handlers.names():
                    runtime = self.handlers.get(runtime_name)
                    try:
                        runtime.delete(runtime.container_handle(bundle.name, bundle, bundle / "orphan.log"))
                    except CRIError:
                        pass
                self.images.release_rootfs(bundle.name)
                shutil.rmtree(bundle, ignore_errors=True)
        for rootfs in self.images.containers_dir.glob("*"):
            if rootfs.name not in known:
                self.images.release_rootfs(rootfs.name)
        for record in self.state.list_containers():
            if record.state in LIVE_STATES:
                self.exit_reported(record.id)  # exits that happened while no daemon watched
            elif record.state == CONTAINER_EXITED and not record.retired:
                self._retire_later(record.id)

    # --- helpers ---------------------------------------------------------------------------

    def handle(self, record: ContainerRecord) -> ContainerHandle:
        config = record.container_config
        return self.runtime(record).container_handle(
            record.id,
            Path(record.bundle),
            Path(record.log_path),
            pod_id=record.pod_id,
            terminal=config.tty,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
        )

    def runtime(self, record: ContainerRecord) -> Runtime:
        """The runtime instance that runs the containers of the record's pod."""
        return self.handlers.for_pod(record.runtime_handler, record.pod_id)

    def _record(self, container_id: str) -> ContainerRecord:
        """The stored record of exactly `container_id` (no prefix match)."""
        record = self.state.get_container(container_id)
        if record.id != container_id:
            raise NotFound(f"container {container_id!r} not found")
        return record

    def _pod_or_none(self, pod_id: str) -> SandboxRecord | None:
        try:
            return self.state.get_pod(pod_id)
        except NotFound:
            return None

    # --- the one place a container's state changes -----------------------------------------

    def _observe(self, container_id: str) -> ContainerRecord:
        """The record brought up to date with its runtime (the container's lock is held)."""
        record = self._record(container_id)
        if record.state == CONTAINER_EXITED:
            return record
        return self._apply(record, self._runtime_status(record))

    def _runtime_status(self, record: ContainerRecord) -> RuntimeStatus:
        try:
            return self.runtime(record).status(self.handle(record))
        except NotFound:
            return RuntimeStatus(
                STATE_STOPPED, exit_code=255, message="the runtime has no trace of this container any more"
            )

    def _apply(self, record: ContainerRecord, status: RuntimeStatus) -> ContainerRecord:
        """Make `record` (the stored one; its lock is held) say what the runtime says, save it
        and publish what changed. Times are the runtime's: started_at when it started the
        process, finished_at when it reaped it."""
        if record.state == CONTAINER_EXITED:
            return record  # final: nothing the runtime says later changes an exit
        if (
            status.state == STATE_RUNNING and record.state == CONTAINER_RUNNING and record.started_at
            and status.message == record.message and status.pid in (0, record.pid)
            and status.pid_start_time in (0, record.pid_start_time)
        ):  # fmt: skip
            return record  # the common case of every List and Status call: nothing new
        now = time.time_ns()
        if status.state == STATE_STOPPED:
            finished = status.finished_at or now
            started = min(status.started_at or record.started_at, finished)
            code = status.exit_code if status.exit_code is not None else -1
            reason = "OOMKilled" if status.oom_killed else ("Completed" if code == 0 else "Error")
            new = dataclasses.replace(
                record, state=CONTAINER_EXITED, exit_code=code, started_at=started, finished_at=finished,
                reason=reason, message=status.message,
            )  # fmt: skip
        elif status.state == STATE_RUNNING:
            new = dataclasses.replace(
                record, state=CONTAINER_RUNNING, started_at=status.started_at or record.started_at or now,
                message=status.message,
            )  # fmt: skip
        elif status.state == STATE_CREATED:
            new = dataclasses.replace(record, state=CONTAINER_CREATED, message=status.message)
        else:
            new = dataclasses.replace(record, state=CONTAINER_UNKNOWN, message=status.message)
        if status.pid and new.state != CONTAINER_EXITED:
            new.pid, new.pid_start_time = status.pid, status.pid_start_time or new.pid_start_time
        if new == record:
            return record
        self.state.save_container(new)
        if new.started_at and not record.started_at:
            self.events.publish(new.id, new.pod_id, STARTED)
        if new.state == CONTAINER_EXITED:
            self.events.publish(new.id, new.pod_id, STOPPED)
            self._retire_later(new.id)
        if new.state != record.state:
            log.debug("container %s: %s -> %s", new.id, record.state, new.state)
        return new

    # --- retirement: what the runtime holds for an exited container ---------------------------

    def _retire(self, record: ContainerRecord) -> ContainerRecord:
        """Let the runtime release an exited container (runtime delete: its state, cgroup and
        conmon; then its rootfs mounts), as containerd does on the exit event. Its record, log
        and writable layer stay until RemoveContainer. The container's lock is held."""
        if record.state != CONTAINER_EXITED or record.retired:
            return record
        try:
            self.runtime(record).delete(self.handle(record))
        except NotFound:
            pass  # the runtime has no trace of it already
        with step_span("unmount_rootfs", **{"container.id": record.id}):
            self.images.unmount_rootfs(record.id)
        retired = dataclasses.replace(record, retired=True)
        self.state.save_container(retired)
        return retired

    def _retire_later(self, container_id: str) -> None:
        """Retire `container_id` from the retirer thread (it exited on its own: nobody waits)."""
        self._retiring.put(container_id)
        with self._retirer_lock:
            if self._retirer is None or not self._retirer.is_alive():
                self._retirer = threading.Thread(target=self._retire_loop, name="container-retire", daemon=True)
                self._retirer.start()

    def _retire_loop(self) -> None:
        while True:
            container_id = self._retiring.get()
            try:
                with self._owning(container_id):
                    self._retire(self._record(container_id))
            except NotFound:
                pass  # removed meanwhile
            except Exception as exc:  # noqa: BLE001 - RemoveContainer deletes it again and reports errors
                log.warning("releasing the runtime state of exited container %s: %s", container_id, exc)

    # --- lifecycle -------------------------------------------------------------------------

    def create(
        self, pod_id: str, config: api_pb2.ContainerConfig, sandbox_config: api_pb2.PodSandboxConfig | None = None
    ) -> str:
        """Create a container in a ready pod. What the container may do (privilege, sysctls)
        comes from the pod as it was created, never from `sandbox_config`, the request's copy."""
        if not config.HasField("metadata") or not config.metadata.name:
            raise InvalidArgument("container config must have metadata with a name")
        if not config.image.image:
            raise InvalidArgument(f"container {config.metadata.name!r}: image must not be empty")
        pod = self.state.get_pod(pod_id)
        # The pod's lock: StopPodSandbox and RemovePodSandbox wait for this create (and it for
        # them), so no container is made in a pod being stopped, and none outlives its pod.
        with self.state.locks.hold(pod.id):
            pod = self.state.get_pod(pod.id)
            if pod.state != SANDBOX_READY:
                raise FailedPrecondition(
                    f"pod sandbox {pod.id} is not ready: cannot create container {config.metadata.name!r}"
                )
            image = self.images.lookup(config.image.image)
            if image is None:
                raise NotFound(f"image {config.image.image!r} is not present: pull it first")
            stop_signal = self._stop_signal_for(config, image)
            container_id = secrets.token_hex(32)
            log_path = container_log_path(pod, config, container_id)
            name = container_name(config, pod)
            self.state.reserve_name(name, container_id)
            bundle = self.directory / container_id
            try:
                with self._owning(container_id):
                    return self._create(container_id, pod, config, image, bundle, log_path, stop_signal)
            except BaseException:
                self._discard(container_id, bundle, pod)
                self.state.release_name(name)
                raise

    def _create(
        self,
        container_id: str,
        pod: SandboxRecord,
        config: api_pb2.ContainerConfig,
        image: ImageRecord,
        bundle: Path,
        log_path: Path,
        stop_signal: int,
    ) -> str:
        bundle.mkdir(parents=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with step_span("mount_rootfs", **{"container.id": container_id}):
            rootfs = self.images.prepare_rootfs(image.id, container_id)
        stored = api_pb2.ContainerConfig()
        stored.CopyFrom(config)
        image_sources = self._mount_image_volumes(container_id, stored)
        handler_features = features.of_runtime(self.handlers.get(pod.runtime_handler))
        image_config = json.loads(self.images.store.blobs.read(image.id))
        sandbox = container_sandbox_info(pod, self._pod_pid_namespace(pod))
        with step_span("generate_spec", **{"container.id": container_id}):
            oci_spec = spec.container_spec(
                container_id,
                config,
                sandbox,
                spec.ImageConfig.from_image_config(image_config),
                rootfs,
                pod.pod_config,
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
            image_ref=image.id,
            image_name=self._image_name(config.image.image, image),
            image_digest=image.repo_digests[0] if image.repo_digests else "",
            runtime_handler=pod.runtime_handler,
            created_at=time.time_ns(),
            log_path=str(log_path),
            bundle=str(bundle),
            stop_signal=stop_signal,
        )
        record.pid = self.runtime(record).create(self.handle(record))
        record.pid_start_time = process_start_time(record.pid)
        self.state.save_container(record)
        self.events.publish(container_id, pod.id, CREATED)
        log.info("created container %s (%s) in pod %s", container_id, config.metadata.name, pod.id)
        return container_id

    def _pod_pid_namespace(self, pod: SandboxRecord) -> str | None:
        """The PID namespace of the pod's infra process, once it is sure the stored pid still is
        that process (a recycled pid would put the container in a stranger's namespace)."""
        if not pod.infra_pid:
            return None
        start = pod.infra_pid_start
        if start:
            alive = same_process(pod.infra_pid, start)
        else:  # a record from before start times were kept: ask the runtime who its infra is
            runtime = self.handlers.for_pod(pod.runtime_handler, pod.id)
            try:
                status = runtime.status(infra_handle(runtime, pod))
            except CRIError:
                alive = False
            else:
                alive = status.state == STATE_RUNNING and status.pid == pod.infra_pid
        if not alive:
            raise FailedPrecondition(
                f"pod sandbox {pod.id}: its infra process (pid {pod.infra_pid}) is gone: "
                f"a container cannot join the pod's PID namespace"
            )
        return f"/proc/{pod.infra_pid}/ns/pid"

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

    @staticmethod
    def _image_name(requested: str, image: ImageRecord) -> str:
        return (image.repo_tags or image.repo_digests or [requested])[0]

    def _stop_signal_for(self, config: api_pb2.ContainerConfig, image: ImageRecord) -> int:
        """The signal StopContainer sends: the config's, else the image's StopSignal, else SIGTERM."""
        if config.stop_signal != api_pb2.SIGNAL_RUNTIME_DEFAULT:
            number = signal_number(config.stop_signal)
            if number is None:
                raise InvalidArgument(
                    f"container {config.metadata.name!r}: unknown stop signal {config.stop_signal}"
                )
            return number
        return self._image_stop_signal(image) or signal.SIGTERM

    def _image_stop_signal(self, image: ImageRecord | None) -> int | None:
        if image is None:
            return None
        config = json.loads(self.images.store.blobs.read(image.config_digest))
        return parse_signal(str(config.get("config", {}).get("StopSignal", "")))

    def _stop_signal(self, record: ContainerRecord) -> int:
        if record.stop_signal:
            return record.stop_signal
        return self._image_stop_signal(self.images.store.find_record(record.image_ref)) or signal.SIGTERM

    def _discard(self, container_id: str, bundle: Path, pod: SandboxRecord) -> None:
        """Undo a half-made container: runtime state, rootfs, bundle, record."""
        if (bundle / "config.json").exists():  # the runtime may have been asked to create it
            runtime = self.handlers.for_pod(pod.runtime_handler, pod.id)
            try:
                runtime.delete(runtime.container_handle(container_id, bundle, bundle / "discarded.log", pod_id=pod.id))
            except CRIError:
                pass
        self.images.release_rootfs(container_id)
        shutil.rmtree(bundle, ignore_errors=True)
        self.state.remove_container(container_id)

    def start(self, container_id: str) -> None:
        record = self.state.get_container(container_id)
        with self._owning(record.id):
            record = self._observe(record.id)
            if record.state != CONTAINER_CREATED:
                raise FailedPrecondition(f"container {record.id} is {record.state}, not created: cannot start it")
            self.runtime(record).start(self.handle(record))
            # What the runtime says now: running, or exited already (a short command).
            record = self._observe(record.id)
            log.info("started container %s", record.id)

    def stop(self, container_id: str, timeout: int) -> None:
        """Stop a container; stopping one that is stopped or gone is fine (CRI idempotence)."""
        try:
            record = self.state.get_container(container_id)
        except NotFound:
            return
        with self._owning(record.id):
            try:
                self._stop(record.id, timeout)
            except NotFound:
                return  # removed meanwhile

    def _stop(self, container_id: str, timeout: int) -> ContainerRecord:
        """Stop the container and retire it; it is stopped even when retiring fails (logged:
        RemoveContainer retries and reports it)."""
        record = self._observe(container_id)
        if record.state != CONTAINER_EXITED:
            # Created, running or unknown alike: the runtime signals whatever process there is.
            self.runtime(record).stop(self.handle(record), timeout, self._stop_signal(record))
            record = self._observe(container_id)
        try:
            return self._retire(record)
        except CRIError as exc:
            log.warning("container %s stopped, but its runtime state stays: %s", container_id, exc)
            return record

    def remove(self, container_id: str) -> None:
        """Stop (at once) and delete a container; removing one that is gone is fine."""
        try:
            record = self.state.get_container(container_id)
        except NotFound:
            return
        with self._owning(record.id):
            try:
                record = self._stop(record.id, 0)
            except NotFound:
                return
            if not record.retired:
                self.runtime(record).delete(self.handle(record))
            with step_span("remove_rootfs", **{"container.id": record.id}):
                self.images.release_rootfs(record.id)
                self.bundle_trash.discard(Path(record.bundle))
            pod = self._pod_or_none(record.pod_id)
            if pod is not None:
                self.state.release_name(container_name(record.container_config, pod))
            self.state.remove_container(record.id)
            self.events.publish(record.id, record.pod_id, DELETED)
            log.info("removed container %s", record.id)

    def refresh(self, record: ContainerRecord) -> ContainerRecord:
        """`record` up to date, for readers: asks the runtime only if nobody holds the
        container's lock (the holder updates it), so a reader never waits."""
        if record.state == CONTAINER_EXITED:
            return record
        with self._owning(record.id, wait=False) as held:
            try:
                return self._observe(record.id) if held else self._record(record.id)
            except NotFound:
                return record  # removed meanwhile: what the caller had

    def live_pid(self, record: ContainerRecord) -> int:
        """The container's init pid if it still is that process, else 0."""
        if record.state == CONTAINER_EXITED or not same_process(record.pid, record.pid_start_time):
            return 0
        return record.pid

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        """Run `cmd` in the container: at most EXEC_OUTPUT_LIMIT bytes of each stream are kept."""
        if not cmd:
            raise InvalidArgument("exec command must not be empty")
        record = self.refresh(self.state.get_container(container_id))
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state}, not running: cannot exec in it")
        result = self.runtime(record).exec_sync(self.handle(record), cmd, timeout or None, EXEC_OUTPUT_LIMIT)
        if result.timed_out:
            raise DeadlineExceeded(f"command {cmd!r} in container {record.id} timed out after {timeout}s")
        return result

    def update_resources(self, container_id: str, resources: api_pb2.LinuxContainerResources) -> None:
        record = self.state.get_container(container_id)
        with self._owning(record.id):
            record = self._observe(record.id)
            if record.state not in (CONTAINER_CREATED, CONTAINER_RUNNING):
                raise FailedPrecondition(f"container {record.id} is {record.state}: cannot update its resources")
            warnings: list[str] = []
            oci = spec.linux_resources(resources, cgroups.detect_support(), warnings, container=record.id)
            for warning in warnings:
                log.warning("container %s: %s", record.id, warning)
            try:
                self.runtime(record).update_resources(self.handle(record), oci)
            except RuntimeCommandError as exc:
                if not any(hint in exc.detail for hint in _REFUSED_LIMIT_HINTS):
                    raise
                # On cgroup v1 a container's CPU quota (or cpuset) must fit its pod's: kubelet's
                # in-place resize raises the pod cgroup before its containers and lowers it after.
                raise FailedPrecondition(
                    f"container {record.id}: the kernel refused the new limits ({exc.detail}): they may not "
                    f"fit the pod's cgroup: when growing raise the pod first (kubelet's pod cgroup, or "
                    f"UpdatePodSandboxResources for a pod pycrio made), when shrinking lower the containers first"
                ) from exc
            _merge_spec_resources(Path(record.bundle) / "config.json", oci)

    def reopen_log(self, container_id: str) -> None:
        record = self.refresh(self.state.get_container(container_id))
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state}, not running: no log to reopen")
        self.runtime(record).reopen_log(self.handle(record))

    def stats(self, record: ContainerRecord) -> cgroups.CgroupStats | None:
        return cgroups.read_stats(self.cgroup_path(record))

    def cgroup_path(self, record: ContainerRecord) -> str:
        """The container's cgroup: where the spec put it (the pod's cgroup parent, its id), known
        from the pod's record, so kubelet's stats polling parses no spec per container."""
        pod = self._pod_or_none(record.pod_id)
        if pod is not None:
            return cgroups.cgroups_path(pod.cgroup_parent, pod.id, record.id)
        config = json.loads((Path(record.bundle) / "config.json").read_text())
        return str(config.get("linux", {}).get("cgroupsPath", ""))


def _merge_spec_resources(path: Path, update: dict[str, Any]) -> None:
    """Keep the bundle's spec saying which resources are in effect after an update (ContainerStatus
    and the metrics read them there): each section of `update` over the spec's."""
    oci_spec = json.loads(path.read_text())
    current = oci_spec.setdefault("linux", {}).setdefault("resources", {})
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            current[key].update(value)
        else:
            current[key] = value
    durable.write_atomic(path, json.dumps(oci_spec))


def container_log_path(pod: SandboxRecord, config: api_pb2.ContainerConfig, container_id: str) -> Path:
    """Where the container's CRI log goes: `log_path` under the pod's log directory, refused
    (INVALID_ARGUMENT) when it is absolute or leads out of it, through `..` or a symlink."""
    directory = pod.pod_config.log_directory
    if not (directory and config.log_path):
        return Path(pod.directory) / "logs" / f"{container_id}.log"
    where = f"container {config.metadata.name!r}: log_path {config.log_path!r}"
    if os.path.isabs(config.log_path):
        raise InvalidArgument(f"{where} must be relative to the pod's log directory {directory}")
    base = Path(os.path.abspath(directory))
    path = Path(os.path.normpath(base / config.log_path))
    inside = path != base and path.is_relative_to(base)
    real_base = base.resolve()
    real = path.resolve()  # follows the symlinks that exist already
    if not inside or real == real_base or not real.is_relative_to(real_base):
        raise InvalidArgument(f"{where} leads out of the pod's log directory {directory}")
    return path


def parse_signal(name: str) -> int | None:
    """An image's StopSignal ("SIGQUIT", "QUIT", "3", "SIGRTMIN+3") as a number."""
    name = name.strip().upper()
    if not name:
        return None
    if name.isdigit():
        return int(name)
    name = name if name.startswith("SIG") else f"SIG{name}"
    for base, sign in (("SIGRTMIN+", 1), ("SIGRTMAX-", -1)):
        if name.startswith(base) and name[len(base):].isdigit():
            anchor = signal.SIGRTMIN if sign > 0 else signal.SIGRTMAX
            return int(anchor) + sign * int(name[len(base):])
    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


def signal_number(cri_signal: int) -> int | None:
    """A CRI Signal enum value (SIGNAL_SIGTERM, SIGNAL_SIGRTMINPLUS3...) as a signal number."""
    try:
        name = api_pb2.Signal.Name(cri_signal)
    except ValueError:
        return None
    name = name.removeprefix("SIGNAL_").replace("PLUS", "+").replace("MINUS", "-")
    return parse_signal(name)


def cri_signal(number: int) -> int:
    """A signal number as the CRI Signal enum (SIGNAL_RUNTIME_DEFAULT if it has no CRI name)."""
    if signal.SIGRTMIN < number < signal.SIGRTMAX:
        offset = number - signal.SIGRTMIN
        name = f"SIGRTMINPLUS{offset}" if offset <= 15 else f"SIGRTMAXMINUS{signal.SIGRTMAX - number}"
    else:
        try:
            name = signal.Signals(number).name
        except ValueError:
            return api_pb2.SIGNAL_RUNTIME_DEFAULT
    try:
        return api_pb2.Signal.Value(f"SIGNAL_{name}")
    except ValueError:
        return api_pb2.SIGNAL_RUNTIME_DEFAULT


def infra_handle(runtime: Runtime, pod: SandboxRecord) -> ContainerHandle:
    """The handle of the pod's infra process (when it shares a PID namespace), built by its runtime."""
    bundle = Path(pod.directory) / "infra"
    return runtime.container_handle(pod.infra_id, bundle, bundle / "infra.log", pod_id=pod.id)


def sandbox_info(pod: SandboxRecord, pid_ns_path: str | None = None) -> spec.SandboxInfo:
    """What the spec generator needs to know about a pod (for its infra process, and the base of
    what its containers get: container_sandbox_info)."""
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
        pid_ns_path=pid_ns_path,
    )


def container_sandbox_info(pod: SandboxRecord, pid_ns_path: str | None) -> spec.SandboxInfo:
    """The pod as its containers see it: its files (/etc/hostname too), and the privilege and
    sysctls it was created with (its record, not a request's copy of its config)."""
    config = pod.pod_config
    hostname_file = Path(pod.directory) / "hostname"
    return dataclasses.replace(
        sandbox_info(pod, pid_ns_path),
        hostname_file=str(hostname_file) if hostname_file.exists() else None,
        privileged=config.linux.security_context.privileged,
        sysctls=dict(config.linux.sysctls),
    )


def kind_to_spec(kind: str) -> str:
    """Pinned namespace kinds (net, ipc, uts) as OCI spec namespace types (network, ipc, uts)."""
    return {"net": "network"}.get(kind, kind)

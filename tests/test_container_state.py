"""ContainerManager's state ownership, with a fake runtime: no root, no runc, fast.

Every container state change is one transition under the container's lock; events come only from
transitions (one STOPPED per exit); exits reported by the runtime never wait on another
container's lock; start never overwrites an exit; saved records are snapshots nobody changes.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from pycrio.config import Config
from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument, NotFound
from pycrio.oci.runtime import (
    STATE_CREATED,
    STATE_RUNNING,
    STATE_STOPPED,
    STATE_UNKNOWN,
    ContainerHandle,
    ExecResult,
    ExitCallback,
    Runtime,
    RuntimeStatus,
)
from pycrio.procfs import process_start_time, same_process
from pycrio.pods.containers import (
    ContainerManager,
    container_log_path,
    cri_signal,
    parse_signal,
    signal_number,
)
from pycrio.pods.events import CREATED, STARTED, STOPPED, EventBus, LifecycleEvent
from pycrio.server.container_execsync import bounded_output
from pycrio.state import ContainerRecord, SandboxRecord, StateStore
from pycrio.state.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    encode_message,
)

POD = "p" * 64


class FakeRuntime(Runtime):
    """Containers as entries of a dict; hooks let a test act in the middle of a runtime call."""

    name = "fake"

    def __init__(self) -> None:
        self.states: dict[str, RuntimeStatus] = {}
        self.calls: list[tuple[str, str]] = []
        self.status_delay = 0.0
        self.on_start: Callable[[str], None] | None = None
        self.on_stop: Callable[[str], None] | None = None
        self.lock = threading.Lock()

    # the runtime "sees" a container exit: record it and report it, as conmon + inotify do
    def exit(self, cid: str, code: int = 0, finished_at: int | None = None) -> None:
        with self.lock:
            current = self.states[cid]
            self.states[cid] = RuntimeStatus(
                STATE_STOPPED, exit_code=code, started_at=current.started_at,
                finished_at=finished_at or time.time_ns(),
            )  # fmt: skip
        self._report_exit(cid)

    def create(self, handle: ContainerHandle) -> int:
        self.calls.append(("create", handle.id))
        self.states[handle.id] = RuntimeStatus(STATE_CREATED, pid=4242)
        return 4242

    def start(self, handle: ContainerHandle) -> None:
        self.calls.append(("start", handle.id))
        with self.lock:
            self.states[handle.id] = RuntimeStatus(STATE_RUNNING, pid=4242, started_at=time.time_ns())
        if self.on_start:
            self.on_start(handle.id)

    def kill(self, handle: ContainerHandle, sig: int) -> None:
        self.calls.append((f"kill {int(sig)}", handle.id))
        self.exit(handle.id, 128 + int(sig))

    def stop(self, handle: ContainerHandle, timeout: int, stop_signal: int = signal.SIGTERM) -> None:
        self.calls.append(("stop", handle.id))
        if self.on_stop:
            self.on_stop(handle.id)
        if self.status(handle).state != STATE_STOPPED:
            self.kill(handle, stop_signal)

    def delete(self, handle: ContainerHandle) -> None:
        self.calls.append(("delete", handle.id))
        self.states.pop(handle.id, None)

    def status(self, handle: ContainerHandle) -> RuntimeStatus:
        if self.status_delay:
            time.sleep(self.status_delay)
        with self.lock:
            if handle.id not in self.states:
                raise NotFound(f"no container {handle.id}")
            return dataclasses.replace(self.states[handle.id])

    def exec_sync(self, handle: ContainerHandle, cmd: list[str], timeout: float | None, output_limit: int = 0) -> ExecResult:
        return ExecResult(0, b"", b"")

    def reopen_log(self, handle: ContainerHandle) -> None:
        pass

    def update_resources(self, handle: ContainerHandle, linux_resources: dict[str, Any]) -> None:
        pass

    def available(self) -> tuple[bool, str]:
        return True, ""


class FakeHandlers:
    """RuntimeHandlers' interface over one fake runtime."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime

    def get(self, name: str) -> Runtime:
        return self.runtime

    def for_pod(self, name: str, pod_id: str) -> Runtime:
        return self.runtime.for_sandbox(pod_id)

    def report_exits(self, callback: ExitCallback | None) -> None:
        self.runtime.report_exits(callback)

    def names(self) -> list[str]:
        return ["fake"]

    def name_of(self, name: str) -> str:
        return name or "fake"


class FakeImages:
    """What stopping needs of the image manager: no image records (SIGTERM it is)."""

    class store:  # noqa: N801 - stands in for ImageManager.store
        @staticmethod
        def find_record(*references: str) -> None:
            return None

    @staticmethod
    def release_rootfs(container_id: str) -> None:
        pass

    @staticmethod
    def unmount_rootfs(container_id: str) -> None:
        pass


class RecordingStore(StateStore):
    """An in-memory store that remembers every record it was given, and what it said then."""

    def __init__(self) -> None:
        super().__init__(None)
        self.saved: list[tuple[ContainerRecord, dict[str, Any]]] = []

    def save_container(self, container: ContainerRecord) -> None:
        self.saved.append((container, dataclasses.asdict(container)))
        super().save_container(container)


@dataclasses.dataclass
class Env:
    manager: ContainerManager
    runtime: FakeRuntime
    store: RecordingStore
    events: queue.Queue[LifecycleEvent]
    tmp: Path

    def add(self, state: str = CONTAINER_CREATED, runtime_state: str = STATE_CREATED, **fields: Any) -> str:
        """A container record (as CreateContainer leaves it) and its runtime side."""
        cid = f"{len(self.store.list_containers()):064x}"
        bundle = self.tmp / cid
        bundle.mkdir()
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=f"c{cid[-4:]}"))
        record = ContainerRecord(
            id=cid, pod_id=POD, config=encode_message(config), image="busybox", image_ref="sha256:" + "1" * 64,
            image_name="busybox", runtime_handler="fake", created_at=time.time_ns(), log_path=str(bundle / "log"),
            bundle=str(bundle), state=state, stop_signal=int(signal.SIGTERM), **fields,
        )  # fmt: skip
        self.store.save_container(record)
        self.runtime.states[cid] = RuntimeStatus(runtime_state, pid=4242)
        return cid

    def record(self, cid: str) -> ContainerRecord:
        return self.store.get_container(cid)

    def kinds(self, cid: str) -> list[int]:
        found = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return found
            if event.container_id == cid:
                found.append(event.kind)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    runtime = FakeRuntime()
    store = RecordingStore()
    bus = EventBus()
    manager = ContainerManager(
        Config(root=str(tmp_path / "root"), runroot=str(tmp_path / "run")), store, FakeHandlers(runtime),
        images=FakeImages(), events=bus,  # type: ignore[arg-type]
    )  # fmt: skip
    store.save_pod(SandboxRecord(id=POD, config=encode_message(api_pb2.PodSandboxConfig()), runtime_handler="fake",
                                 created_at=1, directory=str(tmp_path / "pod"), complete=True))
    env = Env(manager, runtime, store, bus.subscribe(), tmp_path)
    yield env
    manager.stop_watching()


def test_one_stopped_event_per_exit_with_readers_racing(env: Env) -> None:
    """ContainerStatus, ListContainers, the stats handlers and the exit monitor all at once: one
    transition, one STOPPED event, whatever the interleaving."""
    cid = env.add(CONTAINER_RUNNING, STATE_RUNNING, started_at=1)
    env.runtime.status_delay = 0.002  # widen the window between reading and writing the state
    env.runtime.states[cid] = RuntimeStatus(STATE_STOPPED, exit_code=3, started_at=1, finished_at=2)
    stale = env.record(cid)  # what a List call read before the exit
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait()
        for _ in range(20):
            env.manager.refresh(stale)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert env.kinds(cid) == [STOPPED]
    assert (env.record(cid).state, env.record(cid).exit_code) == (CONTAINER_EXITED, 3)


def test_exit_reports_and_readers_give_one_stopped_event(env: Env) -> None:
    cid = env.add(CONTAINER_RUNNING, STATE_RUNNING, started_at=1)
    env.manager.watch_exits()
    env.runtime.status_delay = 0.002
    stale = env.record(cid)
    threads = [threading.Thread(target=lambda: [env.manager.refresh(stale) for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        env.runtime.exit(cid, 0, finished_at=5)  # the monitor may report more than once
    for t in threads:
        t.join()
    assert env.kinds(cid) == [STOPPED]
    assert env.record(cid).reason == "Completed"


def test_start_never_overwrites_an_exit_seen_meanwhile(env: Env) -> None:
    """A container that exits at once: a ListContainers during StartContainer must not make
    start write RUNNING over the exit."""
    cid = env.add()
    env.manager.watch_exits()

    def exits_during_start(container_id: str) -> None:
        env.runtime.exit(container_id, 0)
        lister = threading.Thread(target=env.manager.refresh, args=(env.record(container_id),))
        lister.start()
        lister.join()

    env.runtime.on_start = exits_during_start
    env.manager.start(cid)
    record = env.record(cid)
    assert record.state == CONTAINER_EXITED
    assert 0 < record.started_at <= record.finished_at
    assert env.kinds(cid) == [STARTED, STOPPED]


def test_started_at_is_the_runtimes_own(env: Env) -> None:
    """started_at is when the runtime started the process, not when StartContainer returned: a
    container that exits at once never has startedAt > finishedAt."""
    cid = env.add()
    began = time.time_ns() - 50_000_000

    def quick(container_id: str) -> None:
        env.runtime.states[container_id] = RuntimeStatus(
            STATE_STOPPED, exit_code=0, started_at=began, finished_at=began + 1000
        )
        time.sleep(0.01)  # runc start returning later than the exit

    env.runtime.on_start = quick
    env.manager.start(cid)
    record = env.record(cid)
    assert (record.started_at, record.finished_at) == (began, began + 1000)


def test_saved_records_are_snapshots_nobody_changes(env: Env) -> None:
    """The store serialises what it was given: no thread may change it afterwards."""
    cid = env.add()
    env.manager.start(cid)
    env.manager.refresh(env.record(cid))
    env.runtime.exit(cid, 1)
    env.manager.refresh(env.record(cid))
    env.manager.stop(cid, 0)
    assert len(env.store.saved) >= 3
    for record, as_saved in env.store.saved:
        assert dataclasses.asdict(record) == as_saved, "a saved record was changed in place"


def test_a_stop_in_its_grace_period_does_not_delay_another_exit(env: Env) -> None:
    slow = env.add(CONTAINER_RUNNING, STATE_RUNNING, started_at=1)
    quick = env.add(CONTAINER_RUNNING, STATE_RUNNING, started_at=1)
    env.manager.watch_exits()
    in_grace, release = threading.Event(), threading.Event()

    def grace_period(container_id: str) -> None:
        if container_id == slow:
            in_grace.set()
            release.wait(10)

    env.runtime.on_stop = grace_period
    stopper = threading.Thread(target=env.manager.stop, args=(slow, 30))
    stopper.start()
    try:
        assert in_grace.wait(5)
        began = time.monotonic()
        env.runtime.exit(quick, 7)
        while env.record(quick).state != CONTAINER_EXITED:
            assert time.monotonic() - began < 0.5, "the exit waited behind another container's stop"
            time.sleep(0.005)
        assert env.kinds(quick) == [STOPPED]
        # a reader of the container being stopped does not wait for the stop either
        began = time.monotonic()
        assert env.manager.refresh(env.record(slow)).state == CONTAINER_RUNNING
        assert time.monotonic() - began < 0.5
    finally:
        release.set()
        stopper.join(5)
    assert env.record(slow).state == CONTAINER_EXITED
    assert env.kinds(slow) == [STOPPED]


def test_an_exit_reported_while_the_lock_is_held_is_recorded_by_the_holder(env: Env) -> None:
    cid = env.add(CONTAINER_RUNNING, STATE_RUNNING, started_at=1)
    env.manager.watch_exits()

    def exits_while_stopping(container_id: str) -> None:
        # reported from the monitor's thread while StopContainer holds the lock: not lost
        reporter = threading.Thread(target=env.runtime.exit, args=(container_id, 0))
        reporter.start()
        reporter.join()
        assert env.record(container_id).state == CONTAINER_RUNNING  # not yet: the holder records it

    env.runtime.on_stop = exits_while_stopping
    env.manager.stop(cid, 10)
    assert env.record(cid).state == CONTAINER_EXITED
    assert env.kinds(cid) == [STOPPED]
    assert ("kill 15", cid) not in env.runtime.calls  # it had exited: no signal needed


def test_unknown_is_checked_again_and_stopping_it_signals(env: Env) -> None:
    cid = env.add(CONTAINER_UNKNOWN, STATE_RUNNING, started_at=1)
    assert env.manager.refresh(env.record(cid)).state == CONTAINER_RUNNING
    env.runtime.states[cid] = RuntimeStatus(STATE_UNKNOWN, pid=4242, message="runc is confused")
    assert env.manager.refresh(env.record(cid)).state == CONTAINER_UNKNOWN
    env.manager.stop(cid, 0)
    assert ("stop", cid) in env.runtime.calls
    assert any(call == (f"kill {int(signal.SIGTERM)}", cid) for call in env.runtime.calls)
    assert env.record(cid).state == CONTAINER_EXITED


def test_exits_of_unknown_ids_are_ignored(env: Env) -> None:
    env.manager.watch_exits()
    env.manager.exit_reported("x" * 59 + "infra")  # a pod's infra process: not a container record
    env.manager.exit_reported("0")  # nor a prefix of one
    cid = env.add(CONTAINER_RUNNING, STATE_RUNNING, started_at=1)
    env.manager.exit_reported(cid[:10])
    assert env.record(cid).state == CONTAINER_RUNNING


def test_create_publishes_created_and_records_the_pid_start(env: Env) -> None:
    cid = env.add()
    assert env.kinds(cid) == []  # add() is not a transition
    env.manager.start(cid)
    assert env.kinds(cid) == [STARTED]
    assert env.record(cid).state == CONTAINER_RUNNING
    assert CREATED not in env.kinds(cid)


# --- pure helpers ------------------------------------------------------------------------


def test_process_identity() -> None:
    import os

    me = process_start_time(os.getpid())
    assert me > 0
    assert same_process(os.getpid(), me)
    assert not same_process(os.getpid(), me + 1)  # a recycled pid has another start time
    assert not same_process(os.getpid(), 0)  # an unrecorded start proves nothing
    assert process_start_time(2**22 + 12345) == 0


def test_log_path_stays_in_the_pods_log_directory(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "link").symlink_to(tmp_path / "elsewhere")
    pod = SandboxRecord(
        id=POD, config=encode_message(api_pb2.PodSandboxConfig(log_directory=str(logs))), runtime_handler="",
        created_at=1, directory=str(tmp_path / "pod"),
    )  # fmt: skip

    def path(log_path: str) -> Path:
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="c"), log_path=log_path)
        return container_log_path(pod, config, "c" * 64)

    assert path("app/0.log") == logs / "app" / "0.log"
    assert path("a/../b.log") == logs / "b.log"
    for bad in ("/etc/passwd", "../x.log", "app/../../x.log", "..", ".", "link/x.log"):
        with pytest.raises(InvalidArgument):
            path(bad)
    assert not (tmp_path / "x.log").exists() and not (tmp_path / "elsewhere").exists()


def test_exec_output_fits_a_reply_and_says_it_was_cut() -> None:
    limit = 1000
    out, err = bounded_output(ExecResult(0, b"o" * 900, b"e" * 900), limit)
    assert len(out) + len(err) <= limit
    assert b"truncated" in err and b"stdout" in err and b"stderr" in err
    out, err = bounded_output(ExecResult(0, b"o" * 100, b"", stdout_truncated=True), limit)
    assert out == b"o" * 100 and b"stdout to 100 bytes" in err
    assert bounded_output(ExecResult(0, b"small", b"fine"), limit) == (b"small", b"fine")


def test_signals() -> None:
    assert parse_signal("SIGQUIT") == signal.SIGQUIT  # an image's StopSignal by name
    assert parse_signal("quit") == signal.SIGQUIT
    assert parse_signal("9") == 9
    assert parse_signal("SIGRTMIN+3") == signal.SIGRTMIN + 3
    assert parse_signal("nope") is None
    assert signal_number(api_pb2.SIGNAL_SIGUSR1) == signal.SIGUSR1
    assert signal_number(api_pb2.SIGNAL_SIGRTMINPLUS2) == signal.SIGRTMIN + 2
    assert signal_number(api_pb2.SIGNAL_SIGRTMAXMINUS1) == signal.SIGRTMAX - 1
    for number in (signal.SIGTERM, signal.SIGKILL, signal.SIGRTMIN + 5, signal.SIGRTMAX - 2):
        assert signal_number(cri_signal(number)) == number
    assert cri_signal(signal.SIGTERM) == api_pb2.SIGNAL_SIGTERM


# --- the runtime seams -------------------------------------------------------------------


class PodRuntime(FakeRuntime):
    """A runtime with one instance per pod (as a per-pod monitor will be), laying out its own
    container files, and hearing about each pod's runtime side."""

    def __init__(self) -> None:
        super().__init__()
        self.pods: dict[str, FakeRuntime] = {}
        self.hooks: list[tuple[str, str]] = []
        self.handles: list[str] = []

    def for_sandbox(self, sandbox_id: str) -> Runtime:
        return self.pods.setdefault(sandbox_id, FakeRuntime())

    def create_sandbox(self, sandbox: Any) -> None:
        self.hooks.append(("create", sandbox.id))

    def restore_sandbox(self, sandbox: Any) -> None:
        self.hooks.append(("restore", sandbox.id))

    def remove_sandbox(self, sandbox: Any) -> None:
        self.hooks.append(("remove", sandbox.id))


def test_runtime_seams_per_pod_instance_sandbox_hooks_and_handles(tmp_path: Path) -> None:
    from pycrio.network.cni import CNIManager
    from pycrio.pods.sandboxes import SandboxManager

    base = PodRuntime()

    class Handlers(FakeHandlers):
        def for_pod(self, name: str, pod_id: str) -> Runtime:
            return base.for_sandbox(pod_id)

        def report_exits(self, callback: ExitCallback | None) -> None:
            for runtime in (base, *base.pods.values()):
                runtime.report_exits(callback)

    # container files laid out by the runtime: the manager builds no handle itself
    def container_handle(container_id: str, bundle: Path, log_path: Path, **kw: Any) -> ContainerHandle:
        base.handles.append(container_id)
        return ContainerHandle(id=container_id, bundle=bundle, log_path=log_path, state_dir=tmp_path / "mine", **kw)

    store = StateStore(None)
    config = Config(root=str(tmp_path / "root"), runroot=str(tmp_path / "run"))
    containers = ContainerManager(config, store, Handlers(base), FakeImages(), EventBus())  # type: ignore[arg-type]
    sandboxes = SandboxManager(config, store, Handlers(base), CNIManager(tmp_path, [], tmp_path / "cni"), containers)  # type: ignore[arg-type]
    pod_config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="seams", namespace="t", uid="u1"), hostname="seams"
    )
    pod_config.linux.cgroup_parent = "/pycrio-unit-seams"  # given: nothing of ours to remove
    options = pod_config.linux.security_context.namespace_options
    options.network, options.ipc, options.pid = api_pb2.NODE, api_pb2.NODE, api_pb2.CONTAINER
    pod_id = sandboxes.run(pod_config, "fake")
    assert base.hooks == [("create", pod_id)]

    pod_runtime = base.for_sandbox(pod_id)
    pod_runtime.container_handle = container_handle  # type: ignore[method-assign]
    cid = "c" * 64
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    store.save_container(ContainerRecord(
        id=cid, pod_id=pod_id, config=encode_message(api_pb2.ContainerConfig()), image="i", image_ref="i",
        image_name="i", runtime_handler="fake", created_at=1, log_path=str(bundle / "log"), bundle=str(bundle),
        stop_signal=int(signal.SIGTERM),
    ))  # fmt: skip
    pod_runtime.states[cid] = RuntimeStatus(STATE_CREATED, pid=1)
    containers.start(cid)
    assert ("start", cid) in pod_runtime.calls and ("start", cid) not in base.calls  # the pod's instance
    assert cid in base.handles
    containers.watch_exits()
    pod_runtime.exit(cid, 9)  # the pod's instance reports the exit
    assert store.get_container(cid).state == CONTAINER_EXITED

    sandboxes.reconcile()
    assert ("restore", pod_id) in base.hooks
    sandboxes.stop(pod_id)
    sandboxes.remove(pod_id)
    assert base.hooks[-1] == ("remove", pod_id)
    assert ("delete", cid) in pod_runtime.calls
    containers.stop_watching()

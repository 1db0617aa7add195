"""The "oci" runtime against the real conmon and runc: tiny busybox bundles, no mocks.

Each test gets its own runc root, runroot and bundles under tmp_path; the `oci` fixture checks that
nothing is left behind (runc containers, conmon processes, cgroup directories) and cleans up anyway.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from pycrio.errors import CRIError, FailedPrecondition, NotFound
from pycrio.oci import ContainerHandle, OCIRuntime, RuntimeCommandError
from pycrio.oci.cgroups import hybrid_with_v2_controllers

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "pycrio-test"
APPLETS = ("sh", "echo", "sleep", "cat", "true", "false")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(?:Z|[+-]\d\d:\d\d) (stdout|stderr) (F|P) (.*)$")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(RUNC).exists() or shutil.which("conmon") is None,
    reason="needs root, runc and conmon",
)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem shared by every bundle (containers only write to tmpfs mounts)."""
    root = tmp_path_factory.mktemp("rootfs").resolve()
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


@dataclass
class OCIEnv:
    """One test's runtime, directories and the containers it made."""

    runtime: OCIRuntime
    base: Path
    rootfs: Path
    ids: list[str] = field(default_factory=list)
    conmon_cgroup: str = field(default_factory=lambda: f"conmon-{uuid.uuid4().hex[:12]}")

    def handle(self, args: list[str], *, terminal: bool = False, memory_limit: int | None = None) -> ContainerHandle:
        """A fresh container id with its bundle written (not created)."""
        cid = f"t{uuid.uuid4().hex[:12]}"
        self.ids.append(cid)
        bundle = self.base / "bundles" / cid
        write_bundle(bundle, self.rootfs, cid, args, terminal=terminal, memory_limit=memory_limit)
        return ContainerHandle(
            id=cid,
            bundle=bundle,
            log_path=self.base / "logs" / f"{cid}.log",
            state_dir=self.base / "run" / cid,
            terminal=terminal,
        )

    def run(self, args: list[str], *, terminal: bool = False, memory_limit: int | None = None) -> ContainerHandle:
        """Create and start a container."""
        handle = self.handle(args, terminal=terminal, memory_limit=memory_limit)
        self.runtime.create(handle)
        self.runtime.start(handle)
        return handle


def write_bundle(
    bundle: Path, rootfs: Path, cid: str, args: list[str], *, terminal: bool, memory_limit: int | None
) -> None:
    """config.json from `runc spec`, edited: our args, absolute writable root, explicit cgroup."""
    bundle.mkdir(parents=True)
    subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"] = {"path": str(rootfs), "readonly": False}
    # an empty cgroupsPath would nest the container in the calling shell's memory cgroup
    spec["linux"]["cgroupsPath"] = f"/{CGROUP_PARENT}/{cid}"
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]
    if memory_limit is not None:
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": memory_limit, "swap": memory_limit}
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))


def runc_list(root: Path) -> list[str]:
    out = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True, check=False)
    return out.stdout.split()


def leftover_processes(base: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True, check=False)
    return [int(pid) for pid in out.stdout.split()]


def leftover_cgroups(names: list[str]) -> list[Path]:
    return [path for name in names for path in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}/{name}")]


def remove_cgroup(path: Path) -> None:
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        child.rmdir()
    path.rmdir()


@pytest.fixture
def oci(tmp_path: Path, rootfs: Path) -> Iterator[OCIEnv]:
    """A runc runtime in tmp_path; afterwards: no runc containers, conmons or cgroups left."""
    runc_root = tmp_path / "runc"
    env = OCIEnv(OCIRuntime("runc", RUNC, runc_root), tmp_path, rootfs)
    yield env
    containers = runc_list(runc_root)
    for cid in containers:
        subprocess.run([RUNC, "--root", str(runc_root), "delete", "--force", cid], check=False)
    processes = leftover_processes(tmp_path)
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    if processes:
        time.sleep(0.2)  # let the killed processes leave their cgroups
    cgroups = leftover_cgroups([*env.ids, env.conmon_cgroup])
    for path in cgroups:
        remove_cgroup(path)
    for path in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}"):
        try:
            path.rmdir()
        except OSError:
            pass  # still used by another test run
    assert containers == [], f"runc containers left: {containers}"
    assert processes == [], f"processes left: {processes}"
    assert cgroups == [], f"cgroups left: {cgroups}"


def wait_stopped(env: OCIEnv, handle: ContainerHandle, timeout: float = 10) -> None:
    assert env.runtime.wait_stopped(handle, timeout), f"{handle.id} did not stop"


def log_lines(handle: ContainerHandle) -> list[tuple[str, str, str]]:
    """(stream, tag, text) of each CRI log line; every line must be well formed."""
    lines = []
    for line in handle.log_path.read_text().splitlines():
        match = LOG_LINE.match(line)
        assert match, f"bad log line: {line!r}"
        lines.append((match[1], match[2], match[3]))
    return lines


def conmon_pid(handle: ContainerHandle) -> int:
    return int((handle.state_dir / "conmon.pid").read_text())


# -- lifecycle -------------------------------------------------------------------------------


def test_create_then_start(oci: OCIEnv, caplog: pytest.LogCaptureFixture) -> None:
    handle = oci.handle(["sleep", "1000"])
    pid = oci.runtime.create(handle)
    assert pid > 0
    with caplog.at_level(logging.DEBUG, logger="pycrio"):
        created = oci.runtime.status(handle)
    assert (created.state, created.pid, created.exit_code) == ("created", pid, None)
    # A created container's too: one `runc state` each made ListContainers take seconds.
    assert not [r for r in caplog.records if r.getMessage().startswith("running: ") and " state " in r.getMessage()]
    caplog.clear()
    assert int((handle.state_dir / "pidfile").read_text()) == pid
    # conmon is its own session: the daemon's death or signals do not reach it
    assert os.getsid(conmon_pid(handle)) != os.getsid(0)

    before = time.time_ns()
    oci.runtime.start(handle)
    with caplog.at_level(logging.DEBUG, logger="pycrio"):
        running = oci.runtime.status(handle)
    assert (running.state, running.pid) == ("running", pid)
    assert before <= running.started_at <= time.time_ns()
    # A running container's status comes from conmon's files and /proc, without `runc state`.
    assert not [r for r in caplog.records if r.getMessage().startswith("running: ") and " state " in r.getMessage()]

    oci.runtime.delete(handle)
    assert runc_list(oci.runtime.runtime_root) == []


def test_exit_code_and_log_lines(oci: OCIEnv) -> None:
    handle = oci.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    wait_stopped(oci, handle)
    status = oci.runtime.status(handle)
    assert (status.state, status.exit_code, status.oom_killed) == ("stopped", 3, False)
    assert status.started_at <= status.finished_at <= time.time_ns()
    assert sorted(log_lines(handle)) == [("stderr", "F", "err"), ("stdout", "F", "out")]
    oci.runtime.delete(handle)


def test_exit_code_survives_nobody_watching(oci: OCIEnv) -> None:
    """conmon reaps the container: a new runtime object (a restarted daemon) still sees the code."""
    handle = oci.run(["sh", "-c", "sleep 0.2; exit 7"])
    time.sleep(1.0)
    restarted = OCIRuntime("runc", RUNC, oci.runtime.runtime_root)
    status = restarted.status(handle)
    assert (status.state, status.exit_code) == ("stopped", 7)
    assert status.finished_at > status.started_at > 0
    restarted.delete(handle)


def test_terminal_container_logs_to_stdout(oci: OCIEnv) -> None:
    handle = oci.run(["sh", "-c", "echo tty-ok; [ -t 1 ] && echo is-a-tty"], terminal=True)
    wait_stopped(oci, handle)
    assert oci.runtime.status(handle).exit_code == 0
    texts = [text.rstrip("\r") for stream, _, text in log_lines(handle) if stream == "stdout"]
    assert "tty-ok" in texts and "is-a-tty" in texts
    oci.runtime.delete(handle)


# -- stop and kill ---------------------------------------------------------------------------


def test_stop_escalates_to_sigkill(oci: OCIEnv) -> None:
    """busybox sleep as PID 1 has no TERM handler, so the kernel drops TERM: stop must SIGKILL."""
    handle = oci.run(["sleep", "1000"])
    started = time.monotonic()
    oci.runtime.stop(handle, timeout=1)
    elapsed = time.monotonic() - started
    status = oci.runtime.status(handle)
    assert (status.state, status.exit_code) == ("stopped", 137)
    assert 1.0 <= elapsed < 4.0, elapsed
    oci.runtime.stop(handle, timeout=1)  # idempotent on a stopped container
    oci.runtime.delete(handle)


def test_stop_honoured_signal_does_not_wait(oci: OCIEnv) -> None:
    handle = oci.run(["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"])
    time.sleep(0.2)  # let sh install its trap
    started = time.monotonic()
    oci.runtime.stop(handle, timeout=30)
    assert time.monotonic() - started < 5
    assert oci.runtime.status(handle).exit_code == 0
    oci.runtime.delete(handle)


def test_stop_timeout_zero_kills_at_once(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    started = time.monotonic()
    oci.runtime.stop(handle, timeout=0)
    assert time.monotonic() - started < 3
    assert oci.runtime.status(handle).exit_code == 137
    oci.runtime.delete(handle)


def test_stop_created_container(oci: OCIEnv) -> None:
    handle = oci.handle(["sleep", "1000"])
    oci.runtime.create(handle)
    oci.runtime.stop(handle, timeout=1)
    assert oci.runtime.status(handle).state == "stopped"
    oci.runtime.delete(handle)


def test_kill_and_errors_on_stopped_container(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    oci.runtime.kill(handle, signal.SIGKILL)
    wait_stopped(oci, handle)
    assert oci.runtime.status(handle).exit_code == 137
    with pytest.raises(FailedPrecondition, match="not running"):
        oci.runtime.kill(handle, signal.SIGTERM)
    with pytest.raises(FailedPrecondition):
        oci.runtime.start(handle)
    oci.runtime.delete(handle)


# -- exec ------------------------------------------------------------------------------------


def test_exec_sync(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    result = oci.runtime.exec_sync(handle, ["sh", "-c", "echo o; echo e >&2; exit 5"], timeout=10)
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (5, b"o\n", b"e\n", False)
    missing = oci.runtime.exec_sync(handle, ["/nope"], timeout=10)
    assert missing.exit_code != 0 and b"/nope" in missing.stderr
    oci.runtime.delete(handle)


def test_exec_sync_timeout_kills_the_command(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    started = time.monotonic()
    result = oci.runtime.exec_sync(handle, ["sh", "-c", "echo before; sleep 100; echo after"], timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code == -1
    assert result.stdout.startswith(b"before\n")  # the shell may echo "after" once its child is killed
    assert 0.5 <= elapsed < 4, elapsed
    # only the container's init is left in its cgroup: the exec and its child are gone
    procs = (CGROUP_ROOT / "pids" / CGROUP_PARENT / handle.id / "cgroup.procs").read_text().split()
    assert procs == [str(oci.runtime.status(handle).pid)]
    oci.runtime.delete(handle)


def test_exec_in_stopped_container_is_refused(oci: OCIEnv) -> None:
    handle = oci.run(["true"])
    wait_stopped(oci, handle)
    with pytest.raises(FailedPrecondition, match="not running"):
        oci.runtime.exec_sync(handle, ["true"], timeout=5)
    oci.runtime.delete(handle)


# -- delete, status, errors ------------------------------------------------------------------


def test_delete_is_idempotent(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    cpid = conmon_pid(handle)
    oci.runtime.delete(handle)
    oci.runtime.delete(handle)
    assert runc_list(oci.runtime.runtime_root) == []
    assert not Path(f"/proc/{cpid}/cmdline").exists() or not Path(f"/proc/{cpid}/cmdline").read_bytes()
    assert not (handle.state_dir / "pidfile").exists() and not (handle.state_dir / "conmon.pid").exists()
    never_created = oci.handle(["true"])
    oci.runtime.delete(never_created)


def test_status_of_unknown_container(oci: OCIEnv) -> None:
    with pytest.raises(NotFound, match="not found"):
        oci.runtime.status(oci.handle(["true"]))


def test_create_with_missing_binary_fails_clearly(oci: OCIEnv) -> None:
    handle = oci.handle(["/nope/missing-binary"])
    with pytest.raises(RuntimeCommandError) as caught:
        oci.runtime.create(handle)
    message = caught.value.message
    assert "/nope/missing-binary" in message and "no such file or directory" in message
    assert message.startswith(f"create container {handle.id}: `")
    assert isinstance(caught.value, CRIError)
    assert runc_list(oci.runtime.runtime_root) == []


def test_create_with_invalid_spec_fails_clearly(oci: OCIEnv) -> None:
    handle = oci.handle(["true"])
    spec = json.loads((handle.bundle / "config.json").read_text())
    spec["root"]["path"] = "/nonexistent-rootfs"
    (handle.bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(RuntimeCommandError, match="nonexistent-rootfs"):
        oci.runtime.create(handle)


# -- logs, resources, OOM --------------------------------------------------------------------


def test_reopen_log_after_rotation(oci: OCIEnv) -> None:
    handle = oci.run(["sh", "-c", "while true; do echo tick; sleep 0.05; done"])
    time.sleep(0.3)
    rotated = handle.log_path.with_suffix(".1")
    handle.log_path.rename(rotated)
    oci.runtime.reopen_log(handle)
    time.sleep(0.3)
    assert ("stdout", "F", "tick") in log_lines(handle)
    oci.runtime.stop(handle, timeout=0)
    with pytest.raises(FailedPrecondition, match="not running"):
        oci.runtime.reopen_log(handle)
    oci.runtime.delete(handle)


def test_update_resources(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    oci.runtime.update_resources(handle, {"memory": {"limit": 64 * 1024 * 1024}, "pids": {"limit": 42}})
    memory = CGROUP_ROOT / "memory" / CGROUP_PARENT / handle.id / "memory.limit_in_bytes"
    pids = CGROUP_ROOT / "pids" / CGROUP_PARENT / handle.id / "pids.max"
    assert int(memory.read_text()) == 64 * 1024 * 1024 and pids.read_text().strip() == "42"
    oci.runtime.delete(handle)


def test_oom_killed(oci: OCIEnv) -> None:
    """A shell variable growing past a 16 MiB limit gets the container OOM-killed."""
    grow = "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"
    handle = oci.run(["sh", "-c", grow], memory_limit=16 * 1024 * 1024)
    wait_stopped(oci, handle, timeout=30)
    status = oci.runtime.status(handle)
    assert status.oom_killed and status.exit_code == 137
    oci.runtime.delete(handle)


# -- monitor placement, availability, tracing, concurrency ------------------------------------


def test_conmon_joins_its_cgroup(oci: OCIEnv) -> None:
    name = oci.conmon_cgroup
    runtime = OCIRuntime("runc", RUNC, oci.runtime.runtime_root, conmon_cgroup=f"/{CGROUP_PARENT}/{name}")
    handle = oci.handle(["sleep", "1000"])
    runtime.create(handle)
    try:
        lines = Path(f"/proc/{conmon_pid(handle)}/cgroup").read_text().splitlines()
        memory = next(line for line in lines if ":memory:" in line)
        assert memory.endswith(f"/{CGROUP_PARENT}/{name}")
    finally:
        runtime.delete(handle)
    for path in leftover_cgroups([name]):
        path.rmdir()


def test_available(tmp_path: Path) -> None:
    assert OCIRuntime("runc", RUNC, tmp_path).available() == (True, "")
    usable, why = OCIRuntime("missing", "/nope/runc", tmp_path).available()
    assert not usable and "/nope/runc not found" in why
    usable, why = OCIRuntime("runc", RUNC, tmp_path, conmon_path="/nope/conmon").available()
    assert not usable and "conmon" in why


@pytest.mark.skipif(shutil.which("crun") is None, reason="crun not installed")
@pytest.mark.skipif(not hybrid_with_v2_controllers(), reason="only meaningful on a cgroups v1 hybrid host")
def test_crun_unavailable_on_hybrid_host(tmp_path: Path) -> None:
    usable, why = OCIRuntime("crun", "crun", tmp_path).available()
    assert not usable
    assert "crun refuses cgroups in hybrid mode" in why and "/sys/fs/cgroup/unified" in why


def test_commands_logged_and_traced(
    oci: OCIEnv, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import pycrio.tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(pycrio.tracing, "_STEP_TRACER", tracer)
    caplog.set_level(logging.DEBUG, logger="pycrio.oci")

    handle = oci.handle(["sleep", "1000"])
    with tracer.start_as_current_span("call"):
        oci.runtime.create(handle)
        oci.runtime.start(handle)
        oci.runtime.exec_sync(handle, ["true"], timeout=5)
        oci.runtime.kill(handle, signal.SIGKILL)
        wait_stopped(oci, handle)
        oci.runtime.delete(handle)

    names = [span.name for span in exporter.get_finished_spans()]
    for step in ("runtime_create", "runtime_start", "runtime_exec", "runtime_kill", "runtime_delete"):
        assert step in names
    create = next(s for s in exporter.get_finished_spans() if s.name == "runtime_create")
    assert create.attributes is not None and create.attributes["container.id"] == handle.id
    commands = [r.getMessage() for r in caplog.records if r.getMessage().startswith("running: ")]
    assert any("conmon --api-version 1" in c and f"-c {handle.id}" in c for c in commands)
    assert any(c.endswith(f"start {handle.id}") for c in commands)
    assert any(f" exec --pid-file " in c for c in commands)


def test_concurrent_containers(oci: OCIEnv) -> None:
    handles = [oci.handle(["sleep", "1000"]) for _ in range(6)]
    latencies: dict[str, float] = {}
    errors: list[BaseException] = []

    def lifecycle(handle: ContainerHandle) -> None:
        try:
            started = time.monotonic()
            oci.runtime.create(handle)
            oci.runtime.start(handle)
            latencies[handle.id] = time.monotonic() - started
            assert oci.runtime.status(handle).state == "running"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=lifecycle, args=(h,)) for h in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    print(f"create+start latencies under 6-way concurrency: {sorted(round(v, 3) for v in latencies.values())}")

    stoppers = [threading.Thread(target=oci.runtime.stop, args=(h, 0)) for h in handles]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    assert {oci.runtime.status(h).exit_code for h in handles} == {137}
    for handle in handles:
        oci.runtime.delete(handle)


# -- exits as events, checked pids, bounded exec output --------------------------------------


def test_exits_are_reported_as_they_happen(oci: OCIEnv) -> None:
    reported: list[tuple[str, float]] = []
    got = threading.Event()

    def report(container_id: str) -> None:
        reported.append((container_id, time.time()))
        got.set()

    oci.runtime.report_exits(report)
    try:
        handle = oci.run(["sh", "-c", "sleep 0.5; exit 4"])
        assert got.wait(10), "no exit reported"
        cid, at = reported[0]
        status = oci.runtime.status(handle)
        assert (cid, status.exit_code) == (handle.id, 4)
        assert at - status.finished_at / 1e9 < 0.3, "the report came late: polled, not watched"
        # a container created before exits were reported (a daemon restart): restore() watches it,
        # and an exit that happened before the watch is reported at once
        oci.runtime.report_exits(None)
        earlier = oci.run(["true"])
        wait_stopped(oci, earlier)
        got.clear()
        oci.runtime.report_exits(report)
        oci.runtime.restore(earlier)
        assert got.wait(5) and reported[-1][0] == earlier.id
        for h in (handle, earlier):
            oci.runtime.delete(h)
    finally:
        oci.runtime.report_exits(None)


def test_a_recycled_conmon_pid_is_not_taken_for_conmon(oci: OCIEnv) -> None:
    """conmon dies and another process gets its pid, even one whose command line looks like
    conmon's: deleting the container must not wait for it, let alone kill it."""
    handle = oci.run(["sleep", "1000"])
    conmon = conmon_pid(handle)
    os.kill(conmon, signal.SIGKILL)
    deadline = time.monotonic() + 20
    impostor = None
    while impostor is None and time.monotonic() < deadline:
        if Path(f"/proc/{conmon}").exists():  # still a zombie being reaped
            time.sleep(0.01)
            continue
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(conmon - 1))
        proc = subprocess.Popen(["/bin/sh", "-c", "sleep 600; :", "conmon", "-c", handle.id], start_new_session=True)
        if proc.pid == conmon:
            impostor = proc
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if impostor is None:
        pytest.skip("could not get conmon's pid back (a busy machine)")
    try:
        started = time.monotonic()
        oci.runtime.delete(handle)
        assert time.monotonic() - started < 3, "delete waited for a process that is not conmon"
        assert impostor.poll() is None, "delete killed a process that only had conmon's old pid"
    finally:
        os.killpg(impostor.pid, signal.SIGKILL)
        impostor.wait()


def test_exec_output_is_capped_per_stream(oci: OCIEnv) -> None:
    handle = oci.run(["sleep", "1000"])
    script = "i=0; while [ $i -lt 2000 ]; do echo 0123456789abcdef; echo e >&2; i=$((i+1)); done; exit 3"
    result = oci.runtime.exec_sync(handle, ["sh", "-c", script], timeout=20, output_limit=1000)
    assert result.exit_code == 3 and not result.timed_out
    assert (len(result.stdout), len(result.stderr)) == (1000, 1000)
    assert result.stdout_truncated and result.stderr_truncated
    small = oci.runtime.exec_sync(handle, ["echo", "ok"], timeout=10, output_limit=1000)
    assert (small.stdout, small.stdout_truncated) == (b"ok\n", False)
    oci.runtime.delete(handle)

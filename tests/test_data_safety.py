"""No data loss: images in use keep their layers, records are durable and restored robustly, a
reboot is detected and what it took is reported.

Unit tests of the stores run on temp dirs; the rest drives a real daemon with the real crictl,
runc + conmon, a CNI bridge of its own and a real registry.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.images.store import ImageInUse, ImageRecord, ImageStore
from pycrio.oci import cgroups
from pycrio.procfs import process_start_time, same_process
from pycrio.state import ContainerRecord, SandboxRecord, StateStore, boot
from pycrio.state.records import encode_message
from tests.cni_fixture import bridge_network
from tests.harness import PycrioDaemon
from tests.registry_fixture import ImageBuilder, TestRegistry

BRIDGE = "pycriods5"
SUBNET = "10.142.0.0/24"  # 10.136/22 is bench/compare.py's
NETWORK = "pycrio-dstest"
HOST_LOCAL_DIR = Path("/var/lib/cni/networks") / NETWORK


# --- unit: durable writes ---------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from pycrio.images.store import ImageRecord, ImageStore
    from pycrio.network.cni import CNIManager, Network, _Attachment
    from pycrio.state import SandboxRecord, StateStore

    base = Path(sys.argv[1])
    state = StateStore(base / "state")
    state.save_pod(SandboxRecord(id="p1", config="", runtime_handler="runc", created_at=1))
    store = ImageStore(base / "storage")
    store.open()
    hexid = "a" * 64
    store.add(ImageRecord(id="sha256:" + hexid, repo_tags=["x:1"], repo_digests=[], manifest_digest="sha256:" + "b" * 64,
                          config_digest="sha256:" + hexid, layer_blobs=[], diff_ids=[], size=1))
    cni = CNIManager(base / "net.d", [], base / "cni")
    cni._write_cache(_Attachment("p1", Network("n", "1.0.0", [{"type": "bridge"}]), "/x", "", {}), {"ips": []})
    """
)


def _syscalls(trace: str) -> list[tuple[str, str]]:
    """(call, the paths its fds and arguments name) for the traced calls, in order (strace -y)."""
    calls = []
    for line in trace.splitlines():
        m = re.match(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if m and int(m.group(3)) >= 0:
            calls.append((m.group(1), m.group(2)))
    return calls


@pytest.mark.parametrize("target", ["state/pods/p1.json", f"storage/images/{'a' * 64}.json", "cni/p1.json"])
def test_records_are_fsynced_before_and_after_the_rename(tmp_path: Path, target: str) -> None:
    """Item: durability. The file is fsynced before it is renamed over the record, and its
    directory after, for pod/container records, image records and the CNI cache."""
    out = tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-y", "-o", str(out), "-e", "trace=openat,fsync,rename,renameat,renameat2",
         sys.executable, "-c", WRITER, str(tmp_path)],
        check=True, capture_output=True,
    )
    calls = _syscalls(out.read_text())
    path = str(tmp_path / target)
    [rename] = [i for i, (name, args) in enumerate(calls) if name.startswith("rename") and f'"{path}"' in args]
    tmp = re.search(r'"([^"]+)"', calls[rename][1]).group(1)  # the source of the rename
    assert tmp != path and Path(tmp).parent == Path(path).parent
    file_syncs = [i for i, (name, args) in enumerate(calls) if name == "fsync" and f"<{tmp}>" in args]
    assert file_syncs and file_syncs[-1] < rename, f"{tmp} not fsynced before its rename"
    dir_syncs = [i for i, (name, args) in enumerate(calls) if name == "fsync" and f"<{Path(path).parent}>" in args]
    assert any(i > rename for i in dir_syncs), f"{Path(path).parent} not fsynced after the rename"


# --- unit: robust restore ---------------------------------------------------------------------


def _pod(ident: str, **fields: object) -> SandboxRecord:
    config = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name=ident, namespace="ns", uid=ident))
    return SandboxRecord(id=ident, config=encode_message(config), runtime_handler="runc", created_at=1, **fields)


def _container(ident: str, pod: str, image: str, **fields: object) -> ContainerRecord:
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=ident))
    return ContainerRecord(
        id=ident, pod_id=pod, config=encode_message(config), image=image, image_ref=image, image_name=image,
        runtime_handler="runc", created_at=1, log_path="/dev/null", bundle=fields.pop("bundle", "/nonexistent"),
        **fields,
    )


BAD_RECORDS = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: "",
    "not-json": lambda good: "\x00\x01garbage",
    "not-an-object": lambda good: "[1, 2]",
    "unknown-field": lambda good: json.dumps({**json.loads(good), "from_the_future": 1}),
    "missing-field": lambda good: json.dumps({k: v for k, v in json.loads(good).items() if k != "config"}),
    "wrong-type": lambda good: json.dumps({**json.loads(good), "ips": "10.0.0.1"}),
    "bad-state": lambda good: json.dumps({**json.loads(good), "state": "exploded"}),
}


@pytest.mark.parametrize("damage", sorted(BAD_RECORDS))
def test_a_damaged_state_record_is_moved_aside_and_the_others_load(tmp_path: Path, damage: str, caplog) -> None:
    """Item: robust restore (state). One bad pod record is skipped with a warning naming the file."""
    state = StateStore(tmp_path / "state")
    state.save_pod(_pod("good"))
    state.save_pod(_pod("bad"))
    bad = tmp_path / "state" / "pods" / "bad.json"
    bad.write_text(BAD_RECORDS[damage](bad.read_text()))
    with caplog.at_level(logging.WARNING, logger="pycrio.state"):
        again = StateStore(tmp_path / "state")
        again.open()
    assert [p.id for p in again.list_pods()] == ["good"]
    assert not bad.exists() and (bad.parent / "bad.json.corrupt").exists()
    assert any(str(bad) in r.getMessage() for r in caplog.records), caplog.text


def _image(hexchar: str, layers: list[str], tags: list[str]) -> ImageRecord:
    return ImageRecord(
        id=f"sha256:{hexchar * 64}", repo_tags=tags, repo_digests=[], manifest_digest=f"sha256:{'f' * 64}",
        config_digest=f"sha256:{hexchar * 64}",
        layer_blobs=[{"mediaType": "x", "digest": d, "size": 1} for d in layers], diff_ids=list(layers), size=1,
    )


def _layer(store: ImageStore, diff_id: str) -> Path:
    path = store.layer_path(diff_id)
    path.mkdir(parents=True, exist_ok=True)
    (path / "file").write_text(diff_id)
    return path


L_SHARED, L_A, L_B = (f"sha256:{c * 64}" for c in "123")


def test_a_damaged_image_record_is_moved_aside_and_the_others_load(tmp_path: Path, caplog) -> None:
    """Item: robust restore (images)."""
    store = ImageStore(tmp_path)
    store.open()
    store.add(_image("a", [L_SHARED], ["a:1"]))
    store.add(_image("b", [L_SHARED], ["b:1"]))
    bad = tmp_path / "images" / f"{'b' * 64}.json"
    bad.write_text(bad.read_text()[:40])
    with caplog.at_level(logging.WARNING, logger="pycrio.images"):
        again = ImageStore(tmp_path)
        again.open()
    assert [r.repo_tags for r in again.records()] == [["a:1"]]
    assert (bad.parent / f"{bad.name}.corrupt").exists()
    assert any(str(bad) in r.getMessage() for r in caplog.records), caplog.text


# --- unit: images in use, pins ----------------------------------------------------------------


def test_an_image_in_use_is_refused_and_keeps_its_layers(tmp_path: Path) -> None:
    """Item: RemoveImage of an image in use (records, or a container being made, or an image volume)."""
    store = ImageStore(tmp_path)
    store.open()
    a, b = store.add(_image("a", [L_SHARED, L_A], ["a:1"])), store.add(_image("b", [L_SHARED, L_B], ["b:1"]))
    layers = {d: _layer(store, d) for d in (L_SHARED, L_A, L_B)}
    users: dict[str, list[str]] = {a.id: ["c-recorded"]}
    store.in_use = lambda: users
    with pytest.raises(ImageInUse) as refused:
        store.remove(a)
    assert "c-recorded" in refused.value.message and refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    store.lease("c-being-made", b.id)
    with pytest.raises(ImageInUse, match="c-being-made"):
        store.remove(b)
    assert all(p.is_dir() for p in layers.values())
    store.release("c-being-made")
    assert store.remove(b) and not layers[L_B].exists() and layers[L_SHARED].is_dir()
    users.clear()
    assert store.remove(a) and not layers[L_SHARED].exists()
    assert store.remove(a) is False  # already gone: idempotent


def test_a_pinned_layer_survives_the_removal_of_the_image_sharing_it(tmp_path: Path) -> None:
    """Item: the pull/remove race, on the store: what a pull relies on stays until it commits."""
    store = ImageStore(tmp_path)
    store.open()
    b = store.add(_image("b", [L_SHARED, L_B], ["b:1"]))
    shared, own = _layer(store, L_SHARED), _layer(store, L_B)
    with store.pinned(L_SHARED):  # a pull of "a" found the shared layer in place and will reuse it
        store.remove(b)
        assert shared.is_dir() and not own.exists()
        store.add(_image("a", [L_SHARED], ["a:1"]))
    assert store.remove(store.find_record("a:1")) and not shared.exists()


# --- unit: reboot -----------------------------------------------------------------------------


def _records(state_dir: Path, runroot: Path, infra: tuple[int, int] = (0, 0)) -> None:
    (runroot / "pods" / "p1").mkdir(parents=True, exist_ok=True)
    (runroot / "containers" / "c1").mkdir(parents=True, exist_ok=True)
    state = StateStore(state_dir)
    state.save_pod(_pod("p1", directory=str(runroot / "pods" / "p1"), complete=True,
                        infra_id="p1infra", infra_pid=infra[0], infra_pid_start=infra[1]))
    state.save_container(_container("c1", "p1", "sha256:" + "a" * 64, state="running", pid=os.getpid(), started_at=5,
                                    bundle=str(runroot / "containers" / "c1")))
    state.save_container(_container("c2", "p1", "sha256:" + "a" * 64, state="exited", exit_code=3, finished_at=9))


def _open(state_dir: Path, runroot: Path) -> StateStore:
    state = StateStore(state_dir, runroot=runroot)
    state.open()
    return state


def test_fresh_runroot_after_a_start_means_the_runtime_state_is_gone(tmp_path: Path) -> None:
    """Item: reboot. Records under root, runroot emptied (as a reboot does): pods NOTREADY,
    containers EXITED 255/Unknown with a message saying why, pids forgotten; exited ones untouched."""
    state_dir, runroot = tmp_path / "root" / "state", tmp_path / "run"
    _records(state_dir, runroot, infra=(os.getpid(), process_start_time(os.getpid())))
    first = _open(state_dir, runroot)  # same boot, runroot intact: nothing changes
    assert first.get_pod("p1").state == "ready" and first.get_container("c1").state == "running"
    assert boot.read_marker(runroot) == boot.current_boot_id() == boot.read_marker(state_dir)

    shutil.rmtree(runroot)
    state = _open(state_dir, runroot)
    pod, c1, c2 = state.get_pod("p1"), state.get_container("c1"), state.get_container("c2")
    assert (pod.state, pod.infra_pid) == ("notready", 0)
    assert (c1.state, c1.exit_code, c1.reason, c1.pid) == ("exited", 255, "Unknown", 0)
    assert "emptied" in c1.message and c1.finished_at >= c1.started_at
    assert (c2.state, c2.exit_code) == ("exited", 3)
    # ...and that is what the records say from now on.
    reread = StateStore(state_dir)
    reread.open()
    assert reread.get_pod("p1").state == "notready" and reread.get_container("c1").exit_code == 255


def test_a_runroot_from_another_boot_means_a_reboot(tmp_path: Path) -> None:
    state_dir, runroot = tmp_path / "root" / "state", tmp_path / "run"
    _records(state_dir, runroot)
    boot.write_marker(runroot, "some-earlier-boot")
    state = _open(state_dir, runroot)
    assert state.get_pod("p1").state == "notready"
    assert "rebooted" in state.get_container("c1").message


def test_records_without_markers_and_their_runroot_intact_are_left_alone(tmp_path: Path) -> None:
    """An upgrade from a pycrio without boot markers must not declare live pods dead."""
    state_dir, runroot = tmp_path / "root" / "state", tmp_path / "run"
    _records(state_dir, runroot)
    state = _open(state_dir, runroot)
    assert state.get_pod("p1").state == "ready" and state.get_container("c1").state == "running"


def test_a_recycled_infra_pid_makes_the_pod_notready(tmp_path: Path) -> None:
    """Never trust a stored pid: same pid, other start time -> not the infra process any more."""
    state_dir, runroot = tmp_path / "root" / "state", tmp_path / "run"
    start = process_start_time(os.getpid())
    assert start
    _records(state_dir, runroot, infra=(os.getpid(), start + 1))
    state = _open(state_dir, runroot)
    assert state.get_pod("p1").state == "notready"


def test_the_store_remembers_which_process_the_infra_pid_is(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    pod = _pod("p1", infra_pid=os.getpid())
    state.save_pod(pod)
    assert pod.infra_pid_start == process_start_time(os.getpid())
    assert same_process(os.getpid(), pod.infra_pid_start) and not same_process(os.getpid(), 1)


def test_images_in_use_counts_image_volumes(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    c = _container("c1", "p1", "sha256:main")
    config = c.container_config
    config.mounts.add(container_path="/vol", image=api_pb2.ImageSpec(image="vol:1", image_ref="sha256:vol"))
    c.config = encode_message(config)
    state.save_container(c)
    assert state.images_in_use() == {"sha256:main": ["c1"], "sha256:vol": ["c1"]}


# --- with a real daemon -----------------------------------------------------------------------


def _conflist(directory: Path) -> Path:
    return bridge_network(directory, NETWORK, BRIDGE, SUBNET, portmap="portmap", filename="10-dstest.conflist")


def _cgroup_parent(daemon: PycrioDaemon) -> str:
    return f"/pycrio-dstest-{daemon.base.parent.name}"


@pytest.fixture(scope="module", autouse=True)
def _bridge() -> Iterator[None]:
    yield
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    shutil.rmtree(HOST_LOCAL_DIR, ignore_errors=True)


@pytest.fixture
def ds_daemon(make_daemon, tmp_path: Path, registry: TestRegistry) -> Iterator[PycrioDaemon]:
    netdir = _conflist(tmp_path / "net.d")
    daemon = make_daemon(config_text=(
        f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
        f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
        f'[pycrio.runtime]\npod_cgroup_parent = "/pycrio-dstest-{tmp_path.name}"\n'
    ))
    yield daemon
    if not daemon.alive():
        daemon.start()
    for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
        daemon.crictl("rmp", "-f", pod["id"], check=False)
    _assert_nothing_left(daemon)


def _assert_nothing_left(daemon: PycrioDaemon) -> None:
    base = str(daemon.base)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if base in line]
    assert mounts == [], mounts
    procs = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout
    assert base not in procs, procs
    parent = _cgroup_parent(daemon)
    assert not any(cgroups_under(parent)), f"pod cgroups left under {parent}: {list(cgroups_under(parent))}"
    cgroups.remove_cgroup(parent)
    links = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    assert links.strip() == "", links
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert SUBNET.rsplit(".", 1)[0] not in rules
    taken = [p.name for p in HOST_LOCAL_DIR.glob("10.*")] if HOST_LOCAL_DIR.exists() else []
    assert taken == [], f"host-local still holds {taken}"


def cgroups_under(parent: str) -> Iterator[Path]:
    """Directories below `parent` in any hierarchy (v1 controllers and the v2 mount)."""
    root = Path("/sys/fs/cgroup")
    for top in [root, *(p for p in root.iterdir() if p.is_dir())]:
        base = top / parent.lstrip("/")
        if base.is_dir():
            yield from (p for p in base.rglob("*") if p.is_dir())


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _pod_file(tmp_path: Path, name: str, **linux: object) -> Path:
    return _write(tmp_path, f"pod-{name}.json", {
        "metadata": {"name": name, "namespace": "dstest", "uid": f"uid-{name}", "attempt": 0},
        "hostname": name, "log_directory": str(tmp_path / "logs" / name), "linux": linux,
    })


def _ctr_file(tmp_path: Path, name: str, image: str, command: list[str]) -> Path:
    return _write(tmp_path, f"ctr-{name}.json", {
        "metadata": {"name": name}, "image": {"image": image}, "command": command, "log_path": f"{name}.log",
    })


def _state(daemon: PycrioDaemon, cid: str, want: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(daemon.crictl("inspect", cid).stdout)["status"]
        if status["state"] == want or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def _image_ids(daemon: PycrioDaemon) -> set[str]:
    return {i["id"] for i in json.loads(daemon.crictl("images", "-o", "json").stdout)["images"]}


def _layers_present(daemon: PycrioDaemon, reference: str) -> dict[str, bool]:
    with daemon.channel() as ch:
        status = daemon.images(ch).ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=reference), verbose=True), timeout=10)
    info = json.loads(status.info["info"])
    layers = daemon.base / "root" / "storage" / "layers"
    blobs = daemon.base / "root" / "storage" / "blobs" / "sha256"
    present = {d: (layers / d.removeprefix("sha256:")).is_dir() for d in info["diffIDs"]}
    present.update({d["digest"]: (blobs / d["digest"].removeprefix("sha256:")).is_file() for d in info["layers"]})
    return present


def test_images_in_use_are_refused_and_prune_skips_them(ds_daemon: PycrioDaemon, image_builder: ImageBuilder,
                                                        tmp_path: Path) -> None:
    """Item: RemoveImage refuses (FAILED_PRECONDITION, naming the containers) an image a created,
    a running or an exited container uses, or one mounted as an image volume; `crictl rmi --prune`
    removes only the unused image, and the running container keeps working."""
    d = ds_daemon
    used_by_exited_and_running = image_builder.busybox("ds/busybox", "1")
    volume = image_builder.multi_layer("ds/volume", "1", layers=1, layer_size=4096)
    used_by_created = image_builder.multi_arch("ds/created", "1")
    unused = image_builder.multi_layer("ds/unused", "1", layers=2, layer_size=1024)
    for image in (used_by_exited_and_running, volume, used_by_created, unused):
        d.crictl("pull", image.reference)
    podfile = _pod_file(tmp_path, "inuse")
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    exited = d.crictl("create", pod_id, str(_ctr_file(tmp_path, "done", used_by_exited_and_running.reference,
                                                       ["/bin/sh", "-c", "exit 0"])), str(podfile)).stdout.strip()
    d.crictl("start", exited)
    assert _state(d, exited, "CONTAINER_EXITED")["state"] == "CONTAINER_EXITED"
    created = d.crictl("create", pod_id, str(_ctr_file(tmp_path, "waiting", used_by_created.reference,
                                                        ["/bin/sleep", "1000"])), str(podfile)).stdout.strip()
    with d.channel() as ch:  # an image volume (crictl's JSON config has no image mounts)
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="running"), image=api_pb2.ImageSpec(image=used_by_exited_and_running.reference),
            command=["/bin/sleep", "1000"], log_path="running.log",
            mounts=[api_pb2.Mount(container_path="/vol", readonly=True, image=api_pb2.ImageSpec(image=volume.reference))],
        )
        pod_config = api_pb2.PodSandboxConfig()
        pod_config.metadata.name, pod_config.metadata.namespace, pod_config.metadata.uid = "inuse", "dstest", "uid-inuse"
        running = d.runtime(ch).CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=60).container_id
    d.crictl("start", running)
    assert _state(d, running, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"

    for image, users in ((used_by_exited_and_running, {exited, running}), (volume, {running}),
                         (used_by_created, {created})):
        refused = d.crictl("rmi", image.reference, check=False)
        assert refused.returncode != 0, f"{image.reference} was removed while in use"
        assert "FailedPrecondition" in refused.stderr and "in use" in refused.stderr, refused.stderr
        assert all(u in refused.stderr for u in users), refused.stderr
        refused = d.crictl("rmi", image.config_digest, check=False)  # by id too
        assert refused.returncode != 0 and "in use" in refused.stderr

    pruned = d.crictl("rmi", "--prune")
    assert f"Deleted: {unused.reference}" in pruned.stdout, pruned.stdout + pruned.stderr
    assert _image_ids(d) == {used_by_exited_and_running.config_digest, volume.config_digest,
                             used_by_created.config_digest}
    for image in (used_by_exited_and_running, volume, used_by_created):
        assert all(_layers_present(d, image.reference).values()), image.reference
    out = d.crictl("exec", "-s", running, "/bin/sh", "-c", "ls /bin/busybox /vol/data && echo ok").stdout
    assert "ok" in out

    d.crictl("rm", "-f", running, exited, created)
    d.crictl("rmi", "--prune")
    assert _image_ids(d) == set()
    d.crictl("rmp", "-f", pod_id)


def test_concurrent_pulls_and_removals_keep_the_surviving_images_layers(
    ds_daemon: PycrioDaemon, image_builder: ImageBuilder
) -> None:
    """Item: the race between a pull that reuses a layer and the removal of another image that
    shares it. `big` shares its base layer with `small`; `big` is pulled while `small` is
    removed; afterwards every layer and blob of `big` must be there, every round."""
    d = ds_daemon
    small = image_builder.busybox("ds/race-small", "1")
    big = image_builder.multi_layer("ds/race-big", "1", layers=2, layer_size=6 * 1024 * 1024)
    rng = random.Random(11)
    failures: list[str] = []
    with d.channel() as ch:
        images = d.images(ch)

        def pull(ref: str) -> None:
            images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120)

        def remove(ref: str) -> None:
            images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=60)

        for round_ in range(8):
            # `small` (and its base layer) is there, `big` is not; pull `big` and remove `small` at once.
            remove(big.reference)
            pull(small.reference)
            puller = threading.Thread(target=pull, args=(big.reference,))
            puller.start()
            time.sleep(rng.uniform(0.0, 0.4))
            remove(small.reference)
            puller.join()
            missing = [k for k, ok in _layers_present(d, big.reference).items() if not ok]
            if missing:
                failures.append(f"round {round_}: {big.reference} lost {missing}")
            # ...and the other way round: `big` stays, `small` comes and goes.
            pull(small.reference)
            assert all(_layers_present(d, big.reference).values())
            assert all(_layers_present(d, small.reference).values())
    assert failures == []


def test_restart_skips_a_damaged_pod_record_and_image_record(ds_daemon: PycrioDaemon, image_builder: ImageBuilder,
                                                             tmp_path: Path) -> None:
    """Item: robust restore. One of two pod records and one of two image records are damaged
    while the daemon is down; it starts, serves the others, and its warning names each file."""
    d = ds_daemon
    first, second = image_builder.busybox("ds/keep", "1"), image_builder.multi_layer("ds/lose", "1", layers=1,
                                                                                      layer_size=2048)
    for image in (first, second):
        d.crictl("pull", image.reference)
    host = {"security_context": {"namespace_options": {"network": 2, "pid": 2, "ipc": 2}}}  # nothing pinned to leak
    kept = d.crictl("runp", str(_pod_file(tmp_path, "kept", **host))).stdout.strip()
    lost = d.crictl("runp", str(_pod_file(tmp_path, "lost", **host))).stdout.strip()
    assert d.stop() == 0
    pod_record = d.base / "root" / "state" / "pods" / f"{lost}.json"
    pod_record.write_text(pod_record.read_text()[:100])  # truncated mid-write
    image_record = d.base / "root" / "storage" / "images" / f"{second.config_digest[7:]}.json"
    image_record.write_text(json.dumps({**json.loads(image_record.read_text()), "future_field": True}))

    d.start()
    assert [p["id"] for p in json.loads(d.crictl("pods", "-o", "json").stdout)["items"]] == [kept]
    assert _image_ids(d) == {first.config_digest}
    logs = d.logs()
    for path in (pod_record, image_record):
        assert re.search(rf"level=warn.*{re.escape(str(path))}", logs), f"no warning naming {path}"
        assert path.with_name(path.name + ".corrupt").exists()
    assert "future_field" in logs and "skipping unreadable" in logs
    # The daemon serves as usual: the damaged image can be pulled again.
    d.crictl("pull", second.reference)
    assert _image_ids(d) == {first.config_digest, second.config_digest}
    d.crictl("rmp", "-f", kept)
    shutil.rmtree(d.base / "run" / "pods" / lost, ignore_errors=True)  # its record is gone: the test cleans up


def _simulate_reboot(daemon: PycrioDaemon) -> None:
    """What a reboot does to a node whose daemon was SIGKILLed: every process of the pods and
    every conmon die, mounts (namespace pins, /dev/shm, overlays) and cgroups go away, the
    runroot tmpfs comes back empty, the kernel's iptables rules are gone; root stays."""
    base = str(daemon.base)
    parent = _cgroup_parent(daemon)
    victims = set()
    for cgroup in cgroups_under(parent):
        procs = cgroup / "cgroup.procs"
        if procs.exists():
            victims.update(int(p) for p in procs.read_text().split())
    conmons = subprocess.run(["pgrep", "-f", f"conmon.*{base}"], capture_output=True, text=True).stdout.split()
    victims.update(int(p) for p in conmons)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in victims) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(5):
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if base in line.split()[4]]
        if not points:
            break
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
    for cgroup in sorted(cgroups_under(parent), key=lambda p: len(str(p)), reverse=True):
        try:
            cgroup.rmdir()
        except OSError:
            pass
    shutil.rmtree(daemon.base / "run")
    for table in ("nat", "filter"):
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout.splitlines()
        chains = {m.group(1) for r in rules if SUBNET.rsplit(".", 1)[0] in r for m in [re.search(r"-j (CNI-\S+)", r)] if m}
        for rule in rules:
            if rule.startswith("-A ") and (SUBNET.rsplit(".", 1)[0] in rule or any(c in rule.split() for c in chains)):
                subprocess.run(["iptables", "-t", table, *shlex.split(rule.replace("-A ", "-D ", 1))], capture_output=True)
        for chain in chains:
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)


def test_after_a_reboot_pods_are_notready_containers_exited_and_rmp_cleans_up(
    ds_daemon: PycrioDaemon, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """Item: reboot. Same root, fresh runroot, the pods' processes and namespaces gone: the pod
    is NOTREADY (PodSandboxStatus too), its containers EXITED with 255/Unknown and a message
    naming the reboot, no stored pid is used, and `crictl rmp -f` leaves nothing on the host."""
    d = ds_daemon
    busybox = image_builder.busybox("ds/reboot", "1")
    d.crictl("pull", busybox.reference)
    podfile = _pod_file(tmp_path, "rebooted")
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    running = d.crictl("create", pod_id, str(_ctr_file(tmp_path, "long", busybox.reference, ["/bin/sleep", "1000"])),
                       str(podfile)).stdout.strip()
    d.crictl("start", running)
    created = d.crictl("create", pod_id, str(_ctr_file(tmp_path, "never", busybox.reference, ["/bin/echo", "never started"])),
                       str(podfile)).stdout.strip()
    assert _state(d, running, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"
    assert json.loads(d.crictl("inspectp", pod_id).stdout)["status"]["state"] == "SANDBOX_READY"
    assert HOST_LOCAL_DIR.exists() and list(HOST_LOCAL_DIR.glob("10.*")), "the pod holds an IP"

    d.stop(sig=signal.SIGKILL)
    _simulate_reboot(d)
    d.start()

    pod = json.loads(d.crictl("inspectp", pod_id).stdout)["status"]
    assert pod["state"] == "SANDBOX_NOTREADY"
    assert "runtime state is gone" in d.wait_for_log("container(s) EXITED")
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"][0]["state"] == "SANDBOX_NOTREADY"
    for cid in (running, created):
        status = json.loads(d.crictl("inspect", cid).stdout)["status"]
        assert status["state"] == "CONTAINER_EXITED", status
        assert (status["exitCode"], status["reason"]) == (255, "Unknown"), status
        assert "runtime state is gone" in status["message"]
    with d.channel() as ch:  # the same through the CRI, as kubelet reads it
        rt = d.runtime(ch)
        for cid in (running, created):
            status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
            assert status.finished_at >= status.started_at and status.finished_at > 0
        assert rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                   timeout=10).status.state == api_pb2.SANDBOX_NOTREADY
    # kubelet would now create a new pod; the old one is removed with everything it held.
    d.crictl("rmp", "-f", pod_id)
    assert json.loads(d.crictl("pods", "-o", "json").stdout)["items"] == []
    assert json.loads(d.crictl("ps", "-a", "-o", "json").stdout)["containers"] == []
    assert list((d.base / "root" / "state" / "pods").glob("*.json")) == []
    assert list((d.base / "root" / "storage" / "containers").iterdir()) == []
    _assert_nothing_left(d)
    # A new pod on the rebooted node works.
    again = d.crictl("runp", str(_pod_file(tmp_path, "after"))).stdout.strip()
    assert json.loads(d.crictl("inspectp", again).stdout)["status"]["state"] == "SANDBOX_READY"
    d.crictl("rmp", "-f", again)


def test_a_pod_whose_infra_process_dies_is_notready_at_once(ds_daemon: PycrioDaemon, tmp_path: Path) -> None:
    """Not only after a restart: PodSandboxStatus re-checks the infra process (by its start time)."""
    shared = {"security_context": {"namespace_options": {"pid": 0}}}  # POD: a catatonit infra process
    pod_id = ds_daemon.crictl("runp", str(_pod_file(tmp_path, "infra", **shared))).stdout.strip()
    with ds_daemon.channel() as channel:
        status = ds_daemon.runtime(channel).PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=10)
    assert status.status.state == api_pb2.SANDBOX_READY
    infra = json.loads(status.info["info"])["pid"]
    assert infra > 0

    os.kill(infra, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{infra}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    # ListPodSandbox knows from the runtime's exit report (kubelet polls it: no /proc reads per pod)
    deadline = time.monotonic() + 10
    while True:
        listed = json.loads(ds_daemon.crictl("pods", "-o", "json").stdout)["items"]
        states = [p["state"] for p in listed if p["id"] == pod_id]
        if states != ["SANDBOX_READY"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert states == ["SANDBOX_NOTREADY"]
    assert json.loads(ds_daemon.crictl("inspectp", pod_id).stdout)["status"]["state"] == "SANDBOX_NOTREADY"
    ds_daemon.crictl("rmp", "-f", pod_id)

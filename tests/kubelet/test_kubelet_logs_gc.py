"""What kubelet does to a node's containers, logs and images over time, against pycrio:

- log rotation: kubelet renames a container's log file past `containerLogMaxSize`, asks the
  runtime to reopen it (ReopenContainerLog: conmon with the "oci" handler, pycrio-monitor with
  "pod"), compresses the older rotated files and keeps at most `containerLogMaxFiles`; not a
  line is lost or doubled across the files, and `kubectl logs` (kubelet's containerLogs API) keeps
  showing the newest lines;
- container GC: the dead instances of a crash-looping container are removed (RemoveContainer)
  down to kubelet's policy (MaxPerPodContainer 1, pkg/kubelet/kuberuntime/kuberuntime_gc.go and
  cmd/kubelet/app/options: the deprecated --maximum-dead-containers-per-container, default 1),
  with nothing of them left in pycrio; a deleted pod's sandbox goes at kubelet's periodic GC
  (ContainerGCPeriod, a constant minute in pkg/kubelet/kubelet.go: the one long wait here);
- image GC and eviction: kubelet's image calls (ImageFsInfo, ListImages, ImageStatus) succeed,
  its summary API reports the image filesystem pycrio names with the capacity of that disk, and
  the only image GC / eviction errors in its log are kubelet's own (see KUBELET_SIDE_ERRORS);
  under disk pressure its image GC removes the image no container uses, and pycrio frees it.

Three nodes, one after the other (NODES): "oci" and "pod" (the handler types) with kubelet's
rotation settings small (10 KiB, 3 files, checked every 3 s: containerLogMonitorInterval's
minimum, pkg/kubelet/apis/config/validation), and "pressure" for the image GC.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.kubelet.harness import (
    LOGS, NODE_NAME, KubeletNode, container, container_status, eventually, inspect, remove_pod, requires_kubelet,
    runtime_containers, runtime_pods, state, static_pod, wait,
)
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry

pytestmark = requires_kubelet

LOG_MAX_SIZE = 10 * 1024
LOG_MAX_FILES = 3
ROTATION_CONFIG = {"containerLogMaxSize": "10Ki", "containerLogMaxFiles": LOG_MAX_FILES,
                   "containerLogMonitorInterval": "3s"}
ROTATIONS = 3  # the third rotation deletes the first rotated file (MaxFiles 3)
# the container's lines are numbered: first FAST_LINES lines of ~140 bytes (as CRI lines), 50 a
# second (~21 KiB per 3-s check: each check rotates), then one every 2 s (no rotation for minutes)
FAST_LINES = 800
PAD = "x" * 90
WRITER = (f"trap 'exit 0' TERM; i=0; while [ $i -lt {FAST_LINES} ]; do j=0; while [ $j -lt 50 ]; do "
          f"i=$((i+1)); j=$((j+1)); echo \"line $i {PAD}\"; done; sleep 1; done; "
          f"while :; do i=$((i+1)); echo \"line $i {PAD}\"; sleep 2; done")
NUMBERED = re.compile(r"^line (\d+) x+$")

# kubelet's image GC / eviction errors that are not about the runtime's answers:
KUBELET_SIDE_ERRORS = {
    # the first image GC runs as kubelet starts, before cadvisor's first housekeeping: the capacity
    # of pycrio's mountpoint is not known yet ("unable to find data in memory cache" at V2 just
    # before); the next GC is 5 minutes later (ImageGCPeriod). Any runtime gets it
    ("kubelet.go", "Image garbage collection failed once. Stats initialization may not have completed yet",
     "invalid capacity 0 on image filesystem"),
    # HasDedicatedContainerFs asks cadvisor for the image/container fs by label, which cadvisor only
    # knows for an endpoint ending in crio.sock (pkg/kubelet/cadvisor/helpers_linux.go); containerd
    # gets the same, and kubelet goes on with the CRI's ImageFsInfo
    ("eviction_manager.go", "eviction manager: failed to check if we have separate container filesystem. Ignoring.",
     "no imagefs label for configured runtime"),
}
KLOG = re.compile(r'^([EW])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] "((?:[^"\\]|\\.)*)"(?:.*?\berr="((?:[^"\\]|\\.)*)")?')


# --------------------------------------------------------------------------- fixtures


# a node whose kubelet is under (made-up) image filesystem pressure from the start: its eviction
# manager reclaims (every 10 s) through container GC and image GC (DeleteUnusedImages); images
# older than a second may go (imageMinimumGCAge, 2 min by default; 0 means the default)
PRESSURE_CONFIG = {"evictionHard": {"imagefs.available": "99%"}, "imageMinimumGCAge": "1s"}
NODES = {"oci": ("oci", ROTATION_CONFIG), "pod": ("pod", ROTATION_CONFIG), "pressure": ("oci", PRESSURE_CONFIG)}


@pytest.fixture(scope="module")
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, registry: TestRegistry,
    image: BuiltImage, traces: OTLPReceiver,
) -> Iterator[KubeletNode]:
    """The node of NODES[param] (tests choose with an indirect parametrization: one node at a
    time, each made once for the tests that use it)."""
    runtime_type, config = NODES[request.param]
    kubelet = KubeletNode(
        tmp_path_factory.mktemp(f"kubelet-logs-gc-{request.param}"), registry.address, runtime_type=runtime_type,
        tracing_endpoint=traces.endpoint, feature_gates={"ReduceDefaultCrashLoopBackOffDecay": True},
        config=config,
    ).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
        kubelet.keep_logs(LOGS / f"logs-gc-{request.param}")
    assert kubelet.host_changes() == [], "the host is not as it was before kubelet ran"


on_nodes = pytest.mark.parametrize("node", ["oci", "pod"], indirect=True)
only_oci = pytest.mark.parametrize("node", ["oci"], indirect=True)
under_pressure = pytest.mark.parametrize("node", ["pressure"], indirect=True)


# --------------------------------------------------------------------------- helpers


def kubelet_api(node: KubeletNode, path: str) -> bytes:
    """GET `path` on kubelet's own API (loopback, anonymous, AlwaysAllow)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{node.port}{path}", timeout=10, context=context) as reply:
        body: bytes = reply.read()
        return body


def cri_messages(data: bytes) -> list[str]:
    """The messages of a CRI (k8s-file) log: `<time> <stream> <P|F> <text>` lines, partial
    (P) pieces joined to the full (F) line they start."""
    messages, partial = [], b""
    for line in data.splitlines():
        _, _, tag, text = line.split(b" ", 3) if line.count(b" ") >= 3 else (b"", b"", b"F", b"")
        if tag == b"P":
            partial += text
            continue
        messages.append((partial + text).decode(errors="replace"))
        partial = b""
    return messages


def numbers(messages: list[str]) -> list[int]:
    found = []
    for message in messages:
        match = NUMBERED.match(message)
        assert match, f"not a line of the writer: {message!r}"
        found.append(int(match[1]))
    return found


def gaps(sequence: list[int]) -> list[tuple[int, int]]:
    """Where `sequence` is not n, n+1, n+2...: (previous, next) pairs."""
    return [(a, b) for a, b in zip(sequence, sequence[1:]) if b != a + 1]


def paths_naming(root: Path, ids: set[str]) -> list[str]:
    """Files and directories below `root` whose name holds one of `ids` (pycrio's state of them)."""
    found = []
    for directory, subdirs, files in os.walk(root, onerror=lambda _: None):
        found += [os.path.join(directory, n) for n in subdirs + files if any(i in n for i in ids)]
    return found


def pycrio_state_of(node: KubeletNode, ids: set[str]) -> list[str]:
    """What pycrio still has of the objects `ids`: paths, mounts, monitor processes."""
    left = paths_naming(node.daemon.base / "root", ids) + paths_naming(node.daemon.base / "run", ids)
    left += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if any(i in line for i in ids)]
    processes = subprocess.run(["pgrep", "-af", "conmon|pycrio-monitor"], capture_output=True, text=True).stdout
    left += [f"process {line}" for line in processes.splitlines() if any(i in line for i in ids)]
    return left


def trace_of_log_line(node: KubeletNode, message: str) -> str:
    """The trace id pycrio logged with the line whose msg is `message`."""
    match = re.search(r'msg="' + re.escape(message) + r'".*? trace_id=(\w+)', node.daemon.logs())
    assert match, f"pycrio never logged {message!r}"
    return match[1]


def kubelet_root_span(spans: list[ReceivedSpan], trace_id: str) -> str:
    """The name of kubelet's top span in trace `trace_id` (what kubelet was doing)."""
    ours = [s for s in spans if s.trace_id == trace_id and s.service == "kubelet"]
    ids = {s.span_id for s in ours}
    roots = [s.name for s in ours if s.parent_span_id not in ids]
    assert roots, f"no kubelet span in trace {trace_id}"
    return roots[0]


def image_errors(node: KubeletNode) -> list[tuple[str, str, str]]:
    """kubelet's E/W lines about images, image GC, image filesystems and eviction:
    (source file, message, err)."""
    found = []
    for line in node.logs().splitlines():
        match = KLOG.match(line)
        if match and re.search(r"(?i)image|evict|filesystem", line):
            found.append((match[2], match[3], match[4] or ""))
    return found


# --------------------------------------------------------------------------- log rotation


@on_nodes
def test_log_rotation_reopens_the_log_and_loses_no_line(node: KubeletNode, image: BuiltImage) -> None:
    node.write_manifest("logger", static_pod("logger", [container("app", image, WRITER)]))
    pod = node.wait_pod("logger", lambda p: state(container_status(p, "app")) == "running", what="running")
    cid = container_status(pod, "app")["containerID"].removeprefix("pycrio://")
    log = Path(inspect(node, cid)["status"]["logPath"])
    assert log.parent.parent.parent == node.pod_logs and log.name == "0.log", log

    compressed: dict[str, bytes] = {}  # rotation timestamp -> that file's content, once gzipped (final)
    seen: set[str] = set()  # every rotation's timestamp
    most_files = 0

    def look() -> list[str]:
        """The rotated files now (names), reading each new .gz whole before kubelet deletes it as
        excess (two rotations later)."""
        nonlocal most_files
        names = sorted(p.name for p in log.parent.iterdir() if not p.name.endswith(".tmp"))
        most_files = max(most_files, len(names))
        for name in names:
            stamp = name.removeprefix("0.log.").removesuffix(".gz")
            if name.endswith(".gz") and stamp not in compressed:
                try:
                    compressed[stamp] = gzip.decompress((log.parent / name).read_bytes())
                except (FileNotFoundError, EOFError):
                    continue  # already gone: reported below as never read
            if name != "0.log":
                seen.add(stamp)
        return [n for n in names if n != "0.log"]

    def last_number() -> int:
        """The number of the last whole line in the current file (0: none, or no file between
        kubelet's rename and the reopen)."""
        try:
            ends = [int(m[1]) for m in map(NUMBERED.match, cri_messages(log.read_bytes())[-2:]) if m]
        except FileNotFoundError:
            return 0
        return max(ends, default=0)

    # the fast phase rotates at every check; after it, kubelet's rotations stop (or nearly)
    deadline = time.monotonic() + 90
    names, changed = look(), time.monotonic()
    present = time.monotonic()
    while not (last_number() > FAST_LINES and time.monotonic() - changed > 4 and len(seen) >= ROTATIONS):
        assert time.monotonic() < deadline, f"{len(seen)} rotations in 90 s: {sorted(seen)}, at line {last_number()}"
        if log.exists():
            present = time.monotonic()
        # kubelet retries a missing file's reopen at each check (3 s)
        assert time.monotonic() - present < 10, f"{log} not reopened after rotation {max(seen, default='')}"
        time.sleep(0.3)
        if (now := look()) != names:
            names, changed = now, time.monotonic()

    # at most MaxFiles at any time: the current file, the newest rotated one, older ones gzipped
    assert most_files <= LOG_MAX_FILES, most_files
    assert all(re.fullmatch(r"\d{8}-\d{6}", stamp) for stamp in seen), seen  # kubelet's timestamp format
    assert len(names) == LOG_MAX_FILES - 1, names
    older, newest = names
    assert older.endswith(".gz") and not newest.endswith(".gz") and older[:-3] < newest, names
    assert not any(n.startswith(f"0.log.{min(seen)}") for n in names), "the oldest rotated file is kept"

    # every line, in order, across the files still there and those kubelet deleted since: the
    # newest rotated file is read before the current one, and again if a rotation came between
    while True:
        contents = dict(compressed)
        contents[newest.removeprefix("0.log.")] = (log.parent / newest).read_bytes()
        current = log.read_bytes()
        if (now := look()) == names:
            break
        names, newest = now, now[-1]
    missing = sorted(seen - set(contents))
    assert not missing, f"rotated files never read (deleted between two looks): {missing}"
    order = [*sorted(contents), "current"]
    contents["current"] = current
    sequence = numbers(cri_messages(b"".join(contents[s] for s in order)))
    print(f"{len(seen)} rotations; lines per file:",
          {s: contents[s].count(b" F line ") for s in order})
    assert sequence[0] == 1 and sequence[-1] > FAST_LINES, (sequence[:3], sequence[-3:])
    assert gaps(sequence) == [], f"lines lost or doubled between files: {gaps(sequence)}"
    # after each rotation the writer went on in the new file at the path: every file holds lines;
    # kubelet rotated each at its size
    assert all(contents[s].count(b" F line ") for s in order), {s: len(contents[s]) for s in order}
    assert all(len(contents[s]) >= LOG_MAX_SIZE for s in order[:-1]), {s: len(contents[s]) for s in order}

    # and still does (the slow phase), which kubectl logs shows: kubelet reads the file at the
    # path the runtime reported
    def grown() -> list[int]:
        now = numbers(cri_messages(log.read_bytes()))
        assert len(now) >= 3 and now[-1] > sequence[-1], (now[-3:], sequence[-1])
        return now

    eventually(grown, timeout=15)  # a line every 2 s
    newest_on_disk = grown()[-1]
    tail = kubelet_api(node, f"/containerLogs/default/logger-{NODE_NAME}/app?tailLines=3").decode()
    shown = numbers(tail.splitlines())
    assert len(shown) == 3 and shown[-1] >= newest_on_disk and gaps(shown) == [], tail
    failed = re.compile(r"(?i)rotate log|reopen container log|container log")
    assert [line for line in node.logs().splitlines() if failed.search(line) and line[:1] in "EW"] == []
    remove_pod(node, "logger")


# --------------------------------------------------------------------------- container GC


@only_oci
def test_dead_containers_and_sandboxes_are_garbage_collected(node: KubeletNode, image: BuiltImage,
                                                            traces: OTLPReceiver) -> None:
    node.write_manifest("crashloop", static_pod("crashloop", [
        container("fails", image, "echo attempt failing; exit 1"),
    ], restartPolicy="Always"))
    sandbox = wait(lambda: runtime_pods(node, "crashloop"), 30, "the sandbox")[0]["id"]
    uid = runtime_pods(node, "crashloop")[0]["metadata"]["uid"]
    created_line = re.compile(rf'msg="created container (\w+) \(fails\) in pod {sandbox}"')

    def created() -> list[str]:
        return created_line.findall(node.daemon.logs())

    # back-off 1, 2, 4 s (ReduceDefaultCrashLoopBackOffDecay): five instances in about 10 s
    wait(lambda: len(created()) >= 5, 60, "five instances of the failing container", interval=0.5)

    def kept_per_policy() -> tuple[list[str], list[dict[str, Any]]]:
        order = created()
        listed = runtime_containers(node, "crashloop")
        assert created() == order, "a new instance meanwhile: look again"
        exited = [c for c in listed if c["state"] == "CONTAINER_EXITED"]
        # kubelet keeps the newest dead instance (MaxPerPodContainer 1) and the one it runs now
        assert len(exited) <= 1 and len(listed) - len(exited) <= 1, [(c["id"][:12], c["state"]) for c in listed]
        assert {c["id"] for c in listed} <= set(order) and len(order) - len(listed) >= 3, (order, listed)
        if exited:  # the one kept is the newest that died
            alive = {c["id"] for c in listed if c["state"] != "CONTAINER_EXITED"}
            assert exited[0]["id"] == [cid for cid in order if cid not in alive][-1], (exited, order)
        return order, listed

    eventually(kept_per_policy, timeout=15)
    order, listed = kept_per_policy()
    removed = set(order) - {c["id"] for c in listed}

    # removed through RemoveContainer, and nothing of them left: pycrio's record, files, mounts,
    # conmon; kubelet deleted their log files (the paths pycrio's ContainerStatus gave)
    for cid in removed:
        assert f'msg="removed container {cid}"' in node.daemon.logs(), cid
        gone = node.crictl("inspect", cid, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr, gone
    eventually(lambda: _assert_empty(pycrio_state_of(node, removed)), timeout=20)
    logs_dir = node.pod_logs / f"default_crashloop-{NODE_NAME}_{uid}" / "fails"
    removed_logs = {f"{order.index(cid)}.log" for cid in removed}  # an instance's ATTEMPT is its place
    assert {p.name for p in logs_dir.iterdir()} & removed_logs == set(), sorted(p.name for p in logs_dir.iterdir())
    # who removed them: kubelet's pod container deletor (on each ContainerDied, keeping 1) or its
    # periodic GC ("Containers/GarbageCollect")
    traces_of = {cid: trace_of_log_line(node, f"removed container {cid}") for cid in removed}
    eventually(lambda: _assert_empty([c for c, t in traces_of.items() if not _kubelet_spans(traces, t)]), timeout=15)
    print("dead instances removed by:", {cid[:12]: kubelet_root_span(traces.spans(), t) for cid, t in traces_of.items()})

    # the pod deleted: its containers go, then its sandbox at kubelet's periodic GC (every minute),
    # and kubelet's pod log directory with it
    all_ids = set(created()) | {sandbox}
    started = time.monotonic()
    remove_pod(node, "crashloop")
    wait(lambda: runtime_containers(node, "crashloop") == [], 70, "kubelet removes the containers", interval=1)
    wait(lambda: runtime_pods(node, "crashloop") == [], 70, "kubelet's GC removes the sandbox", interval=1)
    print(f"crashloop: manifest deleted -> sandbox removed in {time.monotonic() - started:.1f}s")
    sandbox_trace = trace_of_log_line(node, f"pod sandbox {sandbox} removed")

    def removed_by_gc() -> None:
        assert kubelet_root_span(traces.spans(), sandbox_trace) == "Containers/GarbageCollect"

    eventually(removed_by_gc, timeout=20)
    eventually(lambda: _assert_empty(pycrio_state_of(node, all_ids)), timeout=20)
    wait(lambda: not logs_dir.parent.exists(), 10, "kubelet removes the pod's log directory")
    failures = [line for line in node.logs().splitlines() if line[:1] == "E" and re.search(
        r"Container garbage collection failed|Failed to remove (container|sandbox)|Failed to stop sandbox", line)]
    assert failures == []


def _assert_empty(left: list[str]) -> None:
    assert left == []


def _kubelet_spans(traces: OTLPReceiver, trace_id: str) -> list[ReceivedSpan]:
    return traces.spans(lambda s: s.trace_id == trace_id and s.service == "kubelet")


# --------------------------------------------------------------------------- images


@only_oci
def test_image_filesystem_and_image_calls(node: KubeletNode, image: BuiltImage, traces: OTLPReceiver) -> None:
    node.write_manifest("imagefs", static_pod("imagefs", [container("app", image, "exec sleep 1000")]))
    node.wait_pod("imagefs", lambda p: state(container_status(p, "app")) == "running", what="running")

    info = node.crictl_json("imagefsinfo")["status"]
    print("pycrio's ImageFsInfo:", json.dumps(info))
    assert len(info["imageFilesystems"]) == 1, info  # kubelet reads the first only
    usage = info["imageFilesystems"][0]
    # containers' writable layers live in the same store (kubelet's CRI stats take the image fs
    # for both; containerd sends no container filesystems, CRI-O its own when split)
    assert [c["fsId"] for c in info.get("containerFilesystems", [])] in ([], [usage["fsId"]]), info
    mountpoint = Path(usage["fsId"]["mountpoint"])
    assert mountpoint.is_dir() and mountpoint.is_relative_to(node.daemon.base / "root"), mountpoint
    assert int(usage["usedBytes"]["value"]) > 0 and int(usage["inodesUsed"]["value"]) > 0, usage
    assert abs(int(usage["timestamp"]) / 1e9 - time.time()) < 60, usage

    # what kubelet makes of it (its summary API: the eviction manager's and metrics' source): the
    # bytes pycrio counts, and the capacity of the disk under pycrio's mountpoint (from cadvisor;
    # the CRI's FilesystemUsage has no capacity)
    disk = os.statvfs(mountpoint)

    def summary_image_fs() -> dict[str, Any]:
        fs: dict[str, Any] = json.loads(kubelet_api(node, "/stats/summary"))["node"]["runtime"]["imageFs"]
        assert fs.get("capacityBytes") == disk.f_blocks * disk.f_frsize, fs
        return fs

    fs = wait(lambda: _passes(summary_image_fs), 30, "kubelet's summary has the image filesystem", interval=2)
    print("kubelet's summary imageFs:", json.dumps(fs))
    assert 0 < fs["availableBytes"] <= fs["capacityBytes"] and fs["inodes"] == disk.f_files, fs
    now = int(node.crictl_json("imagefsinfo")["status"]["imageFilesystems"][0]["usedBytes"]["value"])
    assert abs(fs["usedBytes"] - now) <= 1024 * 1024, (fs["usedBytes"], now)  # containers write a little

    # every image call kubelet made so far (startup, image GC, eviction, pulls) succeeded
    calls = traces.spans(lambda s: s.service == "pycrio" and s.name.startswith("/runtime.v1.ImageService/"))
    methods = {s.name.rsplit("/", 1)[1] for s in calls}
    assert {"ImageFsInfo", "ListImages", "ImageStatus"} <= methods, methods
    failed = [(s.name, s.attributes.get("rpc.grpc.status_code"), s.status_message) for s in calls
              if s.attributes.get("rpc.grpc.status_code") != 0]
    assert failed == []
    errors = image_errors(node)
    print("kubelet's image GC / eviction errors:", errors)
    assert [e for e in errors if e not in KUBELET_SIDE_ERRORS] == []
    assert errors.count(next(iter(e for e in KUBELET_SIDE_ERRORS if e[0] == "kubelet.go"))) <= 1
    remove_pod(node, "imagefs")


def _passes(check: Any) -> Any:
    try:
        return check()
    except AssertionError:
        return None


@under_pressure
def test_image_gc_under_disk_pressure_removes_unused_images(
    node: KubeletNode, image: BuiltImage, image_builder: ImageBuilder
) -> None:
    """kubelet's image GC (here the eviction manager's DeleteUnusedImages: the periodic one runs
    every 5 minutes) lists pycrio's images and its containers, and removes the images no
    container uses: it knows them by ListImages' id = ListContainers' image_ref."""
    node.write_manifest("inuse", static_pod("inuse", [container("app", image, "exec sleep 1000")]))
    pod = node.wait_pod("inuse", lambda p: state(container_status(p, "app")) == "running", what="running")
    cid = container_status(pod, "app")["containerID"].removeprefix("pycrio://")
    unused = image_builder.multi_layer("kubelet/unused", "1", layers=1, layer_size=256 * 1024)
    node.crictl("pull", unused.reference)
    listed = {tag: i["id"] for i in node.crictl_json("images")["images"] for tag in i["repoTags"]}
    in_use_id, unused_id = listed[image.reference], listed[unused.reference]
    running = next(c for c in node.crictl_json("ps")["containers"] if c["id"] == cid)
    assert running["imageRef"] == in_use_id, (running["imageRef"], in_use_id)
    # what only the unused image holds on disk (README "Store layout"): its config and layer
    # blobs, its unpacked layers
    storage = node.daemon.base / "root" / "storage"
    records = {i: json.loads((storage / "images" / f"{i.removeprefix('sha256:')}.json").read_text())
               for i in (in_use_id, unused_id)}
    shared = set(records[in_use_id]["diff_ids"])
    own = [storage / "blobs" / "sha256" / d.removeprefix("sha256:")
           for d in (unused.config_digest, *unused.layers) if d not in image.layers]
    own += [storage / "layers" / d.removeprefix("sha256:") for d in records[unused_id]["diff_ids"] if d not in shared]
    assert len(own) >= 4 and all(path.exists() for path in own), own

    def images_now() -> list[str]:
        return [i["id"] for i in node.crictl_json("images")["images"]]

    wait(lambda: unused_id not in images_now(), 60, "kubelet's image GC removes the unused image", interval=2)
    assert f'"Removing image to free bytes" imageID="{unused_id}"' in node.logs()
    assert in_use_id in images_now() and f'imageID="{in_use_id}"' not in node.logs().split("Removing image")[-1]
    assert [str(path) for path in own if path.exists()] == []  # its disk space freed
    # the container in use is untouched, its image's files there (the tools layer on the shared base)
    assert next(c for c in node.crictl_json("ps")["containers"] if c["id"] == cid)["state"] == "CONTAINER_RUNNING"
    assert "group-defined-in-image:x:50000:" in node.crictl("exec", "-s", cid, "cat", "/etc/group").stdout
    assert node.crictl_json("inspecti", in_use_id)["status"]["id"] == in_use_id
    failed = [line for line in node.logs().splitlines() if line[:1] == "E" and "image" in line.lower()
              and "rpc error" in line]
    assert failed == []
    remove_pod(node, "inuse")

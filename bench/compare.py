"""pycrio next to containerd v2.4.2 on this machine: one run, the same calls, a table of ratios.

Three runtimes run side by side for the whole run, each with its own sockets and dirs, pulling from
one loopback docker-registry:
  "pycrio"         pycrio with tracing off (a PycrioDaemon, as bench/lifecycle.py starts it);
  "pycrio traced"  pycrio at rate 1000000 (every call a sampled span) to a live in-process OTLP
                   receiver, with the SDK's production batch delay (5 s);
  "containerd"     containerd v2.4.2 + containerd-shim-runc-v2 (tests/conformance/peer_containerd.py:
                   runc, cgroupfs, its own CNI bridge, our own pause image), `make peer-containerd-bin`.
The ratios are pycrio / containerd (and pycrio traced / containerd): above 1 pycrio is slower or
bigger. Latencies are client-side, time.perf_counter_ns() around one blocking unary gRPC call over
the unix socket from one client thread on a long-lived channel per runtime.

Phases, in this order:
1. idle (no pods): Version, ListContainers (0 containers), ListImages, ImageStatus: `--calls`
   timed calls per runtime per round after a warm-up, `--rounds` rounds, the runtime order rotated
   every round so drift on this shared 2-core machine hits all alike; latencies pooled.
2. pod lifecycle: `--lifecycle-pods` pods per runtime, interleaved (pod i on each runtime in a
   rotated order), each timed call by call as kubelet makes them (bench/lifecycle.py's lifecycle():
   RunPodSandbox, CreateContainer `sleep 1000`, StartContainer, ContainerStatus, ExecSync
   `busybox true`, StopContainer timeout 0, RemoveContainer, StopPodSandbox, RemovePodSandbox).
   The pods ask for no cgroup parent: pycrio puts them under its pod_cgroup_parent, containerd
   under /k8s.io (cgroupfs). One untimed warm-up pod per runtime first.
3. cold pull of a ~50 MiB image (busybox + 5 layers of 10 MiB random bytes + 2 small ones,
   tests/registry_fixture.py ImageBuilder.multi_layer): `--pull-rounds` rounds, rotated order; each
   pull follows a RemoveImage and a check that the runtime's store holds none of its blobs.
4. memory at 0 pods (after phases 1-3), then `--pods` pods per runtime, each with one running
   container (`sleep 1000`) and a cgroup parent as kubelet gives one (containerd's
   ListPodSandboxStats needs it), created interleaved and untimed; memory at `--pods` pods; then what
   kubelet polls at that many pods: ListContainers and ListPodSandbox (its PLEG relist and
   housekeeping, about once a second each), ListContainerStats and ListPodSandboxStats (its stats
   provider, /stats/summary; with usage_nano_cores, which both compute from the previous sample),
   then ContainerStatus of a running
   container (`--calls` x `--rounds`), ExecSync on it (`--execs` x `--rounds`). Then more
   containers, created and NOT started (spread over the pods), up to `--containers` in all, and
   ListContainers again (one round). A created container costs pycrio a conmon and a `runc create`d process
   (waiting on its exec fifo); containerd only writes metadata until StartContainer: the list is of
   records either way. Each unary measurement stops after 15 s per runtime and round (but
   not before 3 calls), so a call that takes seconds does not hold the run for an hour: `n` in
   the table says how many calls there are behind each number.
   Memory: the sum over the runtime's own processes, RSS and PSS (/proc/PID/smaps_rollup; PSS
   splits shared pages among the processes sharing them, so it adds up): pycrio = the daemon, its
   multiprocessing helpers and every conmon (one per container, the pod's infra container
   included); containerd = containerd and every containerd-shim-runc-v2 (one per pod). Neither
   counts the containers' own processes (sleep, the pause/catatonit infra).
5. `critest -benchmark` (optional, skipped with a reason when .venv/bin/critest or the stand-in
   images of tests/conformance/images/ are not there, or with --no-critest): critest's
   PodSandbox, Container, Image lifecycle and Image listing experiments, once per runtime, N =
   `--critest-n`. Its images are named through -test-images-file and -benchmarking-params-file
   by their loopback-registry address (`127.0.0.1:PORT/registry.k8s.io/e2e-test-images/busybox:
   1.29-2`, `127.0.0.1:PORT/public.ecr.aws/docker/library/busybox:1...`: the stand-ins, pushed
   under the original name below the registry), so no mirror configuration is involved.

`--listing-only` runs phase 4's pods, memory and the four listing calls alone (a few minutes):
what kubelet's polling costs at `--pods` pods.

Afterwards every pod is removed and the host is checked and cleaned (mounts under the bench dir,
bridges, cgroups, IPAM state; containerd's own via ContainerdPeer.stop()).

Run from the repo root, as root:
    .venv/bin/python bench/compare.py                       # ~15 min here
    .venv/bin/python bench/compare.py --quick               # a few minutes
    .venv/bin/python bench/compare.py --pods 100 --containers 500 --rounds 5 --json out.json
    .venv/bin/python bench/compare.py --listing-only --pods 100    # kubelet's polling at 100 pods
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from bench.lifecycle import CALLS as LIFECYCLE_CALLS  # noqa: E402
from bench.lifecycle import (  # noqa: E402
    EXEC_COMMAND,
    PodRun,
    container_config,
    lifecycle,
    percentile,
    pod_config,
)
from pycrio import procfs  # noqa: E402
from pycrio.cri import api_pb2, api_pb2_grpc  # noqa: E402
from pycrio.oci import cgroups  # noqa: E402
from tests.conformance.peer_containerd import CONTAINERD, SHIM, ContainerdPeer  # noqa: E402
from tests.harness import VENV_BIN, PycrioDaemon, tracing_args  # noqa: E402
from tests.otlp_receiver import OTLPReceiver  # noqa: E402
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry  # noqa: E402

OFF = "pycrio"
ON = "pycrio traced"
CTRD = "containerd"
RUNTIMES = (OFF, ON, CTRD)
PYCRIO = (OFF, ON)

BRIDGE = "pycriocmp0"  # pycrio's two daemons share it (host-local serialises them)
SUBNET = "10.160.0.0/22"
NETWORK_NAME = "pycrio-bench-compare"
HOST_LOCAL_DIR = Path("/var/lib/cni/networks") / NETWORK_NAME
CTRD_BRIDGE = "ctrdpeer1"
CTRD_SUBNET = "10.164.0.0/22"
CTRD_NETWORK = "pycrio-cmp-ctrd"
CRITEST = VENV_BIN / "critest"
RPC_TIMEOUT = 120.0
WARMUP_CALLS = 50
STATS_WARMUP_CALLS = 5  # a stats call of 100 containers reads some 1000 cgroup files
# Per runtime and round, a measurement stops after this long (but not before MIN_CALLS calls):
# pycrio's ListContainers at hundreds of created containers takes seconds a call.
BUDGET_S = 15.0
MIN_CALLS = 3
DAEMON_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "5000"}
BIG_LAYERS = 5
BIG_LAYER_SIZE = 10 * 1024 * 1024
CRITEST_BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
CRITEST_LISTING = [f"public.ecr.aws/docker/library/busybox:{t}" for t in ("1.35.0-glibc", "1-uclibc", "1", "1-glibc", "1-musl")]
CRITEST_FILES = {  # output file -> experiment name in the table
    "pod_benchmark_data.json": "critest PodSandbox",
    "container_benchmark_data.json": "critest Container",
    "image_lifecycle_benchmark_data.json": "critest Image",
    "image_listing_benchmark_data.json": "critest ImageList",
}

Stub = api_pb2_grpc.RuntimeServiceStub
ImageStub = api_pb2_grpc.ImageServiceStub


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- runtimes --------------------------------------------------------------------------------


@dataclass
class Runtime:
    """One runtime under test: its endpoint, stubs on one long-lived channel, its processes."""

    name: str
    endpoint: str
    processes: Callable[[], list[int]]
    channel: grpc.Channel = field(init=False)
    rt: Stub = field(init=False)
    img: ImageStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.endpoint)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)


def pycrio_processes(daemon: PycrioDaemon) -> Callable[[], list[int]]:
    """The daemon, its multiprocessing helpers and the conmons of its containers."""

    def pids() -> list[int]:
        if daemon.proc is None:
            return []
        found = [daemon.proc.pid, *daemon.worker_processes()]
        base = str(daemon.base).encode()
        for pid in procfs.all_pids():
            args = procfs.argv(pid)
            if args and args[0].endswith(b"conmon") and any(base in a for a in args):
                found.append(pid)
        return found

    return pids


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Summed RSS and PSS (KiB) of `pids`, and how many were counted."""
    rss = pss = counted = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.split()[1:]}
        rss += fields.get("Rss", 0)
        pss += fields.get("Pss", 0)
        counted += 1
    return {"rss_kib": rss, "pss_kib": pss, "processes": counted}


# -- measuring -------------------------------------------------------------------------------


def rotated(i: int) -> list[str]:
    return [RUNTIMES[(i + k) % len(RUNTIMES)] for k in range(len(RUNTIMES))]


def timed_calls(call: Callable[[], Any], calls: int, warmup: int, budget_s: float) -> list[int]:
    """`warmup` untimed calls, then `calls` timed ones (ns each), client GC off meanwhile; a slow
    call stops the loop after `budget_s` seconds (at least MIN_CALLS are made)."""
    for _ in range(warmup):
        call()
    latencies = []
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    gc.collect()
    gc.disable()
    try:
        for i in range(calls):
            t0 = clock()
            call()
            latencies.append(clock() - t0)
            if t0 > deadline and i + 1 >= MIN_CALLS:
                break
    finally:
        gc.enable()
    return latencies


Samples = dict[str, dict[str, list[int]]]  # metric -> runtime -> latencies (ns)


def unary_rounds(
    samples: Samples, label: str, calls_of: dict[str, Callable[[], Any]], calls: int, rounds: int, warmup: int
) -> None:
    """`rounds` rounds of `calls` calls on each runtime, order rotated per round, pooled in samples[label]."""
    row = samples.setdefault(label, {r: [] for r in RUNTIMES})
    for r in range(rounds):
        for name in rotated(r):
            row[name].extend(timed_calls(calls_of[name], calls, warmup, BUDGET_S))


def list_containers(rt: Stub) -> Callable[[], Any]:
    return lambda: rt.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_TIMEOUT)


# -- phases ----------------------------------------------------------------------------------


def idle_phase(rts: dict[str, Runtime], image: str, samples: Samples, args: argparse.Namespace) -> dict[str, int]:
    """Version, ListContainers (0), ListImages, ImageStatus on idle runtimes; images each lists."""
    spec = api_pb2.ImageSpec(image=image)
    methods: dict[str, Callable[[Runtime], Callable[[], Any]]] = {
        "Version": lambda r: lambda: r.rt.Version(api_pb2.VersionRequest(), timeout=RPC_TIMEOUT),
        "ListContainers (0 containers)": lambda r: list_containers(r.rt),
        "ListImages": lambda r: lambda: r.img.ListImages(api_pb2.ListImagesRequest(), timeout=RPC_TIMEOUT),
        "ImageStatus": lambda r: lambda: r.img.ImageStatus(api_pb2.ImageStatusRequest(image=spec), timeout=RPC_TIMEOUT),
    }
    for label, make in methods.items():
        unary_rounds(samples, label, {n: make(r) for n, r in rts.items()}, args.calls, args.rounds, WARMUP_CALLS)
        say(f"  {label}: done")
    return {n: len(r.img.ListImages(api_pb2.ListImagesRequest(), timeout=RPC_TIMEOUT).images) for n, r in rts.items()}


def lifecycle_phase(rts: dict[str, Runtime], image: str, samples: Samples, logs: Path, pods: int) -> list[str]:
    """Warm-up pod, then `pods` timed pod lifecycles per runtime, interleaved; failures."""
    failures: list[str] = []
    for name, r in rts.items():
        warm = lifecycle(r.rt, image, "warmup", secrets.token_hex(8), logs / f"warm-{name.replace(' ', '-')}")
        if warm.error:
            failures.append(f"{name} warm-up pod: {warm.error}")
    runs: dict[str, list[PodRun]] = {n: [] for n in RUNTIMES}
    t0 = time.monotonic()
    for i in range(pods):
        gc.collect()
        for name in rotated(i):
            run = lifecycle(rts[name].rt, image, f"cmp-{i}", secrets.token_hex(8), logs / f"{name.replace(' ', '-')}-{i}")
            runs[name].append(run)
            if run.error:
                failures.append(f"{name} pod {i}: {run.error}")
            failures.extend(f"{name} pod {i}: {a}" for a in run.anomalies)
        if (i + 1) % 10 == 0 or i + 1 == pods:
            say(f"  lifecycle: {i + 1}/{pods} pods per runtime ({time.monotonic() - t0:.0f}s)")
    for call in LIFECYCLE_CALLS:
        samples[f"lifecycle {call}"] = {n: [p.latencies_ns[call] for p in runs[n] if call in p.latencies_ns] for n in RUNTIMES}
    samples["lifecycle: whole pod (9 calls)"] = {
        n: [sum(p.latencies_ns.values()) for p in runs[n] if len(p.latencies_ns) == len(LIFECYCLE_CALLS)] for n in RUNTIMES
    }
    return failures


def blobs_present(store: Path, layers: list[str]) -> list[str]:
    """Which of `layers` are still in a runtime's content store (a cold pull needs none of them)."""
    have = {p.name for p in store.iterdir()} if store.is_dir() else set()
    return [d for d in layers if d.removeprefix("sha256:") in have]


def pull_phase(rts: dict[str, Runtime], image: BuiltImage, shared: tuple[str, ...], stores: dict[str, Path],
               samples: Samples, rounds: int) -> list[str]:
    """Cold pulls: RemoveImage, check its blobs are gone (but the base layer it shares with the
    busybox image every runtime keeps), time PullImage; rotated per round."""
    problems: list[str] = []
    own_layers = [d for d in image.layers if d not in shared]
    row = samples.setdefault(f"PullImage cold, {sum(image.layer_sizes) / 2**20:.0f} MiB", {n: [] for n in RUNTIMES})
    spec = api_pb2.ImageSpec(image=image.reference)
    for r in range(rounds):
        for name in rotated(r):
            rt = rts[name]
            try:
                rt.img.RemoveImage(api_pb2.RemoveImageRequest(image=spec), timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            left = blobs_present(stores[name], own_layers)
            if left:
                problems.append(f"{name} round {r}: {len(left)} layer blobs left after RemoveImage: not a cold pull")
            os.sync()
            t0 = time.perf_counter_ns()
            rt.img.PullImage(api_pb2.PullImageRequest(image=spec), timeout=600)
            row[name].append(time.perf_counter_ns() - t0)
        say(f"  cold pull round {r + 1}/{rounds}: " + ", ".join(f"{n} {row[n][-1] / 1e9:.2f}s" for n in RUNTIMES))
    return problems


@dataclass
class Populated:
    pods: dict[str, list[tuple[str, api_pb2.PodSandboxConfig]]] = field(default_factory=lambda: {n: [] for n in RUNTIMES})
    running: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in RUNTIMES})
    created: dict[str, int] = field(default_factory=lambda: {n: 0 for n in RUNTIMES})


def populate(rts: dict[str, Runtime], image: str, logs: Path, pods: int, cgroup_parent: str) -> Populated:
    """`pods` pods per runtime with one running `sleep` each, created interleaved, untimed. Each
    pod gets a cgroup parent as kubelet gives one (containerd's ListPodSandboxStats refuses pods
    without): `<cgroup_parent>/kubepods/<runtime>/pod<uid>`."""
    state = Populated()
    t0 = time.monotonic()
    for i in range(pods):
        for name in rotated(i):
            rt = rts[name].rt
            uid = secrets.token_hex(8)
            config = pod_config(f"pop-{i}", uid, logs / f"pop-{name.replace(' ', '-')}-{i}")
            config.linux.cgroup_parent = f"{cgroup_parent}/kubepods/{name.replace(' ', '-')}/pod{uid}"
            pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=RPC_TIMEOUT).pod_sandbox_id
            state.pods[name].append((pod_id, config))
            cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container_config(image), sandbox_config=config), timeout=RPC_TIMEOUT).container_id
            rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
            state.running[name].append(cid)
        if (i + 1) % 20 == 0 or i + 1 == pods:
            say(f"  populate: {i + 1}/{pods} pods per runtime ({time.monotonic() - t0:.0f}s)")
    return state


def add_created(rts: dict[str, Runtime], image: str, state: Populated, total: int) -> None:
    """Created (not started) containers spread over the pods until each runtime has `total`."""
    t0 = time.monotonic()
    extra = max(0, total - len(state.running[OFF]))
    for k in range(extra):
        for name in rotated(k):
            pod_id, config = state.pods[name][k % len(state.pods[name])]
            c = container_config(image)
            c.metadata.name = f"idle-{k}"
            c.log_path = f"idle-{k}.log"
            rts[name].rt.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=c, sandbox_config=config), timeout=RPC_TIMEOUT)
            state.created[name] += 1
        if (k + 1) % 100 == 0 or k + 1 == extra:
            say(f"  created containers: {k + 1}/{extra} per runtime ({time.monotonic() - t0:.0f}s)")


def populated_phase(rts: dict[str, Runtime], image: str, samples: Samples, memory: dict[str, Any],
                    logs: Path, args: argparse.Namespace, cgroup_parent: str) -> Populated:
    state = populate(rts, image, logs, args.pods, cgroup_parent)
    time.sleep(2)  # let start-up work (exit watchers, log readers) settle before reading memory
    memory[f"{args.pods} pods"] = {n: memory_kib(r.processes()) for n, r in rts.items()}
    counts = {n: len(r.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_TIMEOUT).containers) for n, r in rts.items()}
    unary_rounds(samples, f"ListContainers ({args.pods} containers)", {n: list_containers(r.rt) for n, r in rts.items()},
                 args.calls, args.rounds, WARMUP_CALLS)
    unary_rounds(samples, f"ListPodSandbox ({args.pods} pods)",
                 {n: (lambda rt: lambda: rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=RPC_TIMEOUT))(r.rt)
                  for n, r in rts.items()}, args.calls, args.rounds, WARMUP_CALLS)
    stats_counts = {n: len(r.rt.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=RPC_TIMEOUT).stats)
                    for n, r in rts.items()}
    unary_rounds(samples, f"ListContainerStats ({args.pods} containers)",
                 {n: (lambda rt: lambda: rt.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=RPC_TIMEOUT))(r.rt)
                  for n, r in rts.items()}, args.calls, args.rounds, STATS_WARMUP_CALLS)
    unary_rounds(samples, f"ListPodSandboxStats ({args.pods} pods)",
                 {n: (lambda rt: lambda: rt.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=RPC_TIMEOUT))(r.rt)
                  for n, r in rts.items()}, args.calls, args.rounds, STATS_WARMUP_CALLS)
    say(f"  at {args.pods} pods: container stats listed {stats_counts}")
    if args.listing_only:
        say(f"  at {args.pods} pods: containers listed {counts}")
        return state
    status = {n: (lambda rt, cid: lambda: rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid),
                                                             timeout=RPC_TIMEOUT))(r.rt, state.running[n][0])
              for n, r in rts.items()}
    unary_rounds(samples, "ContainerStatus (running)", status, args.calls, args.rounds, WARMUP_CALLS)
    exec_sync = {n: (lambda rt, cid: lambda: _exec_ok(rt, cid))(r.rt, state.running[n][-1]) for n, r in rts.items()}
    unary_rounds(samples, f"ExecSync {' '.join(EXEC_COMMAND)}", exec_sync, args.execs, args.rounds, 2)
    say(f"  at {args.pods} pods: containers listed {counts}")
    if args.containers > args.pods:
        add_created(rts, image, state, args.containers)
        counts = {n: len(r.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_TIMEOUT).containers)
                  for n, r in rts.items()}
        # One round: today a call can take pycrio tens of seconds here (a `runc state` per created container).
        unary_rounds(samples, f"ListContainers ({args.containers} containers)",
                     {n: list_containers(r.rt) for n, r in rts.items()}, args.calls, 1, 1)
        memory[f"{args.pods} pods, {args.containers} containers"] = {n: memory_kib(r.processes()) for n, r in rts.items()}
        say(f"  at {args.containers} containers: listed {counts}")
    return state


def _exec_ok(rt: Stub, cid: str) -> None:
    reply = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=EXEC_COMMAND, timeout=30), timeout=RPC_TIMEOUT)
    if reply.exit_code != 0:
        raise RuntimeError(f"ExecSync {EXEC_COMMAND} exited {reply.exit_code}: {reply.stderr[:200]!r}")


def remove_pods(rts: dict[str, Runtime]) -> dict[str, float]:
    """Stop and remove every pod of every runtime; seconds each took (untimed in the table)."""
    took = {}
    for name, r in rts.items():
        t0 = time.monotonic()
        for pod in r.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=RPC_TIMEOUT).items:
            r.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=RPC_TIMEOUT)
            r.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=RPC_TIMEOUT)
        took[name] = time.monotonic() - t0
    return took


# -- critest -benchmark ----------------------------------------------------------------------


def critest_images(registry: TestRegistry, cache: Path) -> tuple[dict[str, str] | None, str]:
    """Push the stand-ins critest's benchmarks need; {original: loopback reference} or (None, why not)."""
    if not CRITEST.is_file():
        return None, f"{CRITEST} not found (make critest)"
    try:
        from tests.conformance.images import build as standins
    except ImportError as exc:
        return None, f"no stand-in images (tests/conformance/images/build.py: {exc})"
    wanted = [CRITEST_BUSYBOX, *CRITEST_LISTING]
    missing = [ref for ref in wanted if ref not in getattr(standins, "IMAGES", {})]
    if missing:
        return None, f"the stand-in images lack {missing}"
    try:
        builder = standins.build(cache, log=lambda line: None)
        standins.push_all(builder, registry.address, wanted, jobs=2, log=lambda line: None)
    except Exception as exc:  # noqa: BLE001 - optional part: say why and go on
        return None, f"building the stand-ins failed: {type(exc).__name__}: {exc}"
    return {ref: standins.mirror_reference(registry.address, ref) for ref in wanted}, ""


def run_critest(name: str, endpoint: str, images: dict[str, str], work: Path, n: int) -> dict[str, Any]:
    """critest -benchmark once against `endpoint`; {experiment: {op: [ns...]}} or {"error": ...}."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    out.mkdir(exist_ok=True)
    listing = [images[ref] for ref in CRITEST_LISTING]
    (work / "params.yaml").write_text(json.dumps({  # JSON is YAML
        "containersNumber": n, "containersNumberParallel": 1, "podsNumber": n, "podsNumberParallel": 1,
        "imagesNumber": n, "imagesNumberParallel": 1, "imagePullingBenchmarkImage": listing[0],
        "imageListingBenchmarkImages": listing, "containerBenchmarkTimeoutSeconds": 60,
        "podBenchmarkTimeoutSeconds": 60, "imageBenchmarkTimeoutSeconds": 60,
        "podContainerStartBenchmarkTimeoutSeconds": 60,
    }))
    (work / "images.yaml").write_text(json.dumps({
        "defaultTestContainerImage": images[CRITEST_BUSYBOX], "webServerTestImage": images[CRITEST_BUSYBOX]}))
    argv = [str(CRITEST), "-benchmark", f"-runtime-endpoint={endpoint}", f"-image-endpoint={endpoint}",
            f"-benchmarking-params-file={work / 'params.yaml'}", f"-benchmarking-output-dir={out}",
            f"-test-images-file={work / 'images.yaml'}", "-ginkgo.no-color",
            f"-ginkgo.json-report={work / 'report.json'}"]
    t0 = time.monotonic()
    with (work / "critest.log").open("wb") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=work, timeout=3600).returncode
    say(f"  critest -benchmark on {name}: exit {code} in {time.monotonic() - t0:.0f}s (log {work / 'critest.log'})")
    result: dict[str, Any] = {"exit": code}
    for filename, experiment in CRITEST_FILES.items():
        path = out / filename
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        ops = data.get("operationsNames") or []
        result[experiment] = {op: [d["operationsDurationsNs"][k] for d in data.get("datapoints") or []
                                   if len(d.get("operationsDurationsNs") or []) > k] for k, op in enumerate(ops)}
    try:  # the gmeasure experiment "create PodSandbox and container" lives only in the ginkgo report
        for suite in json.loads((work / "report.json").read_text()):
            for spec in suite.get("SpecReports") or []:
                for entry in spec.get("ReportEntries") or []:
                    value = json.loads(entry.get("Value", {}).get("AsJSON") or "null")
                    for m in (value or {}).get("Measurements") or []:
                        if m.get("Type") == "Duration" and m.get("Durations"):
                            op = "pod+container start/stop" \
                                if m["Name"] == "create PodSandbox and container" else m["Name"]
                            result.setdefault("critest PodContainer", {})[op] = [int(d) for d in m["Durations"]]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return result


def critest_phase(rts: dict[str, Runtime], images: dict[str, str], work: Path, n: int, samples: Samples) -> list[str]:
    problems = []
    results = {name: run_critest(name, rts[name].endpoint, images, work / name.replace(" ", "-"), n) for name in (OFF, CTRD, ON)}
    for name, result in results.items():
        if result["exit"] != 0:
            problems.append(f"critest -benchmark on {name} exited {result['exit']} (see its log)")
    experiments = {e for r in results.values() for e in r if e != "exit"}
    for experiment in sorted(experiments):
        ops = {op for r in results.values() for op in r.get(experiment, {})}
        for op in sorted(ops):
            samples[f"{experiment}: {op}"] = {n: results[n].get(experiment, {}).get(op, []) for n in RUNTIMES}
    return problems


# -- summary ---------------------------------------------------------------------------------


def summarize(samples: Samples) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for label, per in samples.items():
        row: dict[str, Any] = {}
        for name in RUNTIMES:
            ms = [v / 1e6 for v in per.get(name, [])]
            row[name] = {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
        for name in PYCRIO:
            row[f"{name} / {CTRD}"] = {q: _ratio(row[name][f"{q}_ms"], row[CTRD][f"{q}_ms"]) for q in ("p50", "p99")}
        rows[label] = row
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _x(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def print_table(rows: dict[str, dict[str, Any]], memory: dict[str, dict[str, dict[str, int]]]) -> None:
    head = (f"{'metric':<46} {'n':>5} | {'pycrio':>8} {'traced':>8} {'ctrd':>8} {'py/ct':>7} {'tr/ct':>7} | "
            f"{'pycrio':>8} {'traced':>8} {'ctrd':>8} {'py/ct':>7} {'tr/ct':>7}")
    print(f"\n{'':<53}| {'median (ms)':^42} | {'p99 (ms)':^42}")
    print(head)
    print("-" * len(head))
    for label, row in rows.items():
        n = min(row[name]["n"] for name in RUNTIMES)
        cells = []
        for q in ("p50", "p99"):
            cells.append(" ".join([*(f"{_ms(row[name][f'{q}_ms']):>8}" for name in RUNTIMES),
                                   *(f"{_x(row[f'{name} / {CTRD}'][q]):>7}" for name in PYCRIO)]))
        print(f"{label[:46]:<46} {n:>5} | {cells[0]} | {cells[1]}")
    print(f"\n{'memory (MiB, sum over processes)':<46} {'procs':>11} | {'pycrio':>8} {'traced':>8} {'ctrd':>8} {'py/ct':>7} {'tr/ct':>7}")
    for level, per in memory.items():
        for kind in ("rss", "pss"):
            values = {n: per[n][f"{kind}_kib"] / 1024 for n in RUNTIMES}
            procs = "/".join(str(per[n]["processes"]) for n in RUNTIMES)
            print(f"{(kind.upper() + ' at ' + level)[:46]:<46} {procs:>11} | " + " ".join(f"{values[n]:>8.1f}" for n in RUNTIMES)
                  + " " + " ".join(f"{_x(_ratio(values[n], values[CTRD])):>7}" for n in PYCRIO))


# -- clean-up --------------------------------------------------------------------------------


def leftovers(base: Path) -> list[str]:
    found = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in line]
    return [f"mount {m}" for m in found]


def clean_up(base: Path, daemons: dict[str, PycrioDaemon], peer: ContainerdPeer | None, cgroup_parent: str) -> list[str]:
    problems: list[str] = []
    for name, daemon in daemons.items():
        if daemon.alive():
            daemon.crictl("rmp", "-a", "-f", check=False)
        code = daemon.stop()
        if code not in (0, None):
            problems.append(f"{name} exited {code}")
    if peer is not None:
        try:
            peer.stop()
        except Exception as exc:  # noqa: BLE001 - keep cleaning
            problems.append(f"containerd stop: {exc}")
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        if str(base) in line:
            subprocess.run(["umount", "-l", line.split()[4]], capture_output=True)
            problems.append(f"unmounted leftover {line.split()[4]}")
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    shutil.rmtree(HOST_LOCAL_DIR, ignore_errors=True)
    try:
        cgroups.remove_cgroup(cgroup_parent)
    except OSError as exc:
        problems.append(f"cgroup {cgroup_parent}: {exc}")
    return problems


# -- main ------------------------------------------------------------------------------------


def _links_on(bridge: str) -> list[str]:
    """Interfaces attached to `bridge` now (pods of a run in progress)."""
    out = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if ":" in line]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each unary measurement")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per runtime per round (cheap calls)")
    parser.add_argument("--execs", type=int, default=20, help="timed ExecSync calls per runtime per round")
    parser.add_argument("--lifecycle-pods", type=int, default=30, help="timed pod lifecycles per runtime")
    parser.add_argument("--pull-rounds", type=int, default=3, help="cold pulls per runtime")
    parser.add_argument("--pods", type=int, default=100, help="running pods per runtime for memory and listing")
    parser.add_argument("--containers", type=int, default=500,
                        help="containers per runtime for the large ListContainers (pods' + created ones)")
    parser.add_argument("--critest-n", type=int, default=20, help="critest -benchmark samples per experiment")
    parser.add_argument("--no-critest", action="store_true", help="leave out critest -benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: --rounds 2 --calls 100 --execs 10 --lifecycle-pods 8 --pull-rounds 2 "
                             "--pods 20 --containers 100 --critest-n 5")
    parser.add_argument("--listing-only", action="store_true",
                        help="only the pods of phase 4, memory and ListContainers, ListPodSandbox, ListContainerStats, "
                             "ListPodSandboxStats at --pods pods (kubelet's polling)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.execs, args.lifecycle_pods = 2, 100, 10, 8
        args.pull_rounds, args.pods, args.containers, args.critest_n = 2, 20, 100, 5
    if min(args.rounds, args.calls, args.execs, args.lifecycle_pods, args.pull_rounds, args.pods, args.critest_n) < 1:
        parser.error("sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for binary in (CONTAINERD, SHIM):
        if not binary.is_file():
            print(f"compare: {binary} not found: run `make peer-containerd-bin`")
            return 2
    busy = [link for bridge in (BRIDGE, CTRD_BRIDGE) for link in _links_on(bridge)]
    if busy:
        print(f"compare: another run uses the bench bridges ({', '.join(busy[:5])}...): its clean-up would break ours")
        return 2
    bench_id = secrets.token_hex(4)
    cgroup_parent = f"/pycrio-cmp-{bench_id}"
    version = subprocess.run([str(CONTAINERD), "--version"], capture_output=True, text=True).stdout.strip()
    if args.listing_only:
        print(f"pycrio vs {version}: listing only, {args.pods} pods with one container each, "
              f"rounds {args.rounds} x calls {args.calls}")
    else:
        print(f"pycrio vs {version}: rounds {args.rounds} x calls {args.calls} (ExecSync {args.execs}), "
              f"{args.lifecycle_pods} lifecycle pods, {args.pull_rounds} cold pulls, {args.pods} pods / "
              f"{args.containers} containers, critest n {args.critest_n if not args.no_critest else 'off'}")
    print(f"python {platform.python_version()}, grpc {grpc.__version__}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"cgroups {cgroups.detect_support().mode}")
    started = time.monotonic()
    samples: Samples = {}
    memory: dict[str, dict[str, dict[str, int]]] = {}
    problems: list[str] = []
    notes: dict[str, Any] = {}
    receiver = OTLPReceiver().start()
    daemons: dict[str, PycrioDaemon] = {}
    peer: ContainerdPeer | None = None
    rts: dict[str, Runtime] = {}
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-compare-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        registry = TestRegistry(base / "registry").start()
        try:
            t0 = time.monotonic()
            builder = ImageBuilder(base / "images", registry)
            busybox = builder.busybox("bench/busybox", "1")
            if args.listing_only:  # no pulls: the big image is not needed
                say(f"image built and pushed in {time.monotonic() - t0:.0f}s: {busybox.reference}")
            else:
                big = builder.multi_layer("bench/big", "1", layers=BIG_LAYERS, layer_size=BIG_LAYER_SIZE)
                say(f"images built and pushed in {time.monotonic() - t0:.0f}s: {busybox.reference}, {big.reference} "
                    f"({sum(big.layer_sizes) / 2**20:.1f} MiB in {len(big.layers)} layers)")
            netdir = base / "net.d"
            netdir.mkdir()
            (netdir / "10-compare.conflist").write_text(json.dumps({
                "cniVersion": "1.0.0", "name": NETWORK_NAME,
                "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                             "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                            {"type": "portmap", "capabilities": {"portMappings": True}}]}))
            for name, extra in ((OFF, ["--log-level", "info"]), (ON, tracing_args(receiver.endpoint, rate=1_000_000))):
                text = (f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
                        f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
                        f'[pycrio.runtime]\npod_cgroup_parent = "{cgroup_parent}/{"on" if name == ON else "off"}"\n')
                daemon = PycrioDaemon(base / ("traced" if name == ON else "pycrio"), args=extra, config_text=text, env=DAEMON_ENV)
                daemons[name] = daemon.start(timeout=60)
                rts[name] = Runtime(name, daemon.endpoint, pycrio_processes(daemon))
            peer = ContainerdPeer(base / "containerd", {}, registry=registry.address, bridge=CTRD_BRIDGE,
                                  subnet=CTRD_SUBNET, network_name=CTRD_NETWORK)
            peer.start()
            rts[CTRD] = Runtime(CTRD, peer.endpoint, peer.process_tree)
            for r in rts.values():
                r.img.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox.reference)), timeout=300)
            stores = {OFF: daemons[OFF].base / "root" / "storage" / "blobs" / "sha256",
                      ON: daemons[ON].base / "root" / "storage" / "blobs" / "sha256",
                      CTRD: peer.directory / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"}
            memory["start (0 pods)"] = {n: memory_kib(r.processes()) for n, r in rts.items()}

            if not args.listing_only:
                say("phase 1: idle unary calls")
                notes["images listed when idle"] = idle_phase(rts, busybox.reference, samples, args)
                say("phase 2: pod lifecycle")
                problems += lifecycle_phase(rts, busybox.reference, samples, base / "logs", args.lifecycle_pods)
                say("phase 3: cold pulls")
                problems += pull_phase(rts, big, busybox.layers, stores, samples, args.pull_rounds)
            say("phase 4: memory and a populated node")
            receiver.clear()
            if not args.listing_only:
                memory["0 pods (after phases 1-3)"] = {n: memory_kib(r.processes()) for n, r in rts.items()}
            populated_phase(rts, busybox.reference, samples, memory, base / "logs", args, cgroup_parent)
            notes["teardown seconds"] = remove_pods(rts)
            if args.listing_only:
                notes["critest"] = "skipped (--listing-only)"
            elif args.no_critest:
                notes["critest"] = "skipped (--no-critest)"
            else:
                images, why = critest_images(registry, REPO / "build" / "conformance" / "images")
                if images is None:
                    notes["critest"] = f"skipped: {why}"
                    say(f"critest -benchmark skipped: {why}")
                else:
                    say("phase 5: critest -benchmark")
                    problems += critest_phase(rts, images, base / "critest", args.critest_n, samples)
                    notes["critest"] = f"ran, n={args.critest_n}"
            problems += leftovers(base / "pycrio") + leftovers(base / "traced")
        except Exception as exc:  # noqa: BLE001 - report what there is, clean up
            problems.append(f"aborted: {type(exc).__name__}: {exc}")
            say(f"aborted: {type(exc).__name__}: {exc}")
        finally:
            for r in rts.values():
                r.channel.close()
            problems += clean_up(base, daemons, peer, cgroup_parent)
            registry.stop()
            receiver.stop()
    rows = summarize(samples)
    print_table(rows, memory)
    for key, value in notes.items():
        print(f"{key}: {value}")
    print("problems: " + ("none" if not problems else ""))
    for problem in problems:
        print(f"  {problem}")
    print(f"total time {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"parameters": vars(args) | {"json": str(args.json)}, "rows": rows,
                                         "memory": memory, "notes": notes, "problems": problems,
                                         "samples_ns": samples}, indent=1, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

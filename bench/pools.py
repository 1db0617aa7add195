"""Do long CRI calls starve kubelet's polling? p99 of Version (and ListContainers) on an idle daemon
against the same daemon while 40 StopContainer calls wait out their grace period.

Setup: a loopback registry serving the busybox test image, one pycrio daemon (own socket and
dirs), `--pods` host-network pods holding 40 containers in all, each running `sleep 3600` as the
PID 1 of its own PID namespace, which ignores SIGTERM: StopContainer(timeout=G) waits the whole
grace period G, then SIGKILLs.

1. Idle: `--samples` sequential Version calls, then as many ListContainers, on one channel;
   client-side latency (perf_counter_ns around each blocking call).
2. Loaded: 40 StopContainer(timeout=G) calls start at once, each on its own client thread; half a
   second later a probe thread calls Version, then ListContainers, back to back, until G - 1
   seconds after the stops began (so every probe runs while all 40 stops are in flight), with a
   timeout of G + 10 s so a starved call is measured, not lost.
A daemon with one 32-thread pool for every call queues the probes behind the stops (they answer
only once the first stops return, G seconds later); one that keeps long calls off the pool of
short ones answers them as fast as when idle.

Prints p50/p99/max of each phase and the loaded/idle ratio of the p99s; exits 0 whatever the
numbers. Everything it made goes afterwards (pods, daemon, registry, the cgroup parent).

Run from the repo root, as root:  .venv/bin/python bench/pools.py [--stops 40] [--grace 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from pycrio.cri import api_pb2, api_pb2_grpc  # noqa: E402
from pycrio.oci import cgroups  # noqa: E402
from tests.harness import PycrioDaemon  # noqa: E402
from tests.registry_fixture import ImageBuilder, TestRegistry  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(values_ms), "p50": percentile(values_ms, 50), "p99": percentile(values_ms, 99),
            "max": max(values_ms)}


def timed_ms(call: Callable[[], Any]) -> float:
    started = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - started) / 1e6


def make_containers(rt: api_pb2_grpc.RuntimeServiceStub, image: str, pods: int, total: int, logs: Path) -> list[str]:
    """`total` running `sleep 3600` containers spread over `pods` host-network pods."""
    ids = []
    for p in range(pods):
        name = f"pools-{p}"
        pod = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench", uid=f"uid-{name}"),
            log_directory=str(logs / name),
        )
        pod.linux.security_context.namespace_options.network = api_pb2.NODE
        pod.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
        pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
        for c in range(p, total, pods):
            config = api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name=f"sleeper-{c}"), image=api_pb2.ImageSpec(image=image),
                command=["/bin/sleep", "3600"], log_path=f"sleeper-{c}.log",
            )
            config.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
            cid = rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                                                    sandbox_config=pod), timeout=120).container_id
            rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
            ids.append(cid)
    return ids


def idle_phase(rt: api_pb2_grpc.RuntimeServiceStub, samples: int) -> dict[str, list[float]]:
    for _ in range(20):  # warm the channel and the handlers
        rt.Version(api_pb2.VersionRequest(), timeout=10)
    version = [timed_ms(lambda: rt.Version(api_pb2.VersionRequest(), timeout=30)) for _ in range(samples)]
    listed = [timed_ms(lambda: rt.ListContainers(api_pb2.ListContainersRequest(), timeout=30)) for _ in range(samples)]
    return {"Version": version, "ListContainers": listed}


def loaded_phase(daemon: PycrioDaemon, ids: list[str], grace: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Probe while len(ids) StopContainer(grace) calls are in flight."""
    probes: dict[str, list[float]] = {"Version": [], "ListContainers": []}
    stop_ms: list[float] = []
    errors: list[str] = []
    stops_channel, probe_channel = daemon.channel(), daemon.channel()
    stopper, prober = daemon.runtime(stops_channel), daemon.runtime(probe_channel)

    def stop(cid: str) -> None:
        try:
            stop_ms.append(timed_ms(lambda: stopper.StopContainer(
                api_pb2.StopContainerRequest(container_id=cid, timeout=grace), timeout=grace + 60)))
        except grpc.RpcError as exc:
            errors.append(f"StopContainer {cid[:12]}: {exc.code().name}: {exc.details()}")

    def probe(deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                probes["Version"].append(timed_ms(lambda: prober.Version(api_pb2.VersionRequest(), timeout=grace + 10)))
                probes["ListContainers"].append(timed_ms(
                    lambda: prober.ListContainers(api_pb2.ListContainersRequest(), timeout=grace + 10)))
            except grpc.RpcError as exc:
                errors.append(f"probe: {exc.code().name}: {exc.details()}")
                return

    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        began = time.monotonic()
        futures = [pool.submit(stop, cid) for cid in ids]
        time.sleep(0.5)
        probe_thread = threading.Thread(target=probe, args=(began + grace - 1,))
        probe_thread.start()
        probe_thread.join()
        for future in futures:
            future.result()
    stops_channel.close()
    probe_channel.close()
    return probes, {"stop_ms": summary(stop_ms), "errors": errors}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=40, help="StopContainer calls in flight (default 40)")
    parser.add_argument("--grace", type=int, default=10, help="their grace period in seconds (default 10)")
    parser.add_argument("--pods", type=int, default=4, help="pods holding the containers (default 4)")
    parser.add_argument("--samples", type=int, default=300, help="idle calls per method (default 300)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = f"/pycrio-bench-pools-{secrets.token_hex(4)}"
    print(f"pycrio pools benchmark: Version/ListContainers p99, idle vs {args.stops} StopContainer calls waiting "
          f"out a {args.grace}s grace period (containers ignore SIGTERM), {args.pods} host-network pods")
    print(f"python {platform.python_version()}, grpc {grpc.__version__}, {os.cpu_count()} CPUs, {platform.platform()}")
    report: dict[str, Any] = {"parameters": vars(args) | {"json": str(args.json) if args.json else None}}
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-pools-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        registry = TestRegistry(base / "registry").start()
        daemon = PycrioDaemon(base / "daemon", config_text=(
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{base / "net.d"}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{parent}"\n'
        ))
        try:
            image = ImageBuilder(base / "images", registry).busybox("bench/busybox", "1")
            daemon.start()
            with daemon.channel() as ch:
                daemon.images(ch).PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image.reference)),
                                            timeout=300)
                rt = daemon.runtime(ch)
                t0 = time.monotonic()
                ids = make_containers(rt, image.reference, args.pods, args.stops, base / "logs")
                print(f"{len(ids)} containers running in {time.monotonic() - t0:.1f}s (untimed)")
                idle = idle_phase(rt, args.samples)
            loaded, stops = loaded_phase(daemon, ids, args.grace)
            report.update(idle={k: summary(v) for k, v in idle.items()},
                          loaded={k: summary(v) for k, v in loaded.items()}, stops=stops)
        finally:
            try:
                if daemon.alive():
                    for pod in json.loads(daemon.crictl("pods", "-o", "json").stdout).get("items", []):
                        daemon.crictl("rmp", "-f", pod["id"], check=False)
            finally:
                daemon.stop()
                registry.stop()
                cgroups.remove_cgroup(parent)

    print(f"\n{'':16} {'idle p50':>9} {'idle p99':>9} {'loaded p50':>11} {'loaded p99':>11} {'loaded max':>11} "
          f"{'n':>5} {'p99 ratio':>10}")
    for method in ("Version", "ListContainers"):
        i, lo = report["idle"][method], report["loaded"][method]
        report.setdefault("ratio_p99", {})[method] = lo["p99"] / i["p99"] if i["p99"] else float("nan")
        print(f"{method:16} {i['p50']:8.2f}m {i['p99']:8.2f}m {lo['p50']:10.2f}m {lo['p99']:10.2f}m "
              f"{lo['max']:10.2f}m {lo['n']:5d} {report['ratio_p99'][method]:9.2f}x")
    s = report["stops"]["stop_ms"]
    print(f"\nStopContainer(timeout={args.grace}): n {s['n']}, p50 {s['p50'] / 1000:.2f}s, max {s['max'] / 1000:.2f}s"
          f"; errors: {report['stops']['errors'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

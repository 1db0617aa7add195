"""Pull benchmark of pycrio: cold and warm PullImage of a multi-layer image against skopeo copy.

What is measured, all against one docker-registry on 127.0.0.1 serving one image (busybox + N
layers of random, incompressible bytes + a whiteout and an opaque-directory layer, built with
umoci and pushed with skopeo before anything is timed):

1. "skopeo copy"          `skopeo copy --src-tls-verify=false docker://REF oci:DIR:TAG` into a
                          brand-new OCI layout: wall clock of the subprocess. skopeo fetches and
                          verifies the blobs but does not unpack them.
2. "umoci unpack"         `umoci unpack --image DIR:TAG BUNDLE` of that fresh layout: together with
                          (1) the fairer reference, since pycrio also unpacks every layer.
3. "pycrio cold pull"     PullImage over gRPC after RemoveImage freed every blob and layer (checked
                          on disk before timing): resolve, fetch, verify, unpack, commit.
4. "pycrio warm pull"     PullImage again with everything in the store, by tag and by digest
                          reference (a manifest GET and a record write; target: under 50 ms).

Why interleaved: every round measures every step, and the order of the skopeo chain and the
pycrio cold pull alternates per round, so drift (page cache, CPU frequency, other processes) hits
both alike; ratios are reported as ratio of medians and as the range of per-round ratios. Dirty
pages of the previous step are written back (`sync`, untimed) before each timed step so one step
does not pay for another's writes. A warm-up round (untimed) loads the registry's blobs into the
page cache, starts skopeo once and opens the daemon's connection to the registry.

With --trace a second daemon, tracing every call to an in-process OTLP receiver, does one more
cold pull after the rounds (the timed daemon never traces) and its child spans (resolve,
fetch_layer, unpack_layer, commit) show where the cold pull's time went.

Run from the repo root (as root: pycrio unpacks layers with their owners and device nodes):
    .venv/bin/python bench/pull.py [--layers N] [--layer-size-mib M] [--rounds R] [--trace] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from pycrio.cri import api_pb2  # noqa: E402
from tests.harness import PycrioDaemon, tracing_args  # noqa: E402
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan, union_ns  # noqa: E402
from tests.registry_fixture import BuiltImage, ImageBuilder, TestRegistry  # noqa: E402

PULL = "/runtime.v1.ImageService/PullImage"
MIB = 1024 * 1024
RPC_TIMEOUT = 300.0

SKOPEO = "skopeo copy"
UMOCI = "umoci unpack"
SKOPEO_UNPACK = "skopeo copy + umoci unpack"
COLD = "pycrio cold pull"
WARM_TAG = "pycrio warm pull (tag)"
WARM_DIGEST = "pycrio warm pull (digest)"
SECONDS_ROWS = (SKOPEO, UMOCI, SKOPEO_UNPACK, COLD)
MS_ROWS = (WARM_TAG, WARM_DIGEST)

COLD_VS_SKOPEO_LIMIT = 1.2
WARM_LIMIT_MS = 50.0
TRACE_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5, help="data layers of random bytes (the image has 3 more)")
    parser.add_argument("--layer-size-mib", type=float, default=10.0, help="MiB of random bytes per data layer")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--warm-pulls", type=int, default=3, help="warm pulls per reference form per round")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--trace", action="store_true", help="also break one cold pull down from its spans")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.layer_size_mib <= 0 or args.rounds < 1 or args.warm_pulls < 1 or args.warmup_rounds < 0:
        parser.error("--layers, --rounds, --warm-pulls must be >= 1, --layer-size-mib > 0, --warmup-rounds >= 0")
    return args


# -- measurements ----------------------------------------------------------------------------


@dataclass
class Results:
    """Seconds per measurement, one entry per round (warm pulls: --warm-pulls entries per round)."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (*SECONDS_ROWS, *MS_ROWS)})
    rounds: list[dict[str, Any]] = field(default_factory=list)


def timed_run(cmd: list[str]) -> float:
    """Wall clock of one subprocess, which must succeed."""
    t0 = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed


def skopeo_chain(image: BuiltImage, work: Path, tag: str, label: str) -> tuple[float, float]:
    """(skopeo copy s, umoci unpack s) into brand-new directories, removed afterwards (untimed)."""
    layout = work / f"oci-{label}"
    bundle = work / f"bundle-{label}"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    try:
        os.sync()
        source, dest = f"docker://{image.reference}", f"oci:{layout}:{tag}"
        copy_s = timed_run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", source, dest])
        index = json.loads((layout / "index.json").read_text())
        if not index.get("manifests"):
            raise RuntimeError(f"skopeo copy left no manifest in {layout}")
        os.sync()
        unpack_s = timed_run(["umoci", "unpack", *rootless, "--image", f"{layout}:{tag}", str(bundle)])
        if not (bundle / "rootfs" / "data").is_dir():
            raise RuntimeError(f"umoci unpack left no rootfs/data in {bundle}")
    finally:
        shutil.rmtree(layout, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
    return copy_s, unpack_s


def storage(daemon: PycrioDaemon) -> Path:
    return daemon.base / "root" / "storage"


def check_gone(daemon: PycrioDaemon, image: BuiltImage) -> None:
    """After RemoveImage: none of the image's blobs, no unpacked layer, no partial download left."""
    store = storage(daemon)
    blobs = {p.name for p in (store / "blobs" / "sha256").iterdir()}
    left = [d for d in (*image.layers, image.config_digest) if d.removeprefix("sha256:") in blobs]
    layers = list((store / "layers").iterdir())
    partial = list((store / "ingest").iterdir()) if (store / "ingest").exists() else []
    if left or layers or partial:
        raise RuntimeError(
            f"RemoveImage left {len(left)} blobs, {len(layers)} layers, {len(partial)} ingest files: "
            "the cold pull would not be cold"
        )


def check_present(daemon: PycrioDaemon, image: BuiltImage) -> None:
    blobs = {p.name for p in (storage(daemon) / "blobs" / "sha256").iterdir()}
    missing = [d for d in image.layers if d.removeprefix("sha256:") not in blobs]
    if missing or len(list((storage(daemon) / "layers").iterdir())) < len(set(image.layers)):
        raise RuntimeError(f"after PullImage {len(missing)} layer blobs or some unpacked layers are missing")


def pull(stub: Any, reference: str) -> float:
    """Seconds of one PullImage call."""
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference))
    t0 = time.perf_counter()
    response = stub.PullImage(request, timeout=RPC_TIMEOUT)
    elapsed = time.perf_counter() - t0
    if not response.image_ref:
        raise RuntimeError(f"PullImage {reference} returned no image_ref")
    return elapsed


def remove(stub: Any, reference: str) -> None:
    stub.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=RPC_TIMEOUT)


def cold_pull(daemon: PycrioDaemon, stub: Any, image: BuiltImage) -> float:
    """RemoveImage, check the store is empty of the image, then time one PullImage."""
    remove(stub, image.reference)
    check_gone(daemon, image)
    os.sync()
    elapsed = pull(stub, image.reference)
    check_present(daemon, image)
    return elapsed


def one_round(
    daemon: PycrioDaemon, stub: Any, image: BuiltImage, tag: str, work: Path, index: int, warm_pulls: int
) -> dict[str, Any]:
    """Every measurement once (warm pulls `warm_pulls` times each); the order alternates per round."""
    row: dict[str, Any] = {"round": index}
    steps = ["skopeo", "pycrio"] if index % 2 == 0 else ["pycrio", "skopeo"]
    row["order"] = steps
    for step in steps:
        if step == "skopeo":
            copy_s, unpack_s = skopeo_chain(image, work, tag, f"r{index}")
            row[SKOPEO], row[UMOCI], row[SKOPEO_UNPACK] = copy_s, unpack_s, copy_s + unpack_s
        else:
            row[COLD] = cold_pull(daemon, stub, image)
            os.sync()
            row[WARM_TAG] = [pull(stub, image.reference) for _ in range(warm_pulls)]
            row[WARM_DIGEST] = [pull(stub, image.digest_reference) for _ in range(warm_pulls)]
    return row


def run_rounds(daemon: PycrioDaemon, image: BuiltImage, tag: str, work: Path, args: argparse.Namespace) -> Results:
    results = Results()
    with daemon.channel() as channel:
        stub = daemon.images(channel)
        for w in range(args.warmup_rounds):
            t0 = time.monotonic()
            one_round(daemon, stub, image, tag, work, -1 - w, args.warm_pulls)
            elapsed = time.monotonic() - t0
            print(f"  warm-up round {w + 1}/{args.warmup_rounds} ({elapsed:.1f}s)", file=sys.stderr, flush=True)
        for r in range(args.rounds):
            t0 = time.monotonic()
            row = one_round(daemon, stub, image, tag, work, r, args.warm_pulls)
            results.rounds.append(row)
            for key in SECONDS_ROWS:
                results.samples[key].append(row[key])
            for key in MS_ROWS:
                results.samples[key].extend(row[key])
            print(
                f"  round {r + 1}/{args.rounds} ({time.monotonic() - t0:.1f}s): skopeo {row[SKOPEO]:.3f}s, "
                f"+umoci {row[SKOPEO_UNPACK]:.3f}s, cold {row[COLD]:.3f}s, "
                f"warm {statistics.median(row[WARM_TAG]) * 1000:.1f}ms",
                file=sys.stderr,
                flush=True,
            )
    return results


# -- summary ---------------------------------------------------------------------------------


def summarize(results: Results) -> dict[str, Any]:
    rows = {
        name: {"n": len(v), "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
        for name, v in results.samples.items()
    }
    ratios: dict[str, Any] = {}
    for name, base in (("cold / skopeo copy", SKOPEO), ("cold / (skopeo copy + umoci unpack)", SKOPEO_UNPACK)):
        per_round = [r[COLD] / r[base] for r in results.rounds]
        ratios[name] = {
            "ratio_of_medians": rows[COLD]["median_s"] / rows[base]["median_s"],
            "per_round_min": min(per_round),
            "per_round_median": statistics.median(per_round),
            "per_round_max": max(per_round),
        }
    return {"rows": rows, "ratios": ratios}


def checks(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = summary["rows"]
    return [
        {
            "check": "cold pull <= 1.2x skopeo copy (ratio of medians)",
            "value": summary["ratios"]["cold / skopeo copy"]["ratio_of_medians"],
            "limit": COLD_VS_SKOPEO_LIMIT,
            "unit": "x",
            "pass": summary["ratios"]["cold / skopeo copy"]["ratio_of_medians"] <= COLD_VS_SKOPEO_LIMIT,
        },
        *(
            {
                "check": f"{name.removeprefix('pycrio ')} < 50 ms (median)",
                "value": rows[name]["median_s"] * 1000,
                "limit": WARM_LIMIT_MS,
                "unit": "ms",
                "pass": rows[name]["median_s"] * 1000 < WARM_LIMIT_MS,
            }
            for name in MS_ROWS
        ),
    ]


def print_summary(summary: dict[str, Any], results: list[dict[str, Any]]) -> None:
    rows = summary["rows"]
    header = f"{'measurement':<34} {'n':>3} {'median':>9} {'min':>9} {'max':>9}"
    print(f"\n{header}\n{'-' * len(header)}")
    for name in SECONDS_ROWS:
        r = rows[name]
        print(f"{name:<34} {r['n']:>3d} {r['median_s']:>8.3f}s {r['min_s']:>8.3f}s {r['max_s']:>8.3f}s")
    for name in MS_ROWS:
        r = rows[name]
        median, low, high = (r[k] * 1000 for k in ("median_s", "min_s", "max_s"))
        print(f"{name:<34} {r['n']:>3d} {median:>7.1f}ms {low:>7.1f}ms {high:>7.1f}ms")
    print("\nratios (ratio of medians; per-round min / median / max):")
    for name, r in summary["ratios"].items():
        print(
            f"  {name:<38} {r['ratio_of_medians']:>5.2f}   "
            f"({r['per_round_min']:.2f} / {r['per_round_median']:.2f} / {r['per_round_max']:.2f})"
        )
    print("targets:")
    for check in results:
        verdict = "PASS" if check["pass"] else "MISS"
        value = f"{check['value']:.2f}{'x' if check['unit'] == 'x' else ' ms'}"
        limit = f"{check['limit']:.1f}{'x' if check['unit'] == 'x' else ' ms'}"
        print(f"  {check['check']:<52} = {value:>9}  (limit {limit})  {verdict}")


# -- trace breakdown -------------------------------------------------------------------------


def traced_cold_pull(base: Path, config_text: str, image: BuiltImage) -> dict[str, Any]:
    """A tracing daemon: one untimed pull + remove, then one cold pull broken down from its spans."""
    with OTLPReceiver() as receiver:
        daemon = PycrioDaemon(base, args=tracing_args(receiver.endpoint), config_text=config_text, env=TRACE_ENV)
        daemon.start()
        try:
            with daemon.channel() as channel:
                stub = daemon.images(channel)
                pull(stub, image.reference)  # warm-up, as the timed daemon had
                remove(stub, image.reference)
                check_gone(daemon, image)
                os.sync()
                wall = pull(stub, image.reference)
                check_present(daemon, image)
            pulls = receiver.wait_for(lambda s: s.name == PULL, count=2)
            if len(pulls) < 2:
                raise RuntimeError("the traced daemon exported no span for the cold pull")
            root = max(pulls, key=lambda s: s.start_ns)
            receiver.wait_for(lambda s: s.trace_id == root.trace_id and s.name == "commit")
            spans = receiver.settle(quiet=0.5)
        finally:
            daemon.stop()
    children = [s for s in spans if s.trace_id == root.trace_id and s.parent_span_id == root.span_id]
    return breakdown(root, children, image, wall)


def _overlap_ns(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> int:
    """Time covered by at least one interval of each list."""
    both = [(max(a, c), min(b, d)) for a, b in first for c, d in second if min(b, d) > max(a, c)]
    return union_ns(both)


def breakdown(root: ReceivedSpan, children: list[ReceivedSpan], image: BuiltImage, wall_s: float) -> dict[str, Any]:
    """Per-step timings (ms from the PullImage span's start) and a summary of where time went."""
    index = {digest: i for i, digest in enumerate(image.layers)}
    steps = []
    for span in sorted(children, key=lambda s: s.start_ns):
        attrs = span.attributes
        digest = attrs.get("digest", "")
        steps.append(
            {
                "name": span.name,
                "layer": index.get(digest),
                "digest": digest,
                "size": attrs.get("size"),
                "bytes_fetched": attrs.get("bytes_fetched"),
                "cached": attrs.get("cached"),
                "files": attrs.get("files"),
                "bytes": attrs.get("bytes"),
                "start_ms": (span.start_ns - root.start_ns) / 1e6,
                "duration_ms": (span.end_ns - span.start_ns) / 1e6,
            }
        )

    def intervals(name: str) -> list[tuple[int, int]]:
        return [(s.start_ns, s.end_ns) for s in children if s.name == name]

    fetches, unpacks = intervals("fetch_layer"), intervals("unpack_layer")
    resolve = [s for s in steps if s["name"] == "resolve"]
    first_fetch = min((a for a, _ in fetches), default=root.start_ns)
    last_unpack = max((b for _, b in unpacks), default=root.end_ns)
    commit = [s for s in steps if s["name"] == "commit"]
    summary = {
        "pull_span_ms": (root.end_ns - root.start_ns) / 1e6,
        "client_wall_ms": wall_s * 1000,
        "resolve_ms": sum(s["duration_ms"] for s in resolve),
        "resolve_end_to_first_fetch_ms": (first_fetch - root.start_ns) / 1e6
        - sum(s["start_ms"] + s["duration_ms"] for s in resolve[-1:]),
        "fetch_busy_ms": union_ns(fetches) / 1e6,
        "unpack_busy_ms": union_ns(unpacks) / 1e6,
        "fetch_and_unpack_at_once_ms": _overlap_ns(fetches, unpacks) / 1e6,
        "fetch_sum_ms": sum(b - a for a, b in fetches) / 1e6,
        "unpack_sum_ms": sum(b - a for a, b in unpacks) / 1e6,
        "layers_phase_ms": (last_unpack - first_fetch) / 1e6,
        "last_unpack_to_commit_ms": (commit[0]["start_ms"] - (last_unpack - root.start_ns) / 1e6) if commit else 0.0,
        "commit_ms": sum(s["duration_ms"] for s in commit),
        "bytes_fetched": sum(int(s["bytes_fetched"] or 0) for s in steps if s["name"] == "fetch_layer"),
        "bytes_unpacked": sum(int(s["bytes"] or 0) for s in steps if s["name"] == "unpack_layer"),
    }
    return {"root": {"trace_id": root.trace_id, "span_id": root.span_id}, "steps": steps, "summary": summary}


def print_breakdown(trace: dict[str, Any]) -> None:
    s = trace["summary"]
    print(
        f"\n== where one cold pull went (traced daemon, rate 1000000): PullImage span {s['pull_span_ms']:.1f} ms, "
        f"client saw {s['client_wall_ms']:.1f} ms =="
    )
    header = (
        f"{'step':<13} {'layer':>5} {'digest':<15} {'MiB':>7} {'fetched MiB':>11} "
        f"{'start ms':>9} {'dur ms':>8} {'MiB/s':>7}  detail"
    )
    print(f"{header}\n{'-' * len(header)}")
    for step in trace["steps"]:
        layer = "" if step["layer"] is None else str(step["layer"])
        digest = step["digest"].removeprefix("sha256:")[:12] if step["digest"] else ""
        size = f"{step['size'] / MIB:.2f}" if step["size"] is not None else ""
        detail = ""
        rate = ""
        fetched = ""
        if step["name"] == "fetch_layer":
            fetched = f"{step['bytes_fetched'] / MIB:.2f}"
            if step["bytes_fetched"] and step["duration_ms"]:
                rate = f"{step['bytes_fetched'] / MIB / (step['duration_ms'] / 1000):.0f}"
            detail = "cached" if step["cached"] else ""
        elif step["name"] == "unpack_layer":
            if step["bytes"] and step["duration_ms"]:
                rate = f"{step['bytes'] / MIB / (step['duration_ms'] / 1000):.0f}"
            detail = f"{step['files']} entries, {step['bytes'] / MIB:.2f} MiB tar"
        line = (
            f"{step['name']:<13} {layer:>5} {digest:<15} {size:>7} {fetched:>11} "
            f"{step['start_ms']:>9.1f} {step['duration_ms']:>8.1f} {rate:>7}  {detail}"
        )
        print(line.rstrip())
    span = s["pull_span_ms"]
    rows = [
        ("resolve (manifest GET)", s["resolve_ms"], f"{s['resolve_ms'] / span:.1%} of the span"),
        ("resolve end -> first fetch (config blob)", s["resolve_end_to_first_fetch_ms"], ""),
        ("layers phase (first fetch -> last unpack)", s["layers_phase_ms"], f"{s['layers_phase_ms'] / span:.1%}"),
        ("  some fetch running", s["fetch_busy_ms"], f"sum over layers {s['fetch_sum_ms']:.1f} ms"),
        ("  some unpack running", s["unpack_busy_ms"], f"sum over layers {s['unpack_sum_ms']:.1f} ms"),
        ("  fetch and unpack at once", s["fetch_and_unpack_at_once_ms"], ""),
        ("last unpack end -> commit start", s["last_unpack_to_commit_ms"], ""),
        ("commit (record write)", s["commit_ms"], ""),
    ]
    print("summary:")
    for label, value, note in rows:
        print(f"  {label:<44} {value:>8.1f} ms" + (f"  ({note})" if note else ""))
    print(
        f"  throughput: {s['bytes_fetched'] / MIB:.1f} MiB fetched in {s['fetch_busy_ms']:.0f} ms of fetching, "
        f"{s['bytes_unpacked'] / MIB:.1f} MiB of tar unpacked in {s['unpack_busy_ms']:.0f} ms of unpacking"
    )


# -- main ------------------------------------------------------------------------------------


def tool_version(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Registry, image, daemon; interleaved rounds; print; exit 0 whatever the numbers."""
    args = parse_args(argv)
    layer_size = int(args.layer_size_mib * MIB)
    tag = "1"
    print(
        f"pycrio pull benchmark: {args.layers} data layers x {args.layer_size_mib:g} MiB random bytes, "
        f"{args.rounds} rounds (+{args.warmup_rounds} warm-up), {args.warm_pulls} warm pulls per reference per round"
    )
    print(f"python {platform.python_version()}, grpc {grpc.__version__}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"{tool_version('skopeo', '--version')}, {tool_version('umoci', '--version')}")

    started = time.monotonic()
    report: dict[str, Any] = {
        "parameters": {
            "layers": args.layers,
            "layer_size_mib": args.layer_size_mib,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
            "warm_pulls": args.warm_pulls,
            "trace": args.trace,
        }
    }
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-pull-") as tmp:
        base = Path(tmp)
        registry = TestRegistry(base / "registry").start()
        try:
            t0 = time.monotonic()
            builder = ImageBuilder(base / "images", registry)
            name = f"bench/pull-{args.layers}x{layer_size}"
            image = builder.multi_layer(name, tag, layers=args.layers, layer_size=layer_size)
            total = sum(image.layer_sizes)
            print(
                f"image {image.reference} ({image.digest[:19]}...): {len(image.layers)} layers, "
                f"{total / MIB:.1f} MiB compressed (built and pushed in {time.monotonic() - t0:.1f}s, untimed)"
            )
            report["image"] = {
                "reference": image.reference,
                "digest": image.digest,
                "layers": list(image.layers),
                "layer_sizes": list(image.layer_sizes),
                "total_bytes": total,
            }
            config_text = f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            work = base / "work"
            work.mkdir()
            daemon = PycrioDaemon(base / "daemon", args=["--log-level", "info"], config_text=config_text)
            daemon.start()
            try:
                results = run_rounds(daemon, image, tag, work, args)
            finally:
                exit_code = daemon.stop()
            trace = traced_cold_pull(base / "traced", config_text, image) if args.trace else None
        finally:
            registry.stop()

    summary = summarize(results)
    target_checks = checks(summary)
    print_summary(summary, target_checks)
    if trace is not None:
        print_breakdown(trace)
    duration = time.monotonic() - started
    print(f"\ndaemon exit code {exit_code}; total time {duration:.1f}s")

    report.update(
        {
            "summary": summary,
            "checks": target_checks,
            "rounds": results.rounds,
            "trace": trace,
            "exit_code": exit_code,
            "duration_s": duration,
        }
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

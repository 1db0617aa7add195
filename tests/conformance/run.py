#!/usr/bin/env python3
"""`make conformance`: the CRI validation suite (critest) against pycrio (or a peer), offline.

Steps: a loopback docker-registry; the stand-in test images (tests/conformance/images/) built and
pushed there under their original names; a runtime configured to pull those names from the
registry as a mirror (pycrio: containers-registries.conf v2; containerd: certs.d hosts.toml);
`critest` over the whole suite; a summary (passed / failed / skipped, failures by name) and the
JUnit and JSON reports under build/conformance/. Then the run is held to
tests/conformance/EXPECTED.md: a failure not listed there fails the run, and so does a listed
failure that now passes (the list only shrinks).

    make conformance                      # pycrio
    make conformance PEER=containerd      # the same run against containerd (make peer-containerd)
    make conformance CONFORMANCE_ARGS='--focus ExecSync'
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.cni_fixture import bridge_network  # noqa: E402
from tests.harness import PycrioDaemon  # noqa: E402
from tests.registry_fixture import TestRegistry  # noqa: E402

BUILD = ROOT / "build" / "conformance"
EXPECTED = Path(__file__).resolve().parent / "EXPECTED.md"
CRITEST = ROOT / ".venv" / "bin" / "critest"
CRITEST_TIMEOUT = 40 * 60
# pycrio's pods get a network of their own, so a run never touches the host's default one.
BRIDGE = "pycriocrt0"
SUBNET = "10.135.0.0/16"
POD_CGROUP_PARENT = "/pycrio-conformance"
# An EXPECTED.md entry: "- `<spec name>`: <reason>" (the name may be a prefix, ending in "...").
EXPECTED_LINE = re.compile(r"^- `(?P<name>[^`]+)`\s*[:\u2014-]\s*(?P<reason>.+)$")


def say(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- results


@dataclass
class SpecResult:
    name: str
    state: str  # passed, failed, skipped, pending, panicked, interrupted...
    message: str = ""
    seconds: float = 0.0


@dataclass
class Results:
    specs: list[SpecResult] = field(default_factory=list)

    def named(self, state: str) -> list[SpecResult]:
        return [s for s in self.specs if s.state == state]

    @property
    def failed(self) -> list[SpecResult]:
        return [s for s in self.specs if s.state not in ("passed", "skipped", "pending")]


def read_ginkgo_json(path: Path) -> Results:
    """The specs of a ginkgo `--json-report` (one entry per It, full names joined by spaces)."""
    results = Results()
    for suite in json.loads(path.read_text()):
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*(spec.get("ContainerHierarchyTexts") or []), spec.get("LeafNodeText", "")]).strip()
            failure = spec.get("Failure") or {}
            results.specs.append(SpecResult(name, spec.get("State", "?"), (failure.get("Message") or "").strip(),
                                            (spec.get("RunTime") or 0) / 1e9))
    return results


@dataclass
class Expected:
    """Specs that may fail, with their reasons (tests/conformance/EXPECTED.md)."""

    entries: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Expected:
        """The entries of the `## Expected failures` section (other sections are for people)."""
        entries: dict[str, str] = {}
        in_section = False
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                in_section = line.strip().lower() == "## expected failures"
            elif in_section and (match := EXPECTED_LINE.match(line.strip())):
                entries[match["name"]] = match["reason"].strip()
        return cls(entries)

    def reason(self, spec: str) -> str | None:
        for name, reason in self.entries.items():
            if spec == name or (name.endswith("...") and spec.startswith(name[:-3])):
                return reason
        return None


def judge(results: Results, expected: Expected) -> tuple[list[SpecResult], list[str]]:
    """(failures not listed in EXPECTED.md, listed entries that no spec of this run failed)."""
    unexpected = [s for s in results.failed if expected.reason(s.name) is None]
    ran = {s.name for s in results.specs if s.state in ("passed", "failed", "panicked", "timedout", "interrupted")}
    failed = {s.name for s in results.failed}
    now_passing = []
    for name in expected.entries:
        matching_ran = [s for s in ran if s == name or (name.endswith("...") and s.startswith(name[:-3]))]
        if matching_ran and not any(s in failed for s in matching_ran):
            now_passing.append(name)
    return unexpected, now_passing


def print_summary(results: Results, expected: Expected, runtime: str, seconds: float) -> None:
    counts = {state: len(results.named(state)) for state in ("passed", "skipped", "pending")}
    say(f"critest on {runtime}: {counts['passed']} passed, {len(results.failed)} failed, "
        f"{counts['skipped']} skipped, {counts['pending']} pending, in {seconds:.0f}s")
    for spec in results.failed:
        reason = expected.reason(spec.name)
        first = spec.message.splitlines()[0][:200] if spec.message else ""
        say(f"  FAILED  {spec.name}")
        say(f"          {'expected: ' + reason if reason else 'NOT EXPECTED'}{' | ' + first if first else ''}")


# ---------------------------------------------------------------- the runtimes


def conflist(directory: Path) -> Path:
    return bridge_network(directory, "pycrio-conformance", BRIDGE, SUBNET, portmap="portmap", hairpin=True,
                          filename="10-conformance.conflist")


def registries_conf(path: Path, hosts: list[str], registry: str) -> Path:
    """containers-registries.conf v2: each source host mirrored at <registry>/<host>, plain HTTP."""
    blocks = [f'[[registry]]\nprefix = "{host}"\nlocation = "{host}"\n'
              f'[[registry.mirror]]\nlocation = "{registry}/{host}"\ninsecure = true\n' for host in hosts]
    path.write_text("# written by tests/conformance/run.py\n" + "\n".join(blocks))
    return path


def start_pycrio(workdir: Path, hosts: list[str], registry: str, runtime_type: str = "oci") -> PycrioDaemon:
    conf = registries_conf(workdir / "registries.conf", hosts, registry)
    (workdir / "registries.conf.d").mkdir(exist_ok=True)
    netdir = conflist(workdir / "net.d")
    daemon = PycrioDaemon(workdir / "pycrio", config_text=(
        f'[pycrio.image]\nregistries_conf = "{conf}"\nregistries_conf_dir = "{workdir / "registries.conf.d"}"\n'
        f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
        f'[pycrio.runtime]\npod_cgroup_parent = "{POD_CGROUP_PARENT}"\n'
        # the default handler "runc" with the runtime type asked for ("pod": one pycrio-monitor per pod)
        f'[pycrio.runtime.runtimes.runc]\nruntime_type = "{runtime_type}"\n'
    ))
    return daemon.start(timeout=60)


def stop_pycrio(daemon: PycrioDaemon) -> None:
    """Remove what critest left (pods, containers, images stay in build/), stop the daemon, drop host state."""
    if daemon.alive():
        daemon.crictl("rmp", "-a", "-f", check=False)
    daemon.stop()
    from pycrio.oci.cgroups import remove_cgroup
    try:
        remove_cgroup(POD_CGROUP_PARENT)
    except OSError as exc:  # a pod of an earlier, killed run: `make clean-test-state` removes it
        say(f"conformance: warning: cgroup {POD_CGROUP_PARENT} not removed ({exc.strerror}); "
            "run `make clean-test-state` when no test is running")
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


# ---------------------------------------------------------------- the run


# critest runs its streaming specs over SPDY by default; these flags run them over WebSocket
WEBSOCKET_STREAMING = ["-websocket-exec", "-websocket-attach", "-websocket-portforward"]
STREAMING_FOCUS = r"\[k8s\.io\] Streaming"


def run_critest(
    endpoint: str, report_dir: Path, focus: str | None, skip: str | None, log: Path, extra: list[str] | None = None
) -> int:
    argv = [str(CRITEST), f"-runtime-endpoint={endpoint}", f"-image-endpoint={endpoint}",
            f"-ginkgo.junit-report={report_dir / 'junit.xml'}", f"-ginkgo.json-report={report_dir / 'report.json'}",
            "-ginkgo.no-color", "-ginkgo.timeout=40m", *(extra or [])]
    if focus:
        argv.append(f"-ginkgo.focus={focus}")
    if skip:
        argv.append(f"-ginkgo.skip={skip}")
    say(f"==> {' '.join(argv)}")
    say(f"    (its output: {log})")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=report_dir)
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(2)
            if time.monotonic() - last >= 30:  # progress for a long run
                done = log.read_text(errors="replace").count("•")
                say(f"    ... {done} specs done")
                last = time.monotonic()
    return proc.returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", choices=("pycrio", "containerd"), default="pycrio", help="the runtime to test")
    parser.add_argument("--runtime-type", choices=("oci", "pod"), default="oci",
                        help='pycrio\'s default handler: "oci" (conmon per container) or "pod" (pycrio-monitor per pod)')
    parser.add_argument("--focus", help="only specs matching this regular expression (ginkgo.focus)")
    parser.add_argument("--skip", help="leave out specs matching this regular expression (ginkgo.skip)")
    parser.add_argument("--no-judge", action="store_true",
                        help="report only; do not hold the result to EXPECTED.md (the default for a peer)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.conformance.images.build import SOURCE_REGISTRIES, build_and_push

    if not CRITEST.is_file():
        say(f"conformance: {CRITEST} not found; run `make critest`")
        return 2
    started = time.monotonic()
    name = args.peer if args.peer != "pycrio" or args.runtime_type == "oci" else "pycrio-pod"
    workdir = BUILD / name
    BUILD.mkdir(parents=True, exist_ok=True)
    lock = (BUILD / f"{args.peer}.lock").open("w")  # one pycrio run at a time: they share the bridge and cgroup
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"conformance: another run against {args.peer} is using {workdir}; wait for it to finish")
        return 2
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    report_dir = workdir / "report"
    report_dir.mkdir()
    registry = TestRegistry(workdir / "registry").start()
    runtime_stop = None
    try:
        t0 = time.monotonic()
        refs = build_and_push(registry.address, BUILD / "images")
        say(f"==> {len(refs)} test images in {registry.url} ({time.monotonic() - t0:.0f}s)")
        if args.peer == "pycrio":
            daemon = start_pycrio(workdir, list(SOURCE_REGISTRIES), registry.address, args.runtime_type)
            endpoint = daemon.endpoint
            runtime_stop = lambda: stop_pycrio(daemon)  # noqa: E731
            say(f"==> pycrio on {daemon.socket} (log {daemon.log_file})")
        else:
            from tests.conformance.peer_containerd import ContainerdPeer
            peer = ContainerdPeer(workdir / "containerd", {h: f"{registry.address}/{h}" for h in SOURCE_REGISTRIES})
            peer.start()
            endpoint = peer.endpoint
            runtime_stop = peer.stop
            say(f"==> containerd on {endpoint}")
        t0 = time.monotonic()
        code = run_critest(endpoint, report_dir, args.focus, args.skip, workdir / "critest.log")
        seconds = time.monotonic() - t0
        ws_results = None
        if not (args.focus or args.skip):
            say("==> the streaming specs again, over WebSocket (critest -websocket-exec/-attach/-portforward)")
            ws_dir = workdir / "report-websocket"
            ws_dir.mkdir()
            run_critest(endpoint, ws_dir, STREAMING_FOCUS, None, workdir / "critest-websocket.log", WEBSOCKET_STREAMING)
            if (ws_dir / "report.json").is_file():
                ws_results = read_ginkgo_json(ws_dir / "report.json")
    finally:
        if runtime_stop is not None:
            runtime_stop()
        registry.stop()
    report = report_dir / "report.json"
    if not report.is_file():
        say(f"conformance: critest wrote no report (exit {code}); last lines of {workdir / 'critest.log'}:")
        say("\n".join((workdir / "critest.log").read_text(errors="replace").splitlines()[-30:]))
        return 1
    results = read_ginkgo_json(report)
    expected = Expected.load(EXPECTED)
    print_summary(results, expected, args.peer, seconds)
    say(f"reports: {report_dir / 'junit.xml'}, {report}; total {time.monotonic() - started:.0f}s")
    ws_failed: list[str] = []
    if ws_results is not None:
        counts = {state: len(ws_results.named(state)) for state in ("passed", "skipped")}
        ws_failed = [spec.name for spec in ws_results.failed]
        say(f"critest streaming over WebSocket on {args.peer}: {counts['passed']} passed, {len(ws_failed)} failed, "
            f"{counts['skipped']} skipped")
        for name in ws_failed:
            say(f"  FAILED  {name} (over WebSocket)")
    elif not (args.focus or args.skip):
        ws_failed = ["the WebSocket streaming run wrote no report"]
        say(f"conformance: {ws_failed[0]} (see {workdir / 'critest-websocket.log'})")
    if args.no_judge or args.peer != "pycrio" or args.focus or args.skip:
        return 0 if not results.failed and not ws_failed else 1
    unexpected, now_passing = judge(results, expected)
    for name in ws_failed:  # no streaming spec may fail: EXPECTED.md lists none
        say(f"conformance: streaming failure over WebSocket: `{name}`")
    if ws_failed:
        return 1
    for name in now_passing:
        say(f"conformance: listed in EXPECTED.md but passed now: `{name}` (remove it from the list)")
    for spec in unexpected:
        say(f"conformance: failure not in EXPECTED.md: `{spec.name}`")
    if unexpected or now_passing:
        return 1
    say("conformance: every failure is one EXPECTED.md lists")
    return 0


if __name__ == "__main__":
    sys.exit(main())

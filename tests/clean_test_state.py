#!/usr/bin/env python3
"""`make clean-test-state`: remove the host state a failed or killed pycrio test run left behind.

Only what pycrio's tests, benchmarks, demo and conformance runs make, recognised by convention:
- processes (pycrio daemons, conmon, containers' processes) whose command line or cgroup points
  into a test directory: /tmp/pytest-of-*/, /tmp/pycrio-demo-*, /tmp/pycrio-bench-*,
  <repo>/build/conformance/, <repo>/build/peer-containerd/;
- mounts below those directories (overlay root filesystems, pinned namespaces, /dev/shm);
- top-level cgroups named `pycrio-*` (tests give pods such a parent; the default `/pycrio` of
  real pods is never touched), in every hierarchy;
- bridges named `pycrio<letters><digits>` (pycriotest9, pycriofx8, ...) and `ctrdpeer<digits>`,
  never the default `pycrio0`;
- iptables rules whose CNI comment names a network `pycrio-<something>` (the default network is
  `pycrio`), the CNI-* chains they jump to, and host-local IPAM state of those networks;
- what a kubelet test node (tests/kubelet/harness.py) recorded in /run/pycrio-kubelet-tests/ before
  kubelet changed the host: the sysctls are set back, the directories it created and a top-level
  kubepods cgroup that was not there are removed.
It prints what it removes; running it on a clean host removes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pycrio import procfs

ROOT = Path(__file__).resolve().parent.parent
TEST_DIRS = [re.compile(p) for p in (
    r"/tmp/pytest-of-[^/]+/", r"/tmp/pycrio-demo-[^/ ]+", r"/tmp/pycrio-bench-[^/ ]+",
    re.escape(str(ROOT / "build" / "conformance")), re.escape(str(ROOT / "build" / "peer-containerd")),
)]
TEST_CGROUP = re.compile(r"^pycrio-.+")
TEST_BRIDGE = re.compile(r"^(pycrio[a-z]+\d+|ctrdpeer\d+)$")
TEST_NETWORK = re.compile(r'name: \\?"(pycrio-[^"\\]+)\\?"')
CGROUP_ROOT = Path("/sys/fs/cgroup")
CNI_NETWORKS = Path("/var/lib/cni/networks")
CNI_RESULTS = Path("/var/lib/cni/results")
KUBELET_RECORDS = Path("/run/pycrio-kubelet-tests")


def in_test_dir(text: str) -> bool:
    return any(p.search(text) for p in TEST_DIRS)


def say(message: str) -> None:
    print(f"clean-test-state: {message}", flush=True)


def test_cgroups() -> list[Path]:
    """Every `pycrio-*` top-level cgroup directory of every hierarchy, deepest first."""
    found: list[Path] = []
    for hierarchy in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()] if CGROUP_ROOT.is_dir() else []:
        if not hierarchy.is_dir() or hierarchy.is_symlink():
            continue
        for top in hierarchy.iterdir():
            if top.is_dir() and TEST_CGROUP.match(top.name):
                found.extend(sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)))
                found.append(top)
    return found


def processes_to_kill(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    me = os.getpid()
    for pid in procfs.all_pids():
        if pid == me:
            continue
        cmdline = b" ".join(procfs.argv(pid)).decode(errors="replace")
        if in_test_dir(cmdline) and ("pycrio" in cmdline or "conmon" in cmdline or "containerd" in cmdline
                                     or "registry" in cmdline or "jaeger" in cmdline or "kubelet" in cmdline):
            pids.add(pid)
    for cgroup in cgroups:
        try:
            pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
        except OSError:
            pass
    return pids


def kill_all(pids: set[int]) -> None:
    for pid in sorted(pids):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            os.kill(pid, signal.SIGKILL)
            say(f"killed pid {pid} ({name})")
        except OSError:
            pass
    if pids:
        time.sleep(0.5)


def unmount_all() -> None:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if in_test_dir(point + "/"):
            mounts.append(point)
    for point in sorted(set(mounts), key=lambda p: -len(p)):
        if subprocess.run(["umount", "-l", point], capture_output=True).returncode == 0:
            say(f"unmounted {point}")


def remove_cgroups(cgroups: list[Path]) -> None:
    for cgroup in cgroups:
        try:
            cgroup.rmdir()
            say(f"removed cgroup {cgroup}")
        except OSError:
            pass


def remove_bridges() -> None:
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if TEST_BRIDGE.match(name) and subprocess.run(["ip", "link", "delete", name]).returncode == 0:
            say(f"deleted bridge {name}")


def remove_iptables_rules() -> None:
    for table in ("nat", "filter"):
        dump = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
        chains: set[str] = set()
        networks: set[str] = set()
        for line in dump.splitlines():
            if not line.startswith("-A ") or not (match := TEST_NETWORK.search(line)):
                continue
            networks.add(match[1])
            words = line.split()
            if "-j" in words:
                target = words[words.index("-j") + 1]
                if target.startswith("CNI-") and target not in ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK",
                                                                "CNI-HOSTPORT-MASQ", "CNI-FORWARD", "CNI-ADMIN"):
                    chains.add(target)
            argv = ["iptables", "-t", table, "-D", *split_rule(line[3:])]
            if subprocess.run(argv, capture_output=True).returncode == 0:
                say(f"deleted {table} rule {line[:120]}")
        for chain in sorted(chains):
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
            if subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True).returncode == 0:
                say(f"deleted {table} chain {chain}")
        remove_ipam_state(networks)


def split_rule(rule: str) -> list[str]:
    """iptables-save's rule text as argv (double quotes group, backslash escapes a quote)."""
    return shlex.split(rule)


def remove_ipam_state(networks: set[str]) -> None:
    names = set(networks)
    if CNI_NETWORKS.is_dir():
        names.update(p.name for p in CNI_NETWORKS.iterdir() if p.name.startswith("pycrio-"))
    for name in sorted(names):
        directory = CNI_NETWORKS / name
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            say(f"removed host-local IPAM state {directory}")
        if CNI_RESULTS.is_dir():
            for cached in CNI_RESULTS.glob(f"{name}-*"):
                cached.unlink(missing_ok=True)


def restore_kubelet_hosts() -> None:
    """Put back what killed kubelet test nodes changed, from the records they wrote first."""
    for record in sorted(KUBELET_RECORDS.glob("*.json")) if KUBELET_RECORDS.is_dir() else []:
        try:
            state = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        for key, value in state.get("sysctls", {}).items():
            path = Path("/proc/sys", key)
            if path.read_text().strip() != value:
                path.write_text(value)
                say(f"set {key.replace('/', '.')} back to {value}")
        for created in state.get("created", []):
            if os.path.lexists(created):
                shutil.rmtree(created, ignore_errors=True) if os.path.isdir(created) else os.unlink(created)
                say(f"removed {created}")
        before = set(state.get("kubepods_before", []))
        for hierarchy in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()] if CGROUP_ROOT.is_dir() else []:
            top = hierarchy / "kubepods"
            if str(top) not in before and top.is_dir() and not hierarchy.is_symlink():
                remove_cgroups(sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top])
        record.unlink()
        say(f"restored the host from {record}")


def main() -> int:
    if os.geteuid() != 0:
        say("needs root")
        return 1
    cgroups = test_cgroups()
    kill_all(processes_to_kill(cgroups))
    unmount_all()
    remove_cgroups(test_cgroups())
    remove_bridges()
    remove_iptables_rules()
    restore_kubelet_hosts()
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

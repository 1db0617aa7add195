"""RuntimeDefault seccomp inside real runc/conmon containers: what the allow-list refuses fails with
EPERM, busybox still works, capabilities open their syscalls, Unconfined allows everything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pycrio.oci import seccomp
from tests.harness import PycrioDaemon
from tests.registry_fixture import BuiltImage
from tests.test_hardening import busybox, container_log, hd_bridge, hd_daemon, pod_file, run_in_pod, wait_exited  # noqa: F401

# A static probe: each argument names a syscall to try; it prints "<name>=ok" or "<name>=errno:N".
PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static long try(const char *name) {
    if (!strcmp(name, "add_key")) return syscall(SYS_add_key, "user", "pycrio", "x", 1, -2 /* process keyring */);
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -2, 0);
    if (!strcmp(name, "vsock")) return socket(40 /* AF_VSOCK */, SOCK_STREAM, 0);
    if (!strcmp(name, "alg")) return socket(38 /* AF_ALG */, SOCK_SEQPACKET, 0);
    if (!strcmp(name, "inet")) return socket(AF_INET, SOCK_STREAM, 0);
    if (!strcmp(name, "unix")) return socket(AF_UNIX, SOCK_STREAM, 0);
    if (!strcmp(name, "unshare")) return unshare(CLONE_NEWUSER);
    if (!strcmp(name, "personality")) return personality(0x0040000 /* ADDR_COMPAT_LAYOUT */);
    if (!strcmp(name, "personality_query")) return personality(0xffffffff);
    if (!strcmp(name, "getpid")) return getpid();
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        errno = 0;
        long r = try(argv[i]);
        if (r < 0) printf("%s=errno:%d\n", argv[i], errno); else printf("%s=ok\n", argv[i]);
    }
    return 0;
}
"""
PROBES = ["add_key", "keyctl", "vsock", "alg", "inet", "unix", "unshare", "personality", "personality_query", "getpid"]
BUSYBOX_WORKS = "id -u; ls / >/dev/null && echo ls-ok; sleep 0.1 && echo sleep-ok; echo $(( 6 * 7 ))"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the static syscall probe")
    directory = tmp_path_factory.mktemp("probe")
    (directory / "probe.c").write_text(PROBE_C)
    subprocess.run([compiler, "-static", "-O1", "-o", str(directory / "probe"), str(directory / "probe.c")],
                   check=True, capture_output=True)
    return directory / "probe"


def run_probe(d: PycrioDaemon, tmp_path: Path, image: str, pod_id: str, podfile: Path, name: str,
              security: dict, probe: Path) -> dict[str, str]:
    command = ["/bin/sh", "-c", f"{BUSYBOX_WORKS}; /probe/probe {' '.join(PROBES)}"]
    cid = run_in_pod(d, tmp_path, pod_id, podfile, image, name, command,
                     linux={"security_context": security},
                     mounts=[{"container_path": "/probe", "host_path": str(probe.parent), "readonly": True}])
    assert wait_exited(d, cid)["exitCode"] == 0
    out = container_log(tmp_path, "sec", name)
    assert out.split("\n")[:4] == ["0", "ls-ok", "sleep-ok", "42"], out  # busybox works under every profile
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_runtime_default_refuses_with_eperm_what_it_does_not_allow(
    hd_daemon: PycrioDaemon, busybox: BuiltImage, tmp_path: Path, probe: Path
) -> None:
    d = hd_daemon
    podfile = pod_file(tmp_path, "sec", host_network=True)
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    default = {"seccomp": {"profile_type": 0}}  # RuntimeDefault
    confined = run_probe(d, tmp_path, busybox.reference, pod_id, podfile, "confined", default, probe)
    eperm = "errno:1"
    # Outside the allow-list (keys), socket families it leaves out (VSOCK, ALG), arguments it does
    # not allow (a personality other than the listed ones), syscalls reserved to CAP_SYS_ADMIN.
    assert {k: confined[k] for k in ("add_key", "keyctl", "vsock", "alg", "personality", "unshare")} == dict.fromkeys(
        ("add_key", "keyctl", "vsock", "alg", "personality", "unshare"), eperm), confined
    assert {k: confined[k] for k in ("inet", "unix", "personality_query", "getpid")} == dict.fromkeys(
        ("inet", "unix", "personality_query", "getpid"), "ok"), confined

    # CAP_SYS_ADMIN opens unshare (and the rest of its group); keys stay refused to everyone.
    admin = {**default, "capabilities": {"add_capabilities": ["SYS_ADMIN"]}}
    with_admin = run_probe(d, tmp_path, busybox.reference, pod_id, podfile, "admin", admin, probe)
    assert with_admin["unshare"] == "ok" and with_admin["add_key"] == eperm, with_admin

    # Unconfined: none of those is refused by a filter (the kernel may still say no otherwise).
    unconfined = run_probe(d, tmp_path, busybox.reference, pod_id, podfile, "free", {"seccomp": {"profile_type": 1}},
                           probe)
    assert all(unconfined[k] != eperm for k in ("add_key", "keyctl", "vsock", "alg", "personality")), unconfined
    spec = d.crictl("inspect", d.crictl("ps", "-a", "-q", "--name", "^confined$").stdout.strip()).stdout
    assert '"defaultAction": "SCMP_ACT_ERRNO"' in spec and '"defaultErrnoRet": 1' in spec
    d.crictl("rmp", "-f", pod_id)


def test_busybox_shell_keeps_working_under_runtime_default(hd_daemon: PycrioDaemon, busybox: BuiltImage,
                                                           tmp_path: Path) -> None:
    """No helper needed: a pipeline, job control, a subshell and `unshare`, refused by the profile."""
    d = hd_daemon
    podfile = pod_file(tmp_path, "sec", host_network=True)
    pod_id = d.crictl("runp", str(podfile)).stdout.strip()
    script = f"{BUSYBOX_WORKS}; (sleep 0.1 &) ; wait; echo a b | busybox wc -w; busybox unshare -U true || echo unshare-refused"
    cid = run_in_pod(d, tmp_path, pod_id, podfile, busybox.reference, "shell", ["/bin/sh", "-c", script],
                     linux={"security_context": {"seccomp": {"profile_type": 0}}})
    assert wait_exited(d, cid)["exitCode"] == 0
    out = container_log(tmp_path, "sec", "shell")
    assert out.split("\n")[:6] == ["0", "ls-ok", "sleep-ok", "42", "2", "unshare-refused"], out
    assert "Operation not permitted" in container_log(tmp_path, "sec", "shell", "stderr")
    d.crictl("rmp", "-f", pod_id)


def test_profile_covers_the_host_architectures() -> None:
    profile = seccomp.runtime_default((), machine="x86_64", kernel="6.1.0")
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert {"arch_prctl", "modify_ldt"} <= {n for r in profile["syscalls"] for n in r["names"]}
    old = seccomp.runtime_default((), machine="x86_64", kernel="4.4.0")
    assert "ptrace" not in {n for r in old["syscalls"] for n in r["names"]}
    s390 = seccomp.runtime_default((), machine="s390x", kernel="6.1.0")
    assert [r["args"][0]["index"] for r in s390["syscalls"] if r["names"] == ["clone"]] == [1]

"""Seccomp for containers: the RuntimeDefault profile and Localhost (Docker/OCI JSON) profiles.

RuntimeDefault is an allow-list with the same content as containerd's and moby's default profile
(containerd v2.4.2, contrib/seccomp): every syscall not allowed below fails with EPERM; some are
allowed only with certain arguments (personality, clone without namespace flags, socket for the
usual address families) or only to a process holding a capability (mount, unshare and setns with
CAP_SYS_ADMIN, ptrace helpers with CAP_SYS_PTRACE, ...). The syscall lists are data taken from that
profile; names the host's libseccomp does not know are skipped by runc.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Iterable
from pathlib import Path

from pycrio.errors import InvalidArgument

EPERM, ENOSYS = 1, 38

# Allowed to every process, whatever its capabilities.
ALLOWED: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "cachestat", "capget", "capset", "chdir",
    "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64", "clock_getres", "clock_getres_time64",
    "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range",
    "connect", "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "execve",
    "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate",
    "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchown32", "fchownat", "fcntl",
    "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr", "fstat",
    "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate", "ftruncate64", "futex", "futex_requeue",
    "futex_time64", "futex_wait", "futex_waitv", "futex_wake", "futimesat", "getcpu", "getcwd", "getdents",
    "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32",
    "getitimer", "getpeername", "getpgid", "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid",
    "getresgid32", "getresuid", "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid", "getsockname",
    "getsockopt", "get_thread_area", "gettid", "gettimeofday", "getuid", "getuid32", "getxattr", "getxattrat",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy",
    "io_getevents", "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup", "io_submit",
    "ipc", "kill", "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lchown32",
    "lgetxattr", "link", "linkat", "listen", "listmount", "listxattr", "listxattrat", "llistxattr", "_llseek",
    "lremovexattr", "lseek", "lsetxattr", "lsm_get_self_attr", "lsm_list_modules", "lsm_set_self_attr", "lstat",
    "lstat64", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir", "mkdirat", "mknod",
    "mknodat", "mlock", "mlock2", "mlockall", "map_shadow_stack", "mmap", "mmap2", "mprotect", "mq_getsetattr",
    "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64",
    "mq_unlink", "mremap", "mseal", "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall",
    "munmap", "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open", "openat", "openat2", "pause",
    "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc", "pkey_free", "pkey_mprotect", "poll", "ppoll",
    "ppoll_time64", "prctl", "pread64", "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6",
    "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv",
    "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "remap_file_pages", "removexattr", "removexattrat",
    "rename", "renameat", "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "sched_yield", "seccomp", "select", "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "send",
    "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32",
    "setgid", "setgid32", "setgroups", "setgroups32", "setitimer", "setpgid", "setpriority", "setregid",
    "setregid32", "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit",
    "set_robust_list", "setsid", "setsockopt", "set_thread_area", "set_tid_address", "setuid", "setuid32",
    "setxattr", "setxattrat", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd",
    "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair", "splice", "stat", "stat64", "statfs",
    "statfs64", "statmount", "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs", "sysinfo", "tee",
    "tgkill", "time", "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64",
    "timer_settime", "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64", "times", "tkill", "truncate", "truncate64", "ugetrlimit", "umask", "uname", "unlink",
    "unlinkat", "uretprobe", "utime", "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4",
    "waitid", "waitpid", "write", "writev",
)

# Address families socket(2) may create. Absent on purpose, as in containerd: AF_ALG (38, the
# kernel crypto API) and AF_VSOCK (40, host/guest sockets that are not per network namespace).
SOCKET_DOMAINS: tuple[int, ...] = (
    1,  # AF_UNIX
    2,  # AF_INET
    3,  # AF_AX25
    4,  # AF_IPX
    5,  # AF_APPLETALK
    6,  # AF_NETROM
    7,  # AF_BRIDGE
    8,  # AF_ATMPVC
    9,  # AF_X25
    10,  # AF_INET6
    11,  # AF_ROSE
    12,  # AF_DECnet
    13,  # AF_NETBEUI
    14,  # AF_SECURITY
    15,  # AF_KEY
    16,  # AF_NETLINK
    17,  # AF_PACKET
    18,  # AF_ASH
    19,  # AF_ECONET
    20,  # AF_ATMSVC
    21,  # AF_RDS
    22,  # AF_SNA
    23,  # AF_IRDA
    24,  # AF_PPPOX
    25,  # AF_WANPIPE
    26,  # AF_LLC
    27,  # AF_IB
    28,  # AF_MPLS
    29,  # AF_CAN
    30,  # AF_TIPC
    31,  # AF_BLUETOOTH
    32,  # AF_IUCV
    33,  # AF_RXRPC
    34,  # AF_ISDN
    35,  # AF_PHONET
    36,  # AF_IEEE802154
    37,  # AF_CAIF
    39,  # AF_NFC
    41,  # AF_KCM
    42,  # AF_QIPCRTR
    43,  # AF_SMC
    44,  # AF_XDP
    45,  # AF_MCTP
)

# personality(2) only for these personas: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE (and with
# UNAME26), and 0xffffffff, which only queries the current one.
PERSONALITIES: tuple[int, ...] = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

# Allowed from kernel 4.8 on, where seccomp is checked again after a ptrace stop.
PTRACE_SINCE_4_8: tuple[str, ...] = ("process_vm_readv", "process_vm_writev", "ptrace")

# Per machine (platform.machine()): the seccomp architectures and the machine's own syscalls.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"),
    "s390x": ("SCMP_ARCH_S390", "SCMP_ARCH_S390X"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}
ARCH_SYSCALLS: dict[str, tuple[str, ...]] = {
    "x86_64": ("arch_prctl", "modify_ldt"),
    "i686": ("modify_ldt",),
    "aarch64": ("arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"),
    "s390x": ("s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"),
    "riscv64": ("riscv_flush_icache", "riscv_hwprobe"),
    "ppc64le": ("sync_file_range2", "swapcontext"),
}
# The machine's own seccomp architecture, as a Docker profile's archMap names it.
NATIVE_ARCH = {
    "x86_64": "SCMP_ARCH_X86_64",
    "aarch64": "SCMP_ARCH_AARCH64",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
}
# Go's names for the machines, as Docker profiles' includes/excludes "arches" spell them.
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386"}

# Allowed only to a process whose bounding set holds the capability.
BY_CAPABILITY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CAP_DAC_READ_SEARCH", ("open_by_handle_at",)),
    (
        "CAP_SYS_ADMIN",
        (
            "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick", "lookup_dcookie",
            "mount", "mount_setattr", "move_mount", "open_tree", "perf_event_open", "quotactl", "quotactl_fd",
            "setdomainname", "sethostname", "setns", "syslog", "umount", "umount2", "unshare",
        ),
    ),
    ("CAP_SYS_BOOT", ("reboot",)),
    ("CAP_SYS_CHROOT", ("chroot",)),
    ("CAP_SYS_MODULE", ("delete_module", "init_module", "finit_module")),
    ("CAP_SYS_PACCT", ("acct",)),
    ("CAP_SYS_PTRACE", ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace")),
    ("CAP_SYS_RAWIO", ("iopl", "ioperm")),
    ("CAP_SYS_TIME", ("settimeofday", "stime", "clock_settime", "clock_settime64")),
    ("CAP_SYS_TTY_CONFIG", ("vhangup",)),
    ("CAP_SYS_NICE", ("get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node")),
    ("CAP_SYSLOG", ("syslog",)),
    ("CAP_BPF", ("bpf",)),
    ("CAP_PERFMON", ("perf_event_open",)),
)

# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: without CAP_SYS_ADMIN,
# clone is allowed only with none of these set.
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000


def runtime_default(capabilities: Iterable[str], machine: str | None = None, kernel: str | None = None) -> dict:
    """The RuntimeDefault linux.seccomp for a process whose bounding set is `capabilities`."""
    held = set(capabilities)
    machine = machine or platform.machine()
    rules: list[dict] = [_allow(ALLOWED)]
    rules += _socket_rules(SOCKET_DOMAINS)
    rules += [_allow(["personality"], [_arg(0, persona, "SCMP_CMP_EQ")]) for persona in PERSONALITIES]
    if _kernel_at_least(kernel or os.uname().release, (4, 8)):
        rules.append(_allow(PTRACE_SINCE_4_8))
    if machine in ARCH_SYSCALLS:
        rules.append(_allow(ARCH_SYSCALLS[machine]))
    rules += [_allow(names) for cap, names in BY_CAPABILITY if cap in held]
    if "CAP_SYS_ADMIN" not in held:
        # s390's clone takes the flags as its second argument.
        index = 1 if machine.startswith("s390") else 0
        rules.append(_allow(["clone"], [{**_arg(index, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ"), "valueTwo": 0}]))
        # clone3's flags live in memory seccomp cannot read: ENOSYS (not EPERM) makes libcs fall back to clone.
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCHITECTURES.get(machine, ())),
        "syscalls": rules,
    }


def _allow(names: Iterable[str], args: list[dict] | None = None) -> dict:
    rule: dict = {"names": list(names), "action": "SCMP_ACT_ALLOW"}
    if args:
        rule["args"] = args
    return rule


def _arg(index: int, value: int, op: str) -> dict:
    return {"index": index, "value": value, "op": op}


def _socket_rules(domains: Iterable[int]) -> list[dict]:
    """One rule per allowed domain, except a leading run from AF_UNIX, which is one `domain < N`.

    runc turns several comparisons of one argument into separate (OR-ed) rules, so a range cannot
    be bounded on both sides in one rule; starting at AF_UNIX it needs no lower bound (AF_UNSPEC
    cannot be created).
    """
    ordered = sorted(set(domains))
    rules = []
    if len(ordered) > 1 and ordered[0] == 1 and ordered[1] == 2:
        end = 1
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        rules.append(_allow(["socket"], [_arg(0, ordered[end] + 1, "SCMP_CMP_LT")]))
        ordered = ordered[end + 1 :]
    rules += [_allow(["socket"], [_arg(0, domain, "SCMP_CMP_EQ")]) for domain in ordered]
    return rules


def _kernel_at_least(release: str, wanted: tuple[int, int]) -> bool:
    found = re.match(r"(\d+)\.(\d+)", release)
    return found is not None and (int(found[1]), int(found[2])) >= wanted


# --------------------------------------------------------------------------- Localhost profiles


def load_profile(path: str, capabilities: Iterable[str], container: str = "") -> dict:
    """A Localhost profile (Docker/OCI JSON) made into an OCI linux.seccomp for this host and caps."""
    where = f"container {container!r}: seccomp profile {path!r}"
    if not path.startswith("/"):
        raise InvalidArgument(f"{where} must be an absolute path")
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"{where} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{where} cannot be read: {exc}") from None
    if not isinstance(raw, dict) or "defaultAction" not in raw:
        raise InvalidArgument(f"{where} has no defaultAction")
    return oci_profile(raw, set(capabilities))


def oci_profile(raw: dict, held: set[str], machine: str | None = None) -> dict:
    """A Docker-style profile (archMap, includes/excludes) resolved for `machine` and capabilities `held`."""
    out = {
        key: raw[key]
        for key in ("defaultAction", "defaultErrnoRet", "flags", "listenerPath", "listenerMetadata")
        if key in raw
    }
    machine = machine or platform.machine()
    if raw.get("architectures"):
        out["architectures"] = raw["architectures"]
    else:
        native = NATIVE_ARCH.get(machine)
        found = next((m for m in raw.get("archMap") or [] if m.get("architecture") == native), None)
        if found:
            out["architectures"] = [found["architecture"], *found.get("subArchitectures", [])]
    rules = []
    for rule in raw.get("syscalls") or []:
        if not _rule_applies(rule, held, GO_ARCH.get(machine, machine)):
            continue
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        entry = {"names": names, "action": rule["action"]}
        for key in ("errnoRet", "args"):
            if rule.get(key) is not None:
                entry[key] = rule[key]
        rules.append(entry)
    out["syscalls"] = rules
    return out


def _rule_applies(rule: dict, held: set[str], arch: str) -> bool:
    """Docker profiles' includes/excludes: every included capability held, no excluded one."""
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if any(cap not in held for cap in includes.get("caps") or []):
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if any(cap in held for cap in excludes.get("caps") or []):
        return False
    return arch not in (excludes.get("arches") or [])

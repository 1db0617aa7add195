"""What a runtime handler can do, as the CRI Status advertises it (RuntimeHandlerFeatures).

Recursive read-only mounts need both the kernel (mount_setattr(2) with AT_RECURSIVE, Linux >= 5.12)
and the OCI runtime (`rro` among the mount options of `runc features`, runc >= 1.1). The probe runs
once per runtime binary (again only if the binary changes), so Status and CreateContainer stay cheap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field

from pycrio.oci.runtime import Runtime

log = logging.getLogger("pycrio.oci")

RRO_KERNEL = (5, 12)
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class HandlerFeatures:
    """One handler's features; `reason` says why recursive read-only mounts are off."""

    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False  # idmapped mounts and pod user namespaces are not implemented
    mount_options: frozenset[str] = field(default_factory=frozenset)
    reason: str = ""


_lock = threading.Lock()
_cache: dict[tuple[str, int], HandlerFeatures] = {}


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel (or of a `uname -r` string)."""
    match = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def of_runtime(runtime: Runtime | None) -> HandlerFeatures:
    """The features of a handler's runtime; runtimes that are not OCI CLIs get none."""
    path = getattr(runtime, "runtime_path", None)
    return probe(path) if isinstance(path, str) and path else HandlerFeatures(reason="not an OCI runtime CLI")


def probe(runtime_path: str, kernel: tuple[int, int] | None = None) -> HandlerFeatures:
    """`<runtime> features` read once per binary version, combined with the kernel's abilities."""
    try:
        key = (runtime_path, os.stat(runtime_path).st_mtime_ns)
    except OSError as exc:
        return HandlerFeatures(reason=f"{runtime_path}: {exc.strerror}")
    with _lock:
        cached = _cache.get(key)
    if cached is not None and kernel is None:
        return cached
    found = _probe(runtime_path, kernel or kernel_version())
    if kernel is None:
        with _lock:
            _cache[key] = found
    return found


def _probe(runtime_path: str, kernel: tuple[int, int]) -> HandlerFeatures:
    try:
        done = subprocess.run(
            [runtime_path, "features"], capture_output=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL
        )
        report = json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.info("`%s features` failed (%s): no optional features assumed", runtime_path, exc)
        report = {}
    options = frozenset(o for o in report.get("mountOptions") or [] if isinstance(o, str))
    if "rro" not in options:
        reason = f"{runtime_path} does not list the mount option rro in `features` (runc >= 1.1 does)"
    elif kernel < RRO_KERNEL:
        reason = f"kernel {kernel[0]}.{kernel[1]} has no recursive mount_setattr (needs >= 5.12)"
    else:
        reason = ""
    return HandlerFeatures(recursive_read_only_mounts=not reason, mount_options=options, reason=reason)

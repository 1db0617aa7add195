"""What a test opened and did not close: this process's fds, compared by what they point at."""

from __future__ import annotations

import gc
import os


def fd_targets() -> dict[int, str]:
    """This process's open fds and what each points at, after a collection: garbage an earlier
    test left (a channel, a loop) closes its fds when collected, which must not look like this
    test's doing."""
    gc.collect()
    targets: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the fd listdir itself used, or one closed meanwhile
            pass
    return targets


def leaked_fds(before: dict[int, str]) -> dict[int, str]:
    """Fds open now that were not open before. Compared as (fd, target) so that an fd something
    else closed meanwhile (a collected channel) is not a failure, yet a leak that reuses its
    number still is."""
    return {fd: target for fd, target in fd_targets().items() if before.get(fd) != target}

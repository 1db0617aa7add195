"""The monitor's one reaper: SIGCHLD -> a waitpid(-1, WNOHANG) loop -> the waiter of each pid.

The monitor is a child subreaper: a container's init (orphaned when `runc create` exits) and any
process orphaned inside an exec become its children, so something must reap every child, known
or not. One loop on the event loop does (no thread per child, unlike asyncio's default watcher).

Because waitpid(-1) reaps every child, asyncio's own child watcher could no longer see the
processes it starts; so the reaper also is asyncio's child watcher (`asyncio.set_child_watcher`),
and `asyncio.create_subprocess_exec` works in the monitor as anywhere. Blocking `subprocess.run`
in a thread would race with it (and Python reports a stolen child as exit 0): the monitor runs
its commands through asyncio only.

A status nobody waits for yet is kept a while (a container's init can die between `runc create`
exiting and its waiter being set up), bounded in number and age so orphans do not pile up.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from collections import OrderedDict
from typing import Any, Callable

log = logging.getLogger("pycrio.monitor")

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_KEEP_UNCLAIMED = 1024  # statuses of pids nobody waits for (yet)
_UNCLAIMED_TTL = 60.0  # s; an older unclaimed status belongs to a pid long gone (or reused)
_LOST_STATUS = 255  # a child someone else reaped: its status is unknown (asyncio says the same)

WatcherCallback = Callable[..., Any]


def exit_code(status: int) -> int:
    """A wait status as the monitor reports exits: the exit code, or 128 + n for signal n."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def set_subreaper(enabled: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER); returns the previous setting."""
    libc = ctypes.CDLL(None, use_errno=True)
    previous = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")
    return bool(previous.value)


class ChildReaper:
    """Reaps every child of the process on SIGCHLD and hands each status to its waiter."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._callbacks: dict[int, tuple[WatcherCallback, tuple[Any, ...]]] = {}  # asyncio's
        self._unclaimed: OrderedDict[int, tuple[int, float]] = OrderedDict()  # pid -> (status, when)
        self._closed = False
        self._was_subreaper = set_subreaper(True)
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._watcher = _ReaperWatcher(self)
        asyncio.set_child_watcher(self._watcher)
        self.reap()  # children that exited before the handler was there

    def wait(self, pid: int) -> asyncio.Future[int]:
        """The exit code of child `pid` (128 + n for signal n), also when it was reaped already.
        A pid that is not our child fails with ChildProcessError."""
        if pid <= 0:
            raise ValueError(f"not a process id: {pid}")  # waitpid would take it for a group
        future: asyncio.Future[int] = self._loop.create_future()
        kept = self._unclaimed.pop(pid, None)
        if kept is not None:
            future.set_result(exit_code(kept[0]))
            return future
        self._waiters.setdefault(pid, []).append(future)
        self._check(pid)
        return future

    def reap(self) -> None:
        """Collect every exited child (the SIGCHLD handler; safe to call at any time)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            self._deliver(pid, status)
        # A waited-for pid somebody else reaped (Popen.poll() of a closed transport) or that never
        # was our child must not leave its waiter hanging.
        for pid in [*self._waiters, *self._callbacks]:
            self._check(pid)

    def close(self) -> None:
        """Stop reaping: remove the handler and the watcher, fail the waiters still pending."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGCHLD)
        if asyncio.get_event_loop_policy().get_child_watcher() is self._watcher:
            asyncio.set_child_watcher(None)
        set_subreaper(self._was_subreaper)
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ChildProcessError("the child reaper was closed"))
        self._waiters.clear()
        self._callbacks.clear()

    # -- asyncio's child watcher side --------------------------------------------------------

    def _add_callback(self, pid: int, callback: WatcherCallback, args: tuple[Any, ...]) -> None:
        # asyncio calls this right after forking pid, with no loop turn in between: a status kept
        # for that pid belongs to an earlier process that had the same number
        self._unclaimed.pop(pid, None)
        self._callbacks[pid] = (callback, args)
        self._check(pid)

    def _remove_callback(self, pid: int) -> bool:
        return self._callbacks.pop(pid, None) is not None

    # -- internals ---------------------------------------------------------------------------

    def _check(self, pid: int) -> None:
        """Reap `pid` if it exited; settle its waiters if it is not (or no longer) our child."""
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            log.warning("process %d is not a child of the monitor (reaped elsewhere): its exit status is lost", pid)
            self._deliver(pid, None)
            return
        if reaped:
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int | None) -> None:
        futures = self._waiters.pop(pid, [])
        callback = self._callbacks.pop(pid, None)
        for future in futures:
            if future.done():
                continue
            if status is None:
                future.set_exception(ChildProcessError(f"process {pid} is not a child of the monitor"))
            else:
                future.set_result(exit_code(status))
        if callback is not None:
            function, args = callback
            # asyncio's convention: -n for signal n
            returncode = _LOST_STATUS if status is None else os.waitstatus_to_exitcode(status)
            try:
                function(pid, returncode, *args)
            except Exception as exc:  # noqa: BLE001 - one bad callback must not stop the reaping
                log.warning("child watcher callback for %d failed: %r", pid, exc)
        if futures or callback is not None or status is None:
            return
        now = time.monotonic()
        self._unclaimed[pid] = (status, now)
        self._unclaimed.move_to_end(pid)
        while self._unclaimed:
            oldest, (_, when) = next(iter(self._unclaimed.items()))
            if len(self._unclaimed) <= _KEEP_UNCLAIMED and now - when <= _UNCLAIMED_TTL:
                break
            del self._unclaimed[oldest]


class _ReaperWatcher(asyncio.AbstractChildWatcher):
    """asyncio's child watcher interface on top of the ChildReaper."""

    def __init__(self, reaper: ChildReaper) -> None:
        self._reaper = reaper

    def add_child_handler(self, pid: int, callback: WatcherCallback, *args: Any) -> None:
        self._reaper._add_callback(pid, callback, args)

    def remove_child_handler(self, pid: int) -> bool:
        return self._reaper._remove_callback(pid)

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass  # bound to the reaper's loop

    def close(self) -> None:
        pass  # the reaper's owner closes it

    def is_active(self) -> bool:
        return not self._reaper._closed

    def __enter__(self) -> "_ReaperWatcher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

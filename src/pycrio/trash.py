"""Trees removed in the background: renamed out of the way at once, deleted by one thread.

RemoveContainer must not wait for a writable layer of thousands of files to be unlinked: the tree
is renamed into a trash directory on the same file system (atomic: the name is free at once) and
a daemon thread deletes it. Whatever a stop or a crash leaves in the trash is deleted at the next
start (`empty`). Nothing mounted may be discarded: callers unmount first.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path

log = logging.getLogger("pycrio.trash")


class Trash:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def discard(self, path: Path) -> None:
        """Make `path` disappear now and its contents later; a missing path is fine. Falls back
        to deleting in place when it cannot be renamed (another file system, say)."""
        if not os.path.lexists(path):
            return
        target = self.directory / uuid.uuid4().hex
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        except OSError as exc:
            log.debug("cannot move %s to the trash (%s): deleting it in place", path, exc)
            _delete(path)
            return
        self._enqueue(target)

    def empty(self) -> None:
        """Delete (in the background) whatever earlier runs left in the trash."""
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                self._enqueue(entry)

    def wait_empty(self, timeout: float = 30.0) -> bool:
        """Wait until every discarded tree is deleted (tests, orderly shutdown)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def _enqueue(self, path: Path) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"trash-{self.directory.name}", daemon=True)
                self._thread.start()
        self._queue.put(path)

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            try:
                _delete(path)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()


def _delete(path: Path) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # left for the next start's empty()
        log.warning("cannot delete %s: %s", path, exc)

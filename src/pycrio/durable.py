"""Durable small files: records that survive a crash or a power cut whole or not at all.

`write_atomic` writes a temporary file in the same directory, fsyncs it, renames it over the
target and fsyncs the directory, so after a crash the target holds either the old or the new
content, and a completed write is on disk. `quarantine` moves a record that cannot be read aside
(`<name>.corrupt`) so start-up goes on without it and an operator can still look at it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TMP_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path` unique to this thread, never matching a record glob (`*.json`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably (temp file, fsync, rename, fsync dir)."""
    payload = data.encode() if isinstance(data, str) else data
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete `path` durably; a missing file is fine."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def quarantine(path: Path, problem: str, log: logging.Logger, what: str = "record") -> Path:
    """Move an unreadable record to `<name>.corrupt` (replacing an older one) and say so, naming the file."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    try:
        os.replace(path, target)
        fsync_dir(path.parent)
    except OSError as exc:
        log.warning("skipping unreadable %s %s (%s); could not move it aside: %s", what, path, problem, exc.strerror)
        return path
    log.warning("skipping unreadable %s %s (%s): moved aside to %s", what, path, problem, target.name)
    return target


def remove_temporaries(directory: Path) -> None:
    """Delete the temp files of writes a crash interrupted (they never became records)."""
    for tmp in directory.glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def sync_filesystem(path: Path) -> None:
    """syncfs(2) the file system holding `path`: everything written there so far is on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs {path}: {os.strerror(code)}")
    finally:
        os.close(fd)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "dict": dict,
}


def decode_record(cls: type[T], data: bytes) -> T:
    """A dataclass from a record's JSON; ValueError says what is wrong (empty, truncated, not
    JSON, not an object, a missing or unknown field, a field of the wrong type)."""
    if not data.strip():
        raise ValueError("empty file")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    missing = sorted(
        n for n, f in fields.items()
        if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for name, value in raw.items():
        expected = _TYPES.get(str(fields[name].type).split("[", 1)[0].split(" |", 1)[0].strip())
        if expected is not None and not isinstance(value, expected):
            raise ValueError(f"field {name!r} is {type(value).__name__}, not {fields[name].type}")
    return cls(**raw)

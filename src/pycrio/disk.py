"""Disk usage of a directory tree, as `du` counts it (allocated blocks, every inode)."""

from __future__ import annotations

import os
from pathlib import Path


def disk_usage(path: Path, include_root: bool = True) -> tuple[int, int]:
    """(bytes, inodes) a tree really takes; entries removed while walking are skipped."""
    used = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
            inodes += 1
    if include_root:
        try:
            used += os.lstat(path).st_blocks * 512
            inodes += 1
        except FileNotFoundError:
            pass
    return used, inodes

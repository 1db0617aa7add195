"""Did the node reboot since the records were written?

Records live under `root` (persistent); namespaces, bundles, conmon and runc state live under
`runroot` (a tmpfs on a real node). Like CRI-O's version file, a marker `boot-id` is written to
runroot at every start-up, holding the kernel's boot id; its twin in root's state directory says
which boot the records were last served in. At the next start:

- runroot's marker holds this boot's id: same boot, runroot intact, the runtime state is good;
- runroot's marker holds another id: runroot is on disk and the node rebooted;
- runroot has no marker: a fresh runroot (a reboot emptied the tmpfs, or someone wiped it). If
  the records were served in another boot, or in this boot with the marker that is now gone, the
  runtime state they point at is lost. Records older than the markers count as lost only if
  none of their runroot directories is there any more (an upgrade must not stop live pods).

Process identity (is a stored pid still that process?) is pycrio.procfs's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pycrio import durable

log = logging.getLogger("pycrio.state")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
MARKER = "boot-id"


def current_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:  # no procfs: no reboot detection by id, the runroot marker still works
        return "unknown"


def read_marker(directory: Path) -> str | None:
    try:
        text = (directory / MARKER).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", directory / MARKER, exc.strerror)
        return None
    return text or None


def write_marker(directory: Path, boot_id: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(directory / MARKER, boot_id + "\n")


@dataclass(frozen=True)
class BootCheck:
    """What start-up found: this boot's id, and whether the records' runtime state is gone (why)."""

    boot_id: str
    lost: bool
    reason: str = ""


def check_boot(state_dir: Path, runroot: Path, has_records: bool, runroot_paths: list[Path]) -> BootCheck:
    """Compare the markers of root (`state_dir`) and `runroot` with this boot (see the module doc)."""
    boot_id = current_boot_id()
    in_runroot = read_marker(runroot)
    in_root = read_marker(state_dir)
    if in_runroot == boot_id:
        return BootCheck(boot_id, False)
    if in_runroot is not None:
        return BootCheck(boot_id, True, f"the node rebooted (runroot {runroot} is from boot {in_runroot}, this is {boot_id})")
    if not has_records:
        return BootCheck(boot_id, False)
    if in_root is not None and in_root != boot_id:
        return BootCheck(boot_id, True, f"the node rebooted (records from boot {in_root}, this is {boot_id})")
    if in_root is not None:
        return BootCheck(boot_id, True, f"runroot {runroot} was emptied since the last start: the runtime state is gone")
    if any(p.exists() for p in runroot_paths):  # records of a pycrio without markers, runroot intact
        return BootCheck(boot_id, False)
    return BootCheck(boot_id, True, f"none of the records' runtime directories is left in {runroot}")


def record_boot(state_dir: Path, runroot: Path, boot_id: str) -> None:
    """After recovery: the records now belong to this boot, and runroot is this boot's."""
    write_marker(state_dir, boot_id)
    write_marker(runroot, boot_id)

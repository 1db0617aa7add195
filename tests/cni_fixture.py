"""The CNI network a test's daemon uses: a bridge and subnet of its own (so tests never share
one with each other or with the host's default `pycrio` network), written as a conflist."""

from __future__ import annotations

import json
from pathlib import Path


def bridge_network(
    directory: Path,
    name: str,
    bridge: str,
    subnet: str,
    *,
    portmap: str | None = None,
    hairpin: bool = False,
    ipam_dir: Path | None = None,
    filename: str | None = None,
) -> Path:
    """Write `directory/<filename>` (default `10-<name>.conflist`) for a bridge + host-local
    network, with a `portmap` plugin of that type when given; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ipam: dict[str, object] = {"type": "host-local"}
    if ipam_dir is not None:
        ipam["dataDir"] = str(ipam_dir)  # allocations where the test can see them
    ipam.update({"ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]})
    plugin: dict[str, object] = {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True}
    if hairpin:
        plugin["hairpinMode"] = True
    plugin["ipam"] = ipam
    plugins = [plugin]
    if portmap is not None:
        plugins.append({"type": portmap, "capabilities": {"portMappings": True}})
    conf = {"cniVersion": "1.0.0", "name": name, "plugins": plugins}
    (directory / (filename or f"10-{name}.conflist")).write_text(json.dumps(conf))
    return directory

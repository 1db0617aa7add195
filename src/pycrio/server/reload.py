"""Live reload (SIGHUP): re-read the configuration files and apply what can change while serving.

What applies at once: `log_level`, the whole `[pycrio.tracing]` table (enable, endpoint,
rates, overrides, error keeping), and where images come from: the registries.conf files (read
again on every reload), `[pycrio.image]` `registries_conf`, `registries_conf_dir`,
`unqualified_search_registries` and `insecure_registries`, for pulls that start afterwards.
Anything else that changed is named in a warning and takes effect at the next restart. Flags and PYCRIO_* variables given at start-up still win over the
files, as they did then. A configuration that does not load is rejected with its one-line
error, and the running one stays in force.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

from pycrio.config import Config, ConfigError, LoadedConfig, TracingConfig
from pycrio.config.schema import ROOT_TABLE
from pycrio.log import set_level
from pycrio.tracing import Tracing

if TYPE_CHECKING:
    from pycrio.images import ImageManager

log = logging.getLogger("pycrio.server")

# Top-level fields of Config applied on reload.
LIVE_KEYS = ("log_level", "tracing")
# Keys of [pycrio.image] applied on reload (below [pycrio]).
LIVE_IMAGE_KEYS = (
    "image.unqualified_search_registries",
    "image.insecure_registries",
    "image.registries_conf",
    "image.registries_conf_dir",
)


def changed_keys(old: Any, new: Any, prefix: str = ROOT_TABLE) -> list[str]:
    """Dotted keys whose values differ between two configuration (sub)tables."""
    if not (dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new)):
        return [prefix] if old != new else []
    keys: list[str] = []
    for f in dataclasses.fields(old):
        keys += changed_keys(getattr(old, f.name), getattr(new, f.name), f"{prefix}.{f.name}")
    return keys


class Reloader:
    """Applies a freshly loaded configuration to the running daemon; one reload at a time."""

    def __init__(
        self,
        config: Config,
        tracing: Tracing,
        load: Callable[[], LoadedConfig],
        images: ImageManager | None = None,
        on_tracing: Callable[[TracingConfig], None] | None = None,
    ) -> None:
        self.config = config  # the daemon's, updated in place so Status(verbose) shows the live values
        self.tracing = tracing
        self.load = load
        self.images = images
        self.on_tracing = on_tracing  # processes with tracing of their own (pod monitors) follow it
        self.live_keys = LIVE_KEYS + (LIVE_IMAGE_KEYS if images is not None else ())

    def reload(self) -> bool:
        """Re-read and apply; False when the new configuration was rejected."""
        try:
            loaded = self.load()
        except ConfigError as exc:
            log.error("configuration reload rejected, the running configuration stays in force: %s", exc)
            return False
        new = loaded.config
        for warning in loaded.warnings:
            log.warning(warning)
        changed = changed_keys(self.config, new)
        live = [k for k in changed if self._is_live(k)]
        later = [k for k in changed if k not in live]
        if new.tracing != self.config.tracing:
            try:
                self.tracing.apply(new.tracing)
            except Exception as exc:  # noqa: BLE001 - a reload must not take the daemon down
                log.error("configuration reload rejected, tracing stays as it was: %s: %s", type(exc).__name__, exc)
                return False
            self.config.tracing = new.tracing
            if self.on_tracing is not None:
                self.on_tracing(new.tracing)
        if new.log_level != self.config.log_level:
            set_level(new.log_level)
            self.config.log_level = new.log_level
        if self.images is not None:
            self.images.apply(new.image)  # the daemon's config.image, in place
            if loaded.registries is not None and loaded.registries != self.images.puller.registries:
                self.images.set_registries(loaded.registries)
                live.append("registries.conf")
        pinned = [o for o in loaded.overrides if self._is_live(f"{ROOT_TABLE}.{o.key}")]
        if pinned:
            log.info(
                "configuration reload: set at start-up and still winning over the files: %s",
                ", ".join(f"{ROOT_TABLE}.{o.key} ({o.source})" for o in pinned),
            )
        if later:
            log.warning("configuration reload: %s changed; applied at the next restart", ", ".join(later))
        files = ", ".join(map(str, loaded.files)) or "built-in defaults"
        log.info("configuration reloaded from %s: %s", files, ", ".join(live) + " applied" if live else "no live change")
        return True

    def _is_live(self, key: str) -> bool:
        """Whether a dotted key (`pycrio.tracing.enable_tracing`) is applied on reload."""
        below = key.removeprefix(f"{ROOT_TABLE}.")
        return any(below == k or below.startswith(f"{k}.") for k in self.live_keys)

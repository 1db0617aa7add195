"""Runtime handlers by name, built once from `[pycrio.runtime]`; the CRI picks one per pod."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pycrio.config import Config, TracingConfig
from pycrio.errors import FailedPrecondition, InvalidArgument
from pycrio.oci.runtime import ExitCallback, Runtime
from pycrio.oci.runtime_oci import OCIRuntime
from pycrio.oci.runtime_pod import PodRuntime

log = logging.getLogger("pycrio.runtime")


class RuntimeHandlers:
    """The configured handlers; "" means the default one."""

    def __init__(self, config: Config) -> None:
        self.default = config.runtime.default_runtime
        self._handlers: dict[str, Runtime] = {}
        self._types: dict[str, str] = {}
        for name, handler in config.runtime.runtimes.items():
            root = Path(handler.runtime_root or Path(config.runroot) / "runtimes" / name)
            self._types[name] = handler.runtime_type
            if handler.runtime_type == "oci":
                path = handler.runtime_path or name
                self._handlers[name] = OCIRuntime(
                    name, shutil.which(path) or path, root, conmon_path=config.runtime.conmon
                )
            elif handler.runtime_type == "pod":
                path = handler.runtime_path or name
                self._handlers[name] = PodRuntime(
                    name, shutil.which(path) or path, root, pods_dir=Path(config.runroot) / "pods", config=config
                )

    def get(self, name: str) -> Runtime:
        """The runtime for a CRI `runtime_handler`; unknown or unusable ones are clear errors."""
        key = name or self.default
        if key not in self._types:
            known = ", ".join(sorted(self._types))
            raise InvalidArgument(f"runtime handler {key!r} is not configured (configured: {known})")
        runtime = self._handlers.get(key)
        if runtime is None:
            raise FailedPrecondition(f"runtime handler {key!r} has type {self._types[key]!r}, not supported yet")
        ok, why = runtime.available()
        if not ok:
            raise FailedPrecondition(f"runtime handler {key!r} cannot run here: {why}")
        return runtime

    def for_pod(self, name: str, pod_id: str) -> Runtime:
        """The runtime instance that runs the containers of pod `pod_id` (handler `name`)."""
        return self.get(name).for_sandbox(pod_id)

    def report_exits(self, callback: ExitCallback | None) -> None:
        """Have every handler report container exits to `callback` (None: stop)."""
        for runtime in self._handlers.values():
            runtime.report_exits(callback)

    def _pod_runtimes(self) -> list[PodRuntime]:
        """The handlers that run processes of their own which trace (the "pod" type's monitors)."""
        return [runtime for runtime in self._handlers.values() if isinstance(runtime, PodRuntime)]

    def has_monitors(self) -> bool:
        return bool(self._pod_runtimes())

    def use_span_relay(self, path: Path) -> None:
        """Have monitors started from now on (and reconfigured ones) send their spans to `path`."""
        for runtime in self._pod_runtimes():
            runtime.span_relay = path

    def configure_tracing(self, tracing: TracingConfig) -> None:
        """Pass new tracing settings on to runtimes that run processes of their own (pod monitors)."""
        for runtime in self._pod_runtimes():
            runtime.configure_tracing(tracing)

    def close(self) -> None:
        """At daemon shutdown: each handler releases what it shares among its pods."""
        for name, runtime in self._handlers.items():
            try:
                runtime.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: note it and go on
                log.warning("closing runtime handler %s: %s", name, exc)

    def names(self) -> list[str]:
        """Handlers that can run here (usable runtimes only)."""
        return [n for n, r in self._handlers.items() if r.available()[0]]

    def name_of(self, name: str) -> str:
        return name or self.default

    def report(self) -> dict[str, dict[str, object]]:
        """Each handler's usability, for Status(verbose)."""
        result: dict[str, dict[str, object]] = {}
        for name, kind in self._types.items():
            runtime = self._handlers.get(name)
            ok, why = runtime.available() if runtime else (False, f"runtime_type {kind!r} not supported yet")
            result[name] = {"runtime_type": kind, "available": ok, "reason": why}
        return result

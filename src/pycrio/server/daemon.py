"""What every CRI handler works with: configuration, state, images, runtimes, network."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pycrio.config import Config
from pycrio.images import ImageManager
from pycrio.network.cni import CNIManager
from pycrio.pods.containers import ContainerManager
from pycrio.pods.events import EventBus
from pycrio.pods.runtimes import RuntimeHandlers
from pycrio.pods.sandboxes import SandboxManager
from pycrio.pods.streams import StreamManager
from pycrio.state import StateStore
from pycrio.tracing import Tracing
from pycrio.tracing.relay import RELAY_ENV, RELAY_SOCKET_NAME, SpanRelay

if TYPE_CHECKING:
    from pycrio.metrics import CRIMetrics


@dataclass
class Daemon:
    """The lower layers, built once at start-up and handed to each handler."""

    config: Config
    state: StateStore
    images: ImageManager
    handlers: RuntimeHandlers
    cni: CNIManager
    containers: ContainerManager
    sandboxes: SandboxManager
    events: EventBus
    streams: StreamManager
    tracing: Tracing | None = None
    metrics: "CRIMetrics | None" = None
    span_relay: SpanRelay | None = None  # where "pod" runtime monitors send their spans
    started_at: float = field(default_factory=time.time)

    @classmethod
    def create(cls, config: Config, tracing: Tracing | None = None, metrics: "CRIMetrics | None" = None) -> "Daemon":
        images = ImageManager(config)
        images.open()
        runroot = Path(config.runroot)
        runroot.mkdir(parents=True, exist_ok=True)
        state = StateStore(Path(config.root) / "state", runroot=runroot)  # marks what a reboot took
        state.open()
        images.use_containers(state.images_in_use)
        handlers = RuntimeHandlers(config)
        cni = CNIManager(
            Path(config.network.network_dir), [Path(p) for p in config.network.plugin_dirs], runroot / "cni"
        )
        events = EventBus()
        containers = ContainerManager(config, state, handlers, images, events)
        sandboxes = SandboxManager(config, state, handlers, cni, containers)
        streams = StreamManager(config, state, containers, handlers)
        span_relay = None
        if tracing is not None and handlers.has_monitors() and os.environ.get(RELAY_ENV) != "off":
            span_relay = SpanRelay(runroot / RELAY_SOCKET_NAME, tracing.relay)
            span_relay.start()
            handlers.use_span_relay(span_relay.path)
        return cls(
            config=config,
            state=state,
            images=images,
            handlers=handlers,
            cni=cni,
            containers=containers,
            sandboxes=sandboxes,
            events=events,
            streams=streams,
            tracing=tracing,
            metrics=metrics,
            span_relay=span_relay,
        )

    def reconcile(self) -> None:
        """Clean up what a crashed run left half-made (before any CRI call is served)."""
        self.sandboxes.reconcile()
        self.containers.reconcile()

    def start_background(self) -> None:
        """Work beside the CRI calls: noticing container exits."""
        self.containers.watch_exits()

    def close(self) -> None:
        self.streams.stop()
        self.containers.stop_watching()
        self.handlers.close()
        if self.span_relay is not None:
            self.span_relay.close()  # before tracing's flush: what monitors sent goes out with it
        self.images.close()

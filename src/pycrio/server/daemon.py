"""What every CRI handler works with: configuration, pod/container state, images."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pycrio.config import Config
from pycrio.images import ImageManager
from pycrio.state import StateStore


@dataclass
class Daemon:
    """The lower layers, built once at start-up and handed to each handler."""

    config: Config
    state: StateStore
    images: ImageManager
    tracing_active: bool = False
    started_at: float = field(default_factory=time.time)

    @classmethod
    def create(cls, config: Config, tracing_active: bool = False) -> "Daemon":
        images = ImageManager(config)
        images.open()
        Path(config.runroot).mkdir(parents=True, exist_ok=True)
        state = StateStore(Path(config.root) / "state")
        state.open()
        return cls(config=config, state=state, images=images, tracing_active=tracing_active)

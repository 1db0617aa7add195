"""Shared fixtures: a real OTLP receiver and real pycrio daemons on temp sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.harness import PycrioDaemon
from tests.otlp_receiver import OTLPReceiver
from tests.run_lock import acquire_run_lock
from tests.registry_fixture import auth_registry, image_builder, registry, token_registry  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    """As root (pod tests on: host-wide bridges and subnets), one test run at a time (tests/run_lock.py)."""
    if os.geteuid() == 0:
        config._pycrio_run_lock = acquire_run_lock()  # type: ignore[attr-defined]  # held until the run exits


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., PycrioDaemon]]:
    """Factory: make_daemon(args=[...], config_text=..., env=...) -> a started daemon, stopped afterwards."""
    started: list[PycrioDaemon] = []

    def factory(*, start: bool = True, name: str | None = None, **kwargs: object) -> PycrioDaemon:
        daemon = PycrioDaemon(tmp_path / (name or f"d{len(started)}"), **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon.start() if start else daemon

    yield factory
    for daemon in started:
        daemon.stop()



@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung collector)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()

"""The daemon's records of pods and containers."""

from pycrio.state.records import ContainerRecord, SandboxRecord
from pycrio.state.store import StateStore

__all__ = ["ContainerRecord", "SandboxRecord", "StateStore"]

"""The daemon's record of pods and containers."""

from pycrio.state.store import StateStore

__all__ = ["StateStore"]

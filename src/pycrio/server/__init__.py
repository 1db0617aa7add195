"""The CRI server: bootstrap (socket, signals) and one module per CRI method family."""

from pycrio.server.bootstrap import StartupError, serve

__all__ = ["StartupError", "serve"]

"""pycrio: a Kubernetes CRI v1 runtime, traced end to end with OpenTelemetry."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pycrio")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"

"""Pod networking: pinned namespaces (namespaces.py) and CNI plugin invocation (cni.py)."""

from pycrio.network.cni import (
    CNIInterface,
    CNIManager,
    NetworkError,
    PodNetworkRequest,
    PodNetworkResult,
    PortMapping,
)
from pycrio.network.namespaces import is_namespace, nsenter_argv, pin_namespaces, run_in_netns, unpin_namespaces

__all__ = [
    "CNIInterface",
    "CNIManager",
    "NetworkError",
    "PodNetworkRequest",
    "PodNetworkResult",
    "PortMapping",
    "is_namespace",
    "nsenter_argv",
    "pin_namespaces",
    "run_in_netns",
    "unpin_namespaces",
]

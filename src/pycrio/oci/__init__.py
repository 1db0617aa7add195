"""OCI runtimes: the interface (runtime.py) and its conmon + runc implementation (runtime_oci.py)."""

from pycrio.oci.runtime import (
    ContainerHandle,
    ExecResult,
    Runtime,
    RuntimeCommandError,
    RuntimeStatus,
)
from pycrio.oci.runtime_oci import OCIRuntime

__all__ = ["ContainerHandle", "ExecResult", "OCIRuntime", "Runtime", "RuntimeCommandError", "RuntimeStatus"]

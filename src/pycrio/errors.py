"""Errors a CRI handler raises, and the one place that turns any exception into a gRPC status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc


class _StatusCode:
    """A class's `code`: the grpc.StatusCode named `name`, looked up (importing gRPC) when read.

    pycrio-monitor raises these errors too and converts them by name (`code_name`), so it does
    not load gRPC (some MiB per pod) unless it traces."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        import grpc

        return grpc.StatusCode[self.name]


class CRIError(Exception):
    """A CRI call failed in a way the caller should see as `code` with `message`."""

    code: grpc.StatusCode = _StatusCode("UNKNOWN")  # type: ignore[assignment]

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(CRIError):
    code = _StatusCode("INVALID_ARGUMENT")  # type: ignore[assignment]


class NotFound(CRIError):
    code = _StatusCode("NOT_FOUND")  # type: ignore[assignment]


class AlreadyExists(CRIError):
    code = _StatusCode("ALREADY_EXISTS")  # type: ignore[assignment]


class FailedPrecondition(CRIError):
    code = _StatusCode("FAILED_PRECONDITION")  # type: ignore[assignment]


class Unimplemented(CRIError):
    code = _StatusCode("UNIMPLEMENTED")  # type: ignore[assignment]


class Unauthenticated(CRIError):
    code = _StatusCode("UNAUTHENTICATED")  # type: ignore[assignment]


class PermissionDenied(CRIError):
    code = _StatusCode("PERMISSION_DENIED")  # type: ignore[assignment]


class Unavailable(CRIError):
    code = _StatusCode("UNAVAILABLE")  # type: ignore[assignment]


class DataLoss(CRIError):
    """Content that does not match its digest or cannot be read: nothing of it is kept."""

    code = _StatusCode("DATA_LOSS")  # type: ignore[assignment]


def code_name(exc: CRIError) -> str:
    """The name of `exc`'s status code (NOT_FOUND...), read without importing gRPC."""
    own = exc.__dict__.get("code")  # given to the constructor: a grpc.StatusCode
    if own is not None:
        return str(own.name)
    for klass in type(exc).__mro__:
        value = klass.__dict__.get("code")
        if value is not None:  # a _StatusCode, or a grpc.StatusCode a subclass set itself
            return str(value.name)
    return "UNKNOWN"


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """The status a call that raised `exc` ends with: (code, message, whether it is our bug).

    A CRIError carries its code. A ValueError that no handler turned into one (a `..` in a cgroup
    parent, a NUL byte in a path, a malformed value deep in spec generation) is still a request
    the daemon could not accept: INVALID_ARGUMENT with its message. Anything else is INTERNAL.
    """
    import grpc

    if isinstance(exc, CRIError):
        return exc.code, exc.message, False
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__, False
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", True

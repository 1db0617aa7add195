"""Errors a CRI handler raises, and the one place that turns any exception into a gRPC status."""

from __future__ import annotations

import grpc


class CRIError(Exception):
    """A CRI call failed in a way the caller should see as `code` with `message`."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(CRIError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CRIError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CRIError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CRIError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(CRIError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(CRIError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CRIError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(CRIError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(CRIError):
    """Content that does not match its digest or cannot be read: nothing of it is kept."""

    code = grpc.StatusCode.DATA_LOSS


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """The status a call that raised `exc` ends with: (code, message, whether it is our bug).

    A CRIError carries its code. A ValueError that no handler turned into one (a `..` in a cgroup
    parent, a NUL byte in a path, a malformed value deep in spec generation) is still a request
    the daemon could not accept: INVALID_ARGUMENT with its message. Anything else is INTERNAL.
    """
    if isinstance(exc, CRIError):
        return exc.code, exc.message, False
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__, False
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", True

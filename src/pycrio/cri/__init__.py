"""CRI v1 messages and gRPC stubs, generated at build time from k8s.io/cri-api (never committed)."""

try:
    from pycrio.cri import api_pb2, api_pb2_grpc
except ImportError as exc:  # pragma: no cover - only on a tree where `make install` never ran
    raise ImportError(
        "pycrio's CRI stubs are not generated: run `make install` (or `make stubs`) in the source tree"
    ) from exc

__all__ = ["api_pb2", "api_pb2_grpc"]

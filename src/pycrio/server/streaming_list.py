"""Splitting list replies for the Stream* RPCs (KEP-5825): lists of at least one item each."""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")

# Far below gRPC's 16 MiB message limit even for verbose container records.
ITEMS_PER_MESSAGE = 500


def chunks(items: Sequence[T], size: int = ITEMS_PER_MESSAGE) -> Iterator[Sequence[T]]:
    """Consecutive non-empty slices; nothing at all for an empty list (the stream just ends)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

"""Write-back buffer of partially written stripes, so that small writes become full stripes."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PendingStripe:
    """The bytes written so far into one stripe, and which ranges they cover."""

    def __init__(self, size: int) -> None:
        self.data = np.empty(size, dtype=np.uint8)
        self.size = size
        self.covered: list[list[int]] = []  # sorted, disjoint, non-adjacent [start, end)

    def add(self, within: int, piece: memoryview) -> None:
        """Copy `piece` into the stripe at `within`."""
        end = within + len(piece)
        self.data[within:end] = np.frombuffer(piece, dtype=np.uint8)
        spans = sorted([*self.covered, [within, end]])
        merged = [spans[0]]
        for a, b in spans[1:]:
            if a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.covered = merged

    @property
    def full(self) -> bool:
        return self.covered == [[0, self.size]]

    def covers(self, start: int, end: int) -> bool:
        """Whether [start, end) was written entirely."""
        return any(a <= start and end <= b for a, b in self.covered)

    def touches(self, start: int, end: int) -> bool:
        """Whether any written byte lies in [start, end)."""
        return any(a < end and start < b for a, b in self.covered)


class StripeCache:
    """An LRU of pending stripes, bounded in bytes."""

    def __init__(self, stripe_bytes: int, limit_bytes: int) -> None:
        self.stripe_bytes = stripe_bytes
        self.capacity = max(2, limit_bytes // stripe_bytes)
        self.pending: OrderedDict[int, PendingStripe] = OrderedDict()

    def get_or_create(self, stripe: int) -> PendingStripe:
        p = self.pending.get(stripe)
        if p is None:
            p = self.pending[stripe] = PendingStripe(self.stripe_bytes)
        else:
            self.pending.move_to_end(stripe)
        return p

    def over_limit(self) -> bool:
        return len(self.pending) > self.capacity

    def pop(self, stripe: int) -> PendingStripe | None:
        return self.pending.pop(stripe, None)

    def pop_oldest(self) -> tuple[int, PendingStripe]:
        return self.pending.popitem(last=False)

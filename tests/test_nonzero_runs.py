"""Which sectors of a written block hold data: the runs FileData.store keeps (zeros: holes)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.alloc import SECTOR
from vfs.filedata import nonzero_runs

# one sector: zeros, random bytes, a single non-zero byte somewhere, or data behind a zero word
_SECTOR_KINDS = st.one_of(
    st.just(bytes(SECTOR)),
    st.binary(min_size=SECTOR, max_size=SECTOR),
    st.tuples(st.integers(0, SECTOR - 1), st.integers(1, 255)).map(
        lambda p: bytes(p[0]) + bytes([p[1]]) + bytes(SECTOR - p[0] - 1)),
    st.binary(min_size=SECTOR - 8, max_size=SECTOR - 8).map(lambda b: bytes(8) + b),
)


def _runs_by_hand(data: bytes, n: int) -> list[tuple[int, int]]:
    nonzero = [any(data[k * SECTOR:(k + 1) * SECTOR]) for k in range(n)]
    runs, s = [], 0
    while s < n:
        if not nonzero[s]:
            s += 1
            continue
        t = s
        while t < n and nonzero[t]:
            t += 1
        runs.append((s, t))
        s = t
    return runs


@settings(max_examples=300, deadline=None)
@given(st.lists(_SECTOR_KINDS, min_size=1, max_size=40), st.binary(max_size=SECTOR + 7))
def testnonzero_runs_match_a_sector_by_sector_check(sectors, tail):
    data = b"".join(sectors) + tail  # bytes past the n sectors asked about are ignored
    assert nonzero_runs(memoryview(data), len(sectors)) == _runs_by_hand(data, len(sectors))

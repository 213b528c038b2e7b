"""XXH3-64 of many equal pieces of a buffer at once (a file's sector checksums), in compiled code.

One `xxhash` call per 4 KiB sector costs about 0.2 µs, most of it the Python call and the
seeded secret that the package's portable code derives for every call: 50 µs per MiB, with
the GIL held. The package's library also carries xxHash's dispatching entry point
(`XXH3_64bits_withSeed_dispatch`, which picks AVX2 or AVX-512 at run time). This module calls
it from a numba loop, which lets go of the GIL for large buffers: 20 µs per MiB here. (For
one long buffer the package's own call is as fast, and lets go of the GIL itself: use it.)

The results are XXH3-64's, bit for bit: the entry point is checked against `xxhash` on a test
vector when first used. Where it is missing or disagrees, every function here falls back to
`xxhash` itself (and says so once in the log). Importing this module does not import numba;
the loops are compiled on first use (about 0.3 s) and kept in numba's on-disk cache.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash
import xxhash._xxhash as _xxhash_ext

log = logging.getLogger(__name__)

ENTRY_POINT = "XXH3_64bits_withSeed_dispatch"
PORTABLE_ENV = "DWFS_XXH3_PORTABLE"
"""Set (to anything but 0 or empty) to use the `xxhash` package alone."""

EACH_BYTES = 32 * 1024
"""`xxh3_64_each` of at least this many bytes runs the compiled loop."""
NOGIL_BYTES = 256 * 1024
"""From this many bytes on, the loop lets go of the GIL. Below it, taking the GIL back costs
more than the hashing: when other threads are busy, a writer's 64 KiB blocks (16 calls per
MiB) waited 27 µs a call for it, 0.42 s per GiB copied within the mount, against 0.07 s
with the GIL held."""

_MASK64 = (1 << 64) - 1
_intdigest = xxhash.xxh3_64_intdigest

_lock = threading.Lock()
_loaded = False
_entry: Any = None  # the ctypes function, or None: use xxhash
_each_kernels: tuple[Callable[..., None], Callable[..., None]] | None = None


def _load_entry() -> Any:
    """The checked ctypes entry point, or None."""
    if os.environ.get(PORTABLE_ENV, "") not in ("", "0"):
        return None
    try:
        fn = getattr(ctypes.CDLL(_xxhash_ext.__file__), ENTRY_POINT)
    except (OSError, AttributeError) as exc:
        log.info("xxh3: %s not found in %s (%s); hashing with the xxhash package alone",
                 ENTRY_POINT, _xxhash_ext.__file__, exc)
        return None
    fn.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64]
    fn.restype = ctypes.c_uint64
    probe = np.frombuffer(bytes(range(256)) * 97, np.uint8)
    for seed in (0, 1, _MASK64, 0x9E3779B97F4A7C15):
        for n in (0, 1, 240, 241, len(probe)):
            if fn(probe.ctypes.data, n, seed) != _intdigest(probe[:n], seed=seed):
                log.warning("xxh3: %s disagrees with the xxhash package (seed %#x, %d bytes); "
                            "hashing with the xxhash package alone", ENTRY_POINT, seed, n)
                return None
    return fn


def _entry_point() -> Any:
    global _loaded, _entry
    if not _loaded:
        with _lock:
            if not _loaded:
                _entry = _load_entry()
                _loaded = True
    return _entry


def _kernels() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The compiled loops, holding the GIL and letting go of it (compiled, or loaded from
    numba's cache, on first use), or None without the entry point."""
    global _each_kernels
    if _each_kernels is None and _entry_point() is not None:
        with _lock:
            if _each_kernels is None:
                _each_kernels = _compile()
    return _each_kernels


# The entry point as numba sees it: a symbol by name, resolved in the xxhash library loaded
# into LLVM's process-wide symbol table. A module global, not a ctypes pointer or a closure
# variable, so that numba can keep the compiled loops in its on-disk cache.
_xxh3_symbol: Any = None


def _compile() -> tuple[Callable[..., None], Callable[..., None]]:  # pragma: no cover
    global _xxh3_symbol
    import llvmlite.binding  # noqa: PLC0415 - compiled on first use, not at import
    from numba import njit, types  # noqa: PLC0415

    llvmlite.binding.load_library_permanently(_xxhash_ext.__file__)
    _xxh3_symbol = types.ExternalFunction(
        ENTRY_POINT, types.uint64(types.uintp, types.uintp, types.uint64))

    @njit(cache=True)
    def each(addr, size, n, seed, out):  # noqa: ANN001, ANN202 - typed by numba
        for i in range(n):
            out[i] = _xxh3_symbol(addr + i * size, size, seed + np.uint64(i))

    @njit(nogil=True, cache=True)
    def each_nogil(addr, size, n, seed, out):  # noqa: ANN001, ANN202 - typed by numba
        for i in range(n):
            out[i] = _xxh3_symbol(addr + i * size, size, seed + np.uint64(i))

    return each, each_nogil


def _bytes_view(data: Any) -> memoryview:
    """`data` as a contiguous memoryview of bytes (copied only if it is not contiguous)."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def xxh3_64_each(data: Any, size: int, seed: int) -> np.ndarray:
    """XXH3-64 of each whole `size`-byte piece of `data`, piece i seeded with `seed + i`
    (modulo 2**64), as an array of uint64."""
    view = _bytes_view(data)
    n = view.nbytes // size
    base = seed & _MASK64
    kernels = _kernels() if n * size >= EACH_BYTES else None
    if kernels is not None:
        out = np.empty(n, np.uint64)
        arr = np.frombuffer(view, np.uint8)
        kernels[n * size >= NOGIL_BYTES](arr.ctypes.data, size, n, np.uint64(base), out)
        return out
    seeds = [(base + i) & _MASK64 for i in range(n)]
    pieces = [view[i * size : (i + 1) * size] for i in range(n)]
    return np.fromiter(map(_intdigest, pieces, seeds), np.uint64, n)

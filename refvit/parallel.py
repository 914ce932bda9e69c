"""One thread pool for refvit's elementwise and table passes, sized from one knob.

NumPy releases the GIL inside its ufuncs, `take` and copies, so a pass over an array split into row blocks
runs on every core when the blocks go to a thread pool. Every use here is an elementwise (or row-wise)
computation tiled into disjoint blocks: each output element is computed by the same operations whatever the
tiling and whichever thread runs its block, so the results are bit-identical at any thread count
(tests/test_parallel.py). GEMMs and GEMVs stay in the caller's thread, where BLAS runs its own threads.

The knob: `threads()` is `set_threads(n)` if called (the CLI's `--threads N`), else the environment variable
REFVIT_THREADS, else BLAS's own thread count (OpenBLAS reads OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, else
uses every core), else os.cpu_count(). `set_threads` and REFVIT_THREADS also set the thread count of the
OpenBLAS that numpy loaded (when it exports its set_num_threads), so one number sizes both. One thread runs
everything in the caller's thread, as before. OpenBLAS's idle workers spin for a while after each call, on the
core the pool's next pass needs: `import refvit` before numpy sets OPENBLAS_THREAD_TIMEOUT=4 (unless set) so
that they sleep at once (measured: without it the pool gains nothing on the integer path at 2 threads).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ENV = "REFVIT_THREADS"
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MIN_BLOCK = 1 << 15   # elements: a smaller block costs more in the hand-off to a thread (~20 us) than it saves

_state = threading.local()          # per thread: scratch buffers, and whether it is a pool worker
_lock = threading.Lock()
_threads: int | None = None
_pool: ThreadPoolExecutor | None = None


def _positive_int(text: str | None) -> int | None:
    try:
        n = int(text) if text is not None else 0
    except ValueError:
        return None
    return n if n >= 1 else None


_BLAS_SYMBOLS = ("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_", "openblas_{}_num_threads")


def _blas_function(verb: str):
    """OpenBLAS's get / set_num_threads from the OpenBLAS library numpy loaded (Linux), or None."""
    try:
        import ctypes
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for sym in _BLAS_SYMBOLS:
                fn = getattr(lib, sym.format(verb), None)
                if fn is not None:
                    return fn
    except (OSError, ValueError):
        pass
    return None


def blas_threads() -> int | None:
    """The thread count of numpy's OpenBLAS, or None when it cannot be read."""
    fn = _blas_function("get")
    return int(fn()) if fn is not None else None


def _set_blas_threads(n: int) -> None:
    fn = _blas_function("set")
    if fn is not None:
        import ctypes
        fn(ctypes.c_int(n))


def default_threads() -> int:
    """REFVIT_THREADS, else BLAS's thread count (or the first BLAS thread variable set), else os.cpu_count()."""
    n = _positive_int(os.environ.get(ENV))
    if n is not None:
        return n
    n = blas_threads()
    if n is not None and n >= 1:
        return n
    for var in BLAS_ENV:
        n = _positive_int(os.environ.get(var))
        if n is not None:
            return n
    return os.cpu_count() or 1


def threads() -> int:
    """The number of threads the elementwise passes use."""
    global _threads
    if _threads is None:
        _threads = default_threads()
    return _threads


def set_threads(n: int | None, blas: bool = True) -> None:
    """Use n threads from now on (n >= 1; None: back to the default of the environment); with blas, numpy's
    OpenBLAS too (its GEMMs run on its own threads)."""
    global _threads, _pool
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    with _lock:
        old, _pool = _pool, None
        _threads = None if n is None else int(n)
    if old is not None:
        old.shutdown(wait=True)
    if n is not None and blas:
        _set_blas_threads(int(n))


def _mark_worker() -> None:
    _state.worker = True


def _get_pool(n: int) -> ThreadPoolExecutor:
    """The pool of n - 1 workers (the caller is the n-th), made on first use after set_threads."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, n - 1), thread_name_prefix="refvit", initializer=_mark_worker)
        return _pool


def run(fn, items) -> None:
    """fn(item) for every item (each writes its own disjoint part of an output), on threads() threads (the
    caller and threads() - 1 pool workers take the items in order from one queue) when there are several
    items; in the caller's thread otherwise, or when the caller is a pool worker (a nested pass runs serially:
    no deadlock, no oversubscription). The first exception is raised once every thread has stopped."""
    items = list(items)
    n = min(threads(), len(items))
    if n <= 1 or getattr(_state, "worker", False):
        for item in items:
            fn(item)
        return
    queue, take = iter(items), threading.Lock()
    failed = []

    def drain():
        while not failed:
            with take:
                item = next(queue, _END)
            if item is _END:
                return
            try:
                fn(item)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller below
                failed.append(e)
    futures = [_get_pool(threads()).submit(drain) for _ in range(n - 1)]
    drain()
    for f in futures:
        f.result()
    if failed:
        raise failed[0]


_END = object()


def block_target(size: int, target: int) -> int:
    """Elements per block for a pass over `size` elements: at most `target` (a cache-sized block), and
    small enough to give every thread a block, but not below MIN_BLOCK."""
    n = threads()
    if n == 1 or size <= MIN_BLOCK:
        return target
    return max(MIN_BLOCK, min(target, math.ceil(size / n)))


def ranges(count: int, size_each: int, target: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting `count` rows of `size_each` elements into near-equal row blocks of at
    most block_target(count * size_each, target) elements (at least one row each)."""
    if count <= 0:
        return []
    per = max(1, block_target(count * size_each, target) // max(1, size_each))
    pieces = math.ceil(count / per)
    step = math.ceil(count / pieces)
    return [(i, min(i + step, count)) for i in range(0, count, step)]


def scratch(key: str, n: int, dtype) -> np.ndarray:
    """A 1-D scratch array of n elements of `dtype` owned by the calling thread (reused across calls with
    the same key; its contents are undefined). Each call site uses its own key."""
    bufs = getattr(_state, "bufs", None)
    if bufs is None:
        bufs = _state.bufs = {}
    dt = np.dtype(dtype)
    buf = bufs.get((key, dt))
    if buf is None or buf.size < n:
        buf = bufs[(key, dt)] = np.empty(n, dt)
    return buf[:n]


if _positive_int(os.environ.get(ENV)) is not None:   # REFVIT_THREADS sizes BLAS too, from the start
    set_threads(_positive_int(os.environ.get(ENV)))

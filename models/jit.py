"""The project's compiled kernels: Numba, without the GIL, cached on disk where a cache directory is writable.

Numba compiles a kernel at its first call (about a second) and, with caching, keeps the machine code in
``__pycache__`` next to the source, in ``$NUMBA_CACHE_DIR``, or in the user's cache directory, so later
processes load it in milliseconds. Where none of those is writable (a read-only image without
``NUMBA_CACHE_DIR``: the Dockerfile sets it to /tmp) Numba refuses caching at decoration time; the kernel
is then compiled in each process instead, never an import error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from numba import njit

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("lma.jit")


def kernel(fn: F) -> F:
    """Compile ``fn`` (nopython, releases the GIL), cached on disk when possible."""
    try:
        return njit(nogil=True, cache=True)(fn)  # type: ignore[return-value]
    except RuntimeError as e:  # "cannot cache function ...: no locator available": nowhere writable
        log.info("%s: compiled in this process, not cached (%s)", fn.__qualname__, e)
        return njit(nogil=True)(fn)  # type: ignore[return-value]


def inline(fn: F) -> F:
    """A helper of kernels, inlined into them (never called from Python)."""
    return njit(inline="always")(fn)  # type: ignore[return-value]

"""The project's compiled kernels: Numba, without the GIL, cached on disk where a cache directory is writable.

Numba compiles a kernel at its first call (about a second) and, with caching, keeps the machine code in
``__pycache__`` next to the source, in ``$NUMBA_CACHE_DIR``, or in the user's cache directory, so later
processes load it in milliseconds. Where none of those is writable (a read-only image without
``NUMBA_CACHE_DIR``: the Dockerfile sets it to /tmp) Numba refuses caching at decoration time; the kernel
is then compiled in each process instead, never an import error.

Numba itself is imported at a kernel's first call, not when a module defines one: importing it (and
LLVM) costs a process about 50 MB of anonymous memory, 100 MB of shared library pages and half a
second, which the ``lma`` commands that run no kernel (``lma serve``'s supervisor, ``lma export``,
``lma --help``) do not pay. The helpers a kernel calls (:func:`inline`) are made Numba functions
first, in the kernel's module, so that the compiler finds them there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("lma.jit")
_lock = threading.RLock()  # two reader threads calling a new kernel at once make one dispatcher (Numba's own
# compiler lock then compiles each signature once)


class _Deferred:
    """A kernel or helper, compiled by Numba at its first use (see the module docstring)."""

    __slots__ = ("__wrapped__", "_compiled", "_options")

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.__wrapped__ = fn
        self._options = options
        self._compiled: Any = None

    @property
    def dispatcher(self) -> Any:
        """The Numba dispatcher (made, with the helpers it calls, on first use)."""
        compiled = self._compiled
        if compiled is None:
            with _lock:
                compiled = self._compiled
                if compiled is None:
                    compiled = self._compiled = self._make()
        return compiled

    def _make(self) -> Any:
        fn = self.__wrapped__
        names = fn.__globals__
        for name in fn.__code__.co_names:  # helpers first: Numba resolves them as globals when it compiles fn
            helper = names.get(name)
            if isinstance(helper, _Deferred):
                names[name] = helper.dispatcher
        from numba import njit

        try:
            return njit(**self._options)(fn)
        except RuntimeError as e:  # "cannot cache function ...: no locator available": nowhere writable
            if not self._options.get("cache"):
                raise
            log.info("%s: compiled in this process, not cached (%s)", fn.__qualname__, e)
            return njit(**{**self._options, "cache": False})(fn)

    def __call__(self, *args: Any) -> Any:
        return self.dispatcher(*args)


def kernel(fn: F) -> F:
    """Compile ``fn`` at its first call (nopython, releases the GIL), cached on disk when possible."""
    return _Deferred(fn, {"nogil": True, "cache": True})  # type: ignore[return-value]


def inline(fn: F) -> F:
    """A helper of kernels, inlined into them (never called from Python)."""
    return _Deferred(fn, {"inline": "always"})  # type: ignore[return-value]

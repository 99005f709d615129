"""Handing freed memory back to the OS.

A refused oversized body is read in chunks of about 64 KiB; glibc keeps such small blocks in its heap after they
are freed, so the daemon's RSS stayed up by what the refused bodies had held. ``malloc_trim`` returns the free
pages. Elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:  # libc's function, where there is one
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

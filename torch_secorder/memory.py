"""CPU memory that torch_secorder keeps between its calls (PyTorch's CUDA allocator does the same on GPUs).

glibc returns large freed blocks to the kernel, so each call would fault fresh pages in again; on the
benchmark CPU that was most of a per-sample diagonal's time and a third of a CNN's. While one of the
library's functions runs, its CPU allocations of 1 MiB or more come from a cache of freed blocks (the
compiled module's block_cache.cpp); all other allocations, and all outside those calls, are untouched.

Bounds: the cache never holds more free memory than ``limit`` bytes (default 1 GiB; 0 turns it off), and
free plus live cached memory never exceeds 3/2 of the most it ever had live at once (a request may take a
free block up to twice its size; a miss first releases free blocks; when the system refuses a new block,
the free ones are handed back first). Between calls the free blocks stay reserved to this process:
``empty_cache()`` hands them back. Without the compiled module these functions do nothing.
"""

import contextlib

import torch

from . import _extension

__all__ = ["empty_cache", "set_cache_limit", "cache_info"]


def empty_cache() -> None:
    """Hands every free cached block back to the system (like torch.cuda.empty_cache)."""
    if _extension.load():
        torch.ops.torch_secorder.block_cache_empty()


def set_cache_limit(limit: int) -> None:
    """The most free memory, in bytes, the cache may keep (0 turns caching off); frees what is above it."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a number of bytes (an int >= 0), got {limit!r}")
    if _extension.load():
        torch.ops.torch_secorder.block_cache_set_limit(limit)


def cache_info() -> dict:
    """{'free_bytes', 'live_bytes', 'live_peak_bytes', 'limit_bytes', 'hits', 'misses', 'available'}."""
    available = _extension.load()
    values = torch.ops.torch_secorder.block_cache_info() if available else [0, 0, 0, 1 << 30, 0, 0]
    names = ("free_bytes", "live_bytes", "live_peak_bytes", "limit_bytes", "hits", "misses")
    return dict(zip(names, values), available=available)


@contextlib.contextmanager
def block_cache_scope():
    """Within this block the cache serves this thread's large CPU allocations (the public functions enter it
    with `with`, not a decorator, so that their warnings still point at the caller's line)."""
    if not _extension.load():
        yield
        return
    torch.ops.torch_secorder.block_cache_enter()
    try:
        yield
    finally:
        torch.ops.torch_secorder.block_cache_leave()

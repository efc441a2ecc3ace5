"""Memory of the processes that run the policy: heap settings (rollout workers and the learner), and buffers
on huge pages (`empty_on_huge_pages`, the sampler's KV cache).

Every step allocates and frees the same activation, gradient and batch tensors. With glibc's default
settings, blocks above the (moving) mmap threshold are mapped and unmapped each time, and a free heap top
above the trim threshold goes back to the kernel, so every step faults thousands of fresh zeroed pages in
again: about 2,900 minor page faults per step for the learner and worker of the default config in one
process, 5,900 as two Ray actors, about a tenth of the step's time. `retain_freed_memory` has malloc keep
freed memory for the next step instead (after it the median step faults no page in; a step that first
reaches a new high-water mark, a longer batch than any before, still faults its new pages in once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os

import torch

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MIB = 1 << 20
SETTINGS = ((M_MMAP_THRESHOLD, 32 * MIB), (M_TRIM_THRESHOLD, 256 * MIB), (M_TOP_PAD, 64 * MIB))


def retain_freed_memory() -> bool:
    """Let this process's malloc keep up to 256 MiB of freed memory for reuse (blocks under 32 MiB come
    from the heap, not their own mappings). Returns whether the settings were applied: not where malloc is
    not glibc's (macOS, musl), and not when the environment already sets any MALLOC_* variable (the user's
    own tuning wins)."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)


HUGE_PAGE = 2 * MIB


def empty_on_huge_pages(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(size, dtype=dtype)` on the CPU, in a mapping of its own that Linux may back with 2 MiB
    pages (transparent huge pages, asked for with madvise; the default THP mode of most distributions).

    For a large buffer that a loop streams through (the sampler's KV cache): one page fault and one TLB entry
    per 2 MiB instead of 512, and no 4 KiB faults at all where malloc would map a fresh block per call.
    Where THP is off, or off Linux, the mapping keeps ordinary pages; buffers under 4 MiB come from
    `torch.empty`. The mapping is unmapped when the last tensor viewing it is freed.
    """
    nbytes = math.prod(size) * dtype.itemsize
    if nbytes < 2 * HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(size, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: ordinary pages
        pass
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive as long as a view of it lives
    start = -raw.data_ptr() % HUGE_PAGE  # 2 MiB-aligned, so that whole huge pages fit
    return raw[start : start + nbytes].view(dtype).view(size)

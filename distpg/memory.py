"""The heap settings of the processes that run the policy (rollout workers and the learner).

Every step allocates and frees the same activation, gradient and batch tensors. With glibc's default
settings, blocks above the (moving) mmap threshold are mapped and unmapped each time, and a free heap top
above the trim threshold goes back to the kernel, so every step faults thousands of fresh zeroed pages in
again: about 2,900 minor page faults per step for the learner and worker of the default config in one
process, 5,900 as two Ray actors, about a tenth of the step's time. `retain_freed_memory` has malloc keep
freed memory for the next step instead (after it: under 60 faults per step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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

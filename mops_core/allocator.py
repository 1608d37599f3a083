"""Host memory for training steps on CPU: freed blocks kept for reuse instead of handed back.

PyTorch's CPU tensors come straight from the C library's malloc. A training step allocates and
frees the same large buffers every time (activations saved for backward, logits over the
vocabulary, their gradients), and glibc serves a block above its mmap threshold (dynamic, from
128 KiB) with fresh pages that it unmaps again when the block is freed: the next step faults the
same memory in and zeroes it once more, page by page. With the threshold at glibc's largest (32 MiB
on 64-bit) and the heap trimmed only past 1 GiB free, such blocks stay in the heap and are reused.
A process then keeps the heap it peaked at, as a training process uses it again at every step.
(`benchmarks/allocator.py` times the step both ways; jemalloc or tcmalloc preloaded do the same.)
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1 << 30
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks up to MMAP_THRESHOLD for reuse, once per process.

    Returns whether it is set; False where the C library is not glibc (nothing is changed there).
    """
    global _done
    if _done is None:
        _done = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            except (OSError, AttributeError):
                pass
        log.debug("malloc keeps freed blocks up to %d MiB for reuse: %s", MMAP_THRESHOLD >> 20, _done)
    return _done

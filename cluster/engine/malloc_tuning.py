"""glibc malloc told to reuse freed memory instead of mapping it afresh.

glibc serves a request above its mmap threshold with a new mapping and unmaps it on free. The
threshold starts at 128 KiB and rises only when a larger mapped block is freed, so whether a
step's activations are reused from the heap, or mapped, page-faulted in and zeroed on every op,
depends on what the process happened to allocate before. A 64-prompt prefill of the tiny Mixtral
makes 2 MB tensors at every op: with the torch attention path a generate call of it measured
1.5K-12K page faults, and with the compiled prefill kernel that replaced it (which frees other
blocks) 12-33K, its experts taking 83-98 ms instead of ~70. Fixed thresholds make reuse the rule,
whatever came before: 0-7.7K faults, experts 69-77 ms.
"""

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: blocks below it come from the heap


def keep_freed_memory(keep_mib: int) -> bool:
    """Blocks under 32 MiB come from the heap, and up to `keep_mib` MiB of freed memory at a
    heap's top stays with the process. Process-wide and idempotent. Returns whether glibc took
    the settings (False with keep_mib 0, or where the C library is not glibc)."""
    if keep_mib <= 0 or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except OSError:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, keep_mib << 20) == 1
    if not taken:
        log.warning("glibc refused the malloc thresholds (mmap %d B, trim %d MiB): keeping its defaults",
                    MMAP_THRESHOLD, keep_mib)
    return taken

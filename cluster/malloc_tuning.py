"""glibc malloc told to reuse freed memory instead of mapping it afresh.

glibc serves a request above its mmap threshold with a new mapping and unmaps it on free. The
threshold starts at 128 KiB and rises only when a larger mapped block is freed, so whether a
step's activations are reused from the heap, or mapped, page-faulted in and zeroed on every op,
depends on what the process happened to allocate before. A 64-prompt prefill of the tiny Mixtral
makes 2 MB tensors at every op; one new kernel that freed fewer large blocks than the torch code
it replaced took that prefill from ~1.5K to 12-33K page faults and its experts from ~70 to
83-98 ms. Fixed thresholds make reuse the rule, whatever came before.
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

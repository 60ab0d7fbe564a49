"""Keep freed CPU memory in the process for the next tensor (glibc's malloc, Linux).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands every block above its mmap
threshold (at most 32 MiB) straight back to the kernel when it is freed, and trims the top of its heap
when enough of it is free. The next tensor of that size then takes one page fault per 4 KiB page, and
the kernel zeroes each page first. On a large model every call pays this again: on MViT-v2-S
(16 x 224 x 224, one thread) the plain input gradient took about 0.4 s of system time per call and the
LRP call, which keeps more tensors, 1.5-1.9 s (docs/native.md, "Memory reuse on CPU").

``reuse_freed_memory()`` tells glibc to serve every block from its heap (no mmap) and never to trim it,
so freed pages stay with the process and are reused without faults. The cost: the process keeps the
memory of its largest call until it exits. It changes the whole process, so the library never calls it
by itself; the ``fastlrp`` command line does (its process is its own; ``--return-freed-memory`` keeps
glibc's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import warnings

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored by reuse_freed_memory(False)
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


@functools.cache  # the CLI asks available() and then sets: load the library once
def _glibc():
    """The process's C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    return libc if hasattr(libc, "mallopt") else None


def available() -> bool:
    """Whether reuse_freed_memory can act here (the C library is glibc)."""
    return _glibc() is not None


def reuse_freed_memory(enable: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (``enable=True``) or return it to the kernel again
    (``False``: glibc's default thresholds; its dynamic mmap threshold stays off). Process-wide.

    Returns True when the setting was applied; False with a warning where the C library is not glibc
    (macOS, Windows, musl), which manage freed memory their own way."""
    libc = _glibc()
    if libc is None:
        warnings.warn(f"fastlrp.reuse_freed_memory: the C library here ({platform.system()}, "
                      f"{platform.libc_ver()[0] or 'not glibc'}) is not glibc; its allocator is left as it is",
                      RuntimeWarning, stacklevel=2)
        return False
    mmap_max, trim = (0, _NEVER_TRIM) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    applied = libc.mallopt(_M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if not applied:
        warnings.warn("fastlrp.reuse_freed_memory: glibc refused the setting (mallopt returned 0)",
                      RuntimeWarning, stacklevel=2)
    return applied

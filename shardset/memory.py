"""Block buffers that are page-aligned and backed by huge pages.

Two properties of a block buffer matter to the reader:

* **Alignment.**  A read with ``O_DIRECT`` (no page-cache copy) needs the buffer
  address and the read length to be multiples of the device's logical block size;
  :data:`DIRECT_ALIGN` (4096) covers every common device.  Buffers from
  ``np.empty`` start 16 bytes past a page boundary, so they cannot be used.
* **Huge pages.**  Gathering random rows from a ring of 128 MiB - 1 GiB touches a
  new page for nearly every row; with 4 KiB pages nearly every touch misses the TLB.
  Memory marked ``MADV_HUGEPAGE`` is backed by 2 MiB pages where transparent huge
  pages are ``always`` or ``madvise``.  numpy marks its own arrays of 4 MiB or
  more the same way (unless ``NUMPY_MADVISE_HUGEPAGE=0``); these buffers do it
  regardless and start on a 2 MiB boundary, so every page of them qualifies.

The memory is anonymous and private (copy-on-write in a forked DataLoader worker,
as numpy's is) and costs no resident memory until it is written.

Example:
    >>> from shardset.memory import DIRECT_ALIGN, aligned_buffer, direct_nbytes, is_aligned
    >>> buf = aligned_buffer(direct_nbytes(10_000))
    >>> buf.dtype.name, buf.nbytes, is_aligned(buf), is_aligned(buf[1:])
    ('uint8', 12288, True, False)
"""

from __future__ import annotations

import mmap

import numpy as np

from .format import check_int

__all__ = ["DIRECT_ALIGN", "HUGE_PAGE_BYTES", "aligned_buffer", "direct_nbytes", "is_aligned"]

DIRECT_ALIGN = 4096
HUGE_PAGE_BYTES = 2 << 20


def aligned_buffer(nbytes: int, *, hugepages: bool = True) -> np.ndarray:
    """A ``uint8`` array of ``nbytes`` starting on a 2 MiB boundary (``hugepages``, and
    then asking the kernel for huge pages) or a :data:`DIRECT_ALIGN` boundary.

    Its contents are undefined, as with ``np.empty``.  Where anonymous private
    mappings are not available (Windows) it falls back to an over-allocated numpy
    array, aligned the same way but without the huge-page request.
    """
    nbytes = check_int("nbytes", nbytes, 0)
    align = HUGE_PAGE_BYTES if hugepages else DIRECT_ALIGN
    size = nbytes + align  # room to move the start up to the boundary
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        # Private, not mmap's default shared mapping: a forked worker must get a copy,
        # and shared anonymous memory gets huge pages only under the shmem setting.
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            area.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(area, np.uint8)  # keeps the mapping alive as long as any view
    else:
        whole = np.empty(size, np.uint8)
    start = -whole.ctypes.data % align
    return whole[start : start + nbytes]


def direct_nbytes(nbytes: int) -> int:
    """Room a buffer needs to read a file of ``nbytes`` with ``O_DIRECT`` (the length
    rounded up to :data:`DIRECT_ALIGN`)."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def is_aligned(buffer: np.ndarray, align: int = DIRECT_ALIGN) -> bool:
    """Whether ``buffer`` starts on an ``align``-byte boundary."""
    return buffer.ctypes.data % align == 0

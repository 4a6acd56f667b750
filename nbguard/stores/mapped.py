"""Hashing a file's bytes where they lie in the page cache, through short-lived read-only maps.

Why: a restore hashes every byte before it changes anything (all or nothing), then copies the
checked pages from the page cache into the live tensors. Hashing through ``pread`` into a buffer
adds a memory copy to the disk read: 1.08x the time of reading the same file once into memory
(0.93-1.27 over 5 rounds), against 1.00x (0.74-1.21) for hashing the cached pages in place
(``python -m benchmarks.restore_hash``). A whole cold restore of 0.75 GiB went from 1.36x to 1.20x
its floor (medians of 9 rounds each).

Touching a mapped page of a file that shrank, or whose storage fails, raises SIGBUS, which kills
the process. So:

* each 16 MiB piece is mapped on its own and populated with ``MADV_POPULATE_READ`` (Linux 5.14+),
  which reports those failures as an error instead; it is hashed right after, then unmapped (the
  pages stay in the page cache; the process never holds more than two pieces mapped);
* only files on local disk file systems are mapped (ext4, xfs, btrfs, tmpfs, overlay, f2fs, zfs):
  a network or FUSE mount (Colab's Drive folder) can fail any read, so it is read with ``pread``;
* what is left: a page reclaimed in the milliseconds between its populate and its hash, of a file
  another process truncated in between. nbguard never truncates a blob (each is written once and
  renamed into place); ``torch.load(mmap=True)`` carries the same exposure for the whole life of
  its map.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
from collections.abc import Callable

from ..errors import CorruptSnapshotError

MADV_POPULATE_READ = 22
TRUNCATED = "blob is truncated (shorter than its header says)"


# statfs(2) f_type of the file systems whose pages are mapped (the kernel's magic numbers)
LOCAL_FILE_SYSTEMS = {
    0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
    0x794C7630: "overlay", 0xF2F52010: "f2fs", 0x2FC12FC1: "zfs",
}

_enabled = sys.platform.startswith("linux")  # cleared where the kernel refuses MADV_POPULATE_READ
_fstatfs: Callable[[int, ctypes.Array[ctypes.c_char]], int] | None = None


def file_system_type(fd: int) -> int | None:
    """The ``f_type`` of the file system holding ``fd`` (Linux), or None where it cannot be asked."""
    global _fstatfs
    if not sys.platform.startswith("linux"):
        return None
    if _fstatfs is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
            _fstatfs = libc.fstatfs
        except (OSError, AttributeError):
            return None
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type is its first long
    if _fstatfs(fd, buffer):
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def can_map(fd: int) -> bool:
    """Whether ``hash_mapped`` may be used on ``fd``: Linux, a kernel with MADV_POPULATE_READ, and a
    local disk file system."""
    return _enabled and file_system_type(fd) in LOCAL_FILE_SYSTEMS


class MapUnsupported(Exception):
    """This kernel cannot populate a map ahead of reading it: hash the bytes another way."""


def map_piece(fd: int, offset: int, length: int) -> tuple[mmap.mmap, int]:
    """A read-only map of ``length`` bytes at ``offset`` with every page read in, and where the bytes
    start in it. CorruptSnapshotError if the file is shorter, OSError if a page cannot be read
    (never SIGBUS); MapUnsupported on kernels older than 5.14."""
    global _enabled
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(fd, offset + length - start, prot=mmap.PROT_READ, offset=start)
    except ValueError as exc:  # the map would reach past the end of the file
        raise CorruptSnapshotError(TRUNCATED) from exc
    try:
        mapped.madvise(MADV_POPULATE_READ)
    except OSError as exc:
        mapped.close()
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            _enabled = False
            raise MapUnsupported from exc
        if exc.errno == errno.EFAULT:  # a page past the end of the file: it shrank meanwhile
            raise CorruptSnapshotError(TRUNCATED) from exc
        raise
    return mapped, offset - start

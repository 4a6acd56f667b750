"""Who wrote a file: this machine and process, so a leftover can be told from a write in progress.

Temporary files are named ``.tmp-<host>-<pid>-<random>-<name>`` and writer leases record the same
host and pid. On the same machine, a dead pid proves the writer is gone (so its leftovers can go at
once); a file of another machine, or of an older nbguard, only goes when it is old.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import uuid

TEMP_PREFIX = ".tmp-"
_OWNED = re.compile(r"^\.tmp-([0-9a-f]{8})-(\d{1,10})-[0-9a-f]{8}-")


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """8 hex digits naming this machine (its host name and, where known, its boot), stable for a boot."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return hashlib.sha1(f"{socket.gethostname()}|{boot}".encode()).hexdigest()[:8]


def temp_name(name: str) -> str:
    """A temporary file name that says which machine and process is writing ``name``."""
    return f"{TEMP_PREFIX}{host_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"


def temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary file's writer; None for names of older versions."""
    found = _OWNED.match(name)
    return (found.group(1), int(found.group(2))) if found else None


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (True when that cannot be told)."""
    if pid <= 0:
        return False
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def writer_gone(host: str, pid: int) -> bool:
    """Whether the writer (host, pid) is provably gone: same machine, no such process."""
    return host == host_id() and not pid_alive(pid)

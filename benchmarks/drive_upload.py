"""Upload throughput of ``DriveStore.write`` into the Drive v2 emulator on this machine.

    python -m benchmarks.drive_upload --size-mib 1024 [--chunk-mib 8] [--download]

Measures nbguard's side of a Drive upload (chunking, md5, HTTP through httplib2, resumable
protocol) with a server on loopback, so the figure is an upper bound: a real upload is limited by
the network and by Google.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import tempfile
import time

from nbguard.stores.drive import DriveStore
from tests.drive_emulator import DriveEmulator

MIB = 1 << 20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--chunk-mib", type=int, default=8, help="resumable-upload chunk size in MiB (default 8)")
    parser.add_argument("--download", action="store_true", help="also time open_blob of the file")
    parser.add_argument("--workdir", default=None,
                        help="where the emulator keeps file bodies (default: the temp dir; /dev/shm takes the "
                             "emulator's disk out of the figure)")
    args = parser.parse_args(argv)
    size, chunk = args.size_mib * MIB, args.chunk_mib * MIB

    with tempfile.TemporaryDirectory(prefix="nbguard-bench-", dir=args.workdir) as work, \
            DriveEmulator(quota_bytes=4 * size + (1 << 30), workdir=work) as emu:
        store = DriveStore("gdrive://bench/run", credentials=emu.authorized_user_info(), api_root=emu.url,
                           chunk_size=chunk, cache_dir=os.path.join(work, "cache"))
        store.list("")  # token and folder look-ups out of the timing
        piece = os.urandom(chunk)  # one reused buffer: the producer costs nothing

        def source():
            left = size
            while left:
                n = min(left, len(piece))
                yield memoryview(piece)[:n]
                left -= n

        start = time.perf_counter()
        store.write("blob.bin", source())
        elapsed = time.perf_counter() - start
        puts = [r for r in emu.requests if r.method == "PUT" and r.upload_start is not None]
        sent = sum(int(r.headers.get("content-length", 0)) for r in puts)
        print(f"upload: {size / MIB:.0f} MiB in {elapsed:.2f} s = {size / MIB / elapsed:.0f} MiB/s "
              f"({chunk // MIB} MiB chunks, {len(puts)} PUT requests)")
        print(f"bytes uploaded: {sent} (file on Drive: {store.size('blob.bin')} bytes, "
              f"md5 {store.md5('blob.bin')})")
        if args.download:
            start = time.perf_counter()
            blob = store.open_blob("blob.bin")
            elapsed = time.perf_counter() - start
            print(f"download (open_blob): {len(blob) / MIB:.0f} MiB in {elapsed:.2f} s = "
                  f"{len(blob) / MIB / elapsed:.0f} MiB/s")
            if isinstance(blob, mmap.mmap):
                blob.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process (client and emulator): {peak:.0f} MiB")


if __name__ == "__main__":
    main()

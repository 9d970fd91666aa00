"""bench/machine.py: what the benchmarks do around the runs they measure."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from bench.machine import sweep_deepspeed_shm

SHM = Path("/dev/shm")


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_sweep_removes_the_segments_deepspeed_left_and_keeps_mapped_and_older_ones():
    """A bare DeepSpeed loop on CPU leaves a 66 MB segment per rank; the sweep after a run removes
    the ones made since it started that no live process maps (a running job's stay), and never
    another user's name pattern or an older one."""
    base = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.getpid()}"
    left, mapped, older = (SHM / f"{base}_{i}" for i in range(3))
    other = SHM / f"deepspeed_allreduce_buffer_x{os.getuid()}_127.0.0.1_{os.getpid()}_0"
    for p in (left, mapped, older, other):
        p.write_bytes(b"\0" * 4096)
    os.utime(older, (time.time() - 3600, time.time() - 3600))
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        try:
            assert sweep_deepspeed_shm(time.time() - 60) == 1
            assert not left.exists() and mapped.exists() and older.exists() and other.exists()
            m[0] = 1  # still usable by its job
        finally:
            for p in (left, mapped, older, other):
                p.unlink(missing_ok=True)

"""bench/machine.py: what the benchmarks do around the runs they measure."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.machine import sweep_deepspeed_shm, tree_usage

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


def test_tree_usage_counts_a_childs_page_faults_and_cpu():
    """What bench/train.py's "minor page faults per step" and CPU columns read: a child that touches
    64 MiB of fresh memory adds about 16k faults of 4 KiB (fewer with larger pages, never none),
    and 0.2 s of its spinning shows as CPU."""
    child = subprocess.Popen([sys.executable, "-c", "import mmap, sys; m = mmap.mmap(-1, 64 << 20); print(1, flush=True)\n"
                              "for i in range(0, len(m), 4096): m[i] = 1\n"
                              "import time; t = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n"
                              "print(2, flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        before = tree_usage(child.pid)
        assert child.stdout.readline().strip() == "2"
        after = tree_usage(child.pid)
    finally:
        child.communicate("", timeout=30)
    assert after["minor_faults"] - before["minor_faults"] >= 64 * 1024 / 2048, (before, after)  # pages of up to 2 MiB
    assert after["cpu_s"] - before["cpu_s"] >= 0.15 and after["cpu_s"] >= after["system_s"] >= 0
    assert all(v != v for v in tree_usage(child.pid).values())  # gone: NaN

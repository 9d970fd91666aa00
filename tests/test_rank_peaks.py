"""bench/rank_peaks.py: the peak RSS of each rank process of a launch (the benchmarks' and the
planner tests' poller). A fake launcher starts two "ranks" (``--local_rank`` on their command
line, as the deepspeed launcher passes it) that touch known amounts of memory; one of them starts
a child with the same command line (what a data-loader worker or a compile subprocess looks like),
which is not a rank and must not be counted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rank_peaks import run_with_rank_peaks  # noqa: E402

MiB = 2**20

RANK = textwrap.dedent("""
    import subprocess, sys, time
    mib = int(sys.argv[1])
    block = b"\\x01" * (mib << 20)  # touched: resident
    if sys.argv[2] == "fork":  # a child with the rank's command line, touching more than any rank
        subprocess.run([sys.executable, "-c", sys.argv[3], "300", "leaf", sys.argv[3], *sys.argv[4:]], check=True)
    time.sleep(1.0)  # long enough for several polls
""")

LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    rank = sys.argv[1]
    procs = [subprocess.Popen([sys.executable, "-c", rank, mib, mode, rank, f"--local_rank={i}"])
             for i, (mib, mode) in enumerate((("60", "fork"), ("120", "leaf")))]
    sys.exit(max(p.wait() for p in procs))
""")


def test_peaks_are_the_ranks_and_not_what_they_start():
    proc, peaks = run_with_rank_peaks([sys.executable, "-c", LAUNCHER, RANK], timeout=120, interval=0.05)
    assert proc.returncode == 0, proc.stderr
    assert len(peaks) == 2, [p / MiB for p in peaks]  # the forked 300 MiB child is not a rank
    small, large = peaks
    assert 60 * MiB <= small < 120 * MiB and 120 * MiB <= large < 200 * MiB, [p / MiB for p in peaks]


def test_output_redirects_and_timeouts_as_subprocess_run():
    proc, peaks = run_with_rank_peaks([sys.executable, "-c", "print('hello')"], timeout=60)
    assert proc.returncode == 0 and proc.stdout == "hello\n" and peaks == []  # no ranks: no peaks
    with pytest.raises(subprocess.TimeoutExpired):
        run_with_rank_peaks([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)

"""pipeline.allocator: CPU ranks keep their heap between steps; a user's own allocator setting wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline import allocator

glibc = pytest.mark.skipif(not allocator.is_glibc(), reason="glibc's malloc only")

# A step's worth of CPU tensors freed and allocated again, the way a training step does (PyTorch's
# CPU tensors are glibc heap blocks: c10::alloc_cpu), with no Python object on the heap in
# between. The first 17 MiB block takes glibc's dynamic thresholds to 17 MiB (mmap) and 34 MiB
# (trim), as a run's first large frees do; a step then holds 3 x 15 MiB, each under the mmap
# threshold (heap), together over the trim threshold: glibc's default gives them back at the end
# of every step and faults them in again.
CHURN = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    from pipeline import allocator
    done = allocator.tune() if sys.argv[1] == "tune" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    MiB = 1 << 20
    def alloc(n):
        p = libc.malloc(n)
        libc.memset(p, 1, n)  # touched, as a tensor's first write does
        return p
    libc.free(alloc(17 * MiB))
    def step():
        a, b, c = alloc(15 * MiB), alloc(15 * MiB), alloc(15 * MiB)
        libc.free(c); libc.free(b); libc.free(a)
    faults = [0] * 10
    for i in range(len(faults)):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"done": done, "faults": faults, "faults_per_step": sum(faults[2:]) / len(faults[2:])}))
    """
)


def _churn(mode: str, **env: str) -> dict:
    # glibc's own malloc in the child, whatever this machine sets or preloads
    base = {k: v for k, v in os.environ.items() if k not in (*allocator.USER_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120, check=False,
                         env={**base, "OMP_NUM_THREADS": "1", **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_rank_reuses_its_heap_where_glibcs_default_gives_it_back_every_step():
    default, tuned = _churn("default"), _churn("tune")
    assert tuned["done"] == "glibc malloc: mmap threshold 32 MiB, trim threshold 64 MiB"
    # the control: glibc's dynamic thresholds trim the heap after every step and fault the
    # step's 45 MiB (11.5k pages of 4 KiB) in again
    assert default["faults_per_step"] > 5000, default
    # fixed thresholds: the 45 MiB stay in the heap and are reused
    assert tuned["faults_per_step"] < 100, tuned


@glibc
def test_a_users_own_threshold_is_left_as_set():
    """docs/long_context.md tells memory-capped CPU runs to set MALLOC_MMAP_THRESHOLD_=65536: tune() must not undo it."""
    user = _churn("tune", MALLOC_MMAP_THRESHOLD_="65536")
    assert user["done"] == "left as set: MALLOC_MMAP_THRESHOLD_=65536"
    assert user["faults_per_step"] > 5000, user  # every block above 64 KiB still mapped and unmapped


@pytest.mark.parametrize("env, named", [
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_=0"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "MALLOC_ARENA_MAX": "2"}, None),
])
def test_user_choice(env, named):
    assert allocator.user_choice(env) == named


def test_tune_once_per_process(monkeypatch):
    monkeypatch.setattr(allocator, "_state", None)
    first = allocator.tune({"MALLOC_TOP_PAD_": "1"})
    assert first == "left as set: MALLOC_TOP_PAD_=1" == allocator.state()
    assert allocator.tune({}) == first  # a second call changes nothing

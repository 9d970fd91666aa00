"""glibc's malloc on CPU ranks: fixed thresholds instead of its path-dependent dynamic ones.

PyTorch's CPU tensors come from glibc's malloc (``c10::alloc_cpu``: ``posix_memalign``), and a
training step frees and allocates the same activations, gathered parameters and gradients
every step. glibc starts with a 128 KiB mmap threshold and raises it each time a larger
mapped block is freed, up to 32 MiB, with the heap trim threshold at twice it. Where it settles
depends on the order in which a process happened to free its first large blocks. Measured on
the benchmark's 4.3M-parameter model (``zero3.json``, 2 ranks, docs/benchmarks.md): the bare
DeepSpeed loop settled at 32/64 MiB and reused its heap; the train stage settled at about
16/32 MiB and gave 32 MiB of heap back to the kernel at the end of every step, to fault it in
again in the next (strace: 4-5 ``brk`` per step; 14k minor page faults per step over both ranks
against 7k, 20 ms more system CPU per step of ~450 ms).

:func:`tune` sets both thresholds at the start to where glibc's own rule ends (mmap 32 MiB,
trim 64 MiB), so every run reuses blocks under 32 MiB from its heap and keeps at most 64 MiB of
free heap before returning it. It leaves glibc alone where the user chose: a ``MALLOC_*_``
threshold variable or a ``glibc.malloc`` tunable in the environment (docs/long_context.md's
``MALLOC_MMAP_THRESHOLD_=65536`` for memory-capped CPU runs), or another allocator preloaded;
and on GPU ranks (their tensors are not malloc'd), or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the ceiling of its dynamic rule
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the dynamic rule pairs with it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
# the variables that fix glibc's thresholds (each turns its dynamic rule off), as glibc spells them
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None  # what tune() did in this process


def user_choice(environ: Mapping[str, str]) -> str | None:
    """The environment's own allocator setting, if it has one (then :func:`tune` does nothing)."""
    for name in USER_VARIABLES:
        if name in environ:
            return f"{name}={environ[name]}"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return f"GLIBC_TUNABLES={environ['GLIBC_TUNABLES']}"
    preload = environ.get("LD_PRELOAD", "")
    if any(a in preload for a in _OTHER_ALLOCATORS):
        return f"LD_PRELOAD={preload}"
    return None


def is_glibc() -> bool:
    """Whether this process's C library is glibc (the one whose thresholds :func:`tune` sets)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune(environ: Mapping[str, str] | None = None) -> str:
    """Fix glibc's mmap and trim thresholds for this process (see the module doc); returns what
    was done, also kept for :func:`state`. Call before the model is built; safe to call again."""
    global _state
    if _state is not None:
        return _state
    env = os.environ if environ is None else environ
    chosen = user_choice(env)
    if chosen:
        _state = f"left as set: {chosen}"
    elif not is_glibc():
        _state = "left as is: not glibc"
    else:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        _state = (f"glibc malloc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
                  if ok else "left as is: mallopt refused")
    return _state


def state() -> str | None:
    """What :func:`tune` did in this process (None: not called)."""
    return _state

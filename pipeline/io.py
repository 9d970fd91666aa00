"""Small filesystem helpers: atomic publication and hashing.

Every output of the pipeline is written under a temporary name and renamed into place,
so a reader never sees half a file and a failed run never damages an earlier result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import DiskFullError

_HASH_CHUNK = 8 << 20  # bytes read per sha256 update
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 64 << 20
"""Free bytes below which a failed write counts as "disk full" although its error carries no
errno: ``torch.save`` reports a short write as a bare RuntimeError ("unexpected pos ...").
A write that fails for lack of space leaves less than one write's worth free, and 64 MiB is
far below any checkpoint shard worth worrying about."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (after a rename) so the rename survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a finished ``tmp_dir`` to ``final_dir`` atomically.

    If ``final_dir`` already exists it is first renamed aside and deleted only after the
    new directory is in place, so at every instant one complete version exists on disk.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if old.exists() and not final_dir.exists():
            os.replace(old, final_dir)
        raise
    fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (its nearest existing
    ancestor), or None when that cannot be found out."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _errnos(exc: BaseException | None) -> set[int]:
    """errno of ``exc`` and of every exception it was raised from or during."""
    seen, out = set(), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            out.add(exc.errno)
        else:
            # Errors that carry the errno only as text: copytree's collected list
            # ("[Errno 28] No space left ..."), Rust libraries like safetensors ("(os error 28)").
            text = str(exc)
            out.update(n for n in _FULL_ERRNOS if f"[Errno {n}]" in text or f"(os error {n})" in text)
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    return out


def failed_path(exc: BaseException) -> str | None:
    """The file an OSError was about (for copytree's ``shutil.Error``, the first destination)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        item = exc.args[0][0]
        return str(item[1]) if isinstance(item, tuple) and len(item) == 3 else None
    return (exc.filename2 or exc.filename) if isinstance(exc, OSError) else None


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc``, raised while writing under ``path``, means the disk (or quota) is full.

    True for ENOSPC / EDQUOT anywhere in the exception chain; with ``path`` also for any
    other write error when less than :data:`NEARLY_FULL_BYTES` are left free there (a full
    disk seen through a library that drops the errno, like ``torch.save``). Call it before
    deleting partial files, which frees the space again.
    """
    if _errnos(exc) & set(_FULL_ERRNOS):
        return True
    if path is None or not isinstance(exc, (OSError, RuntimeError)):
        return False
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL_BYTES


def _size(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} GiB"


def disk_full_error(path: str | os.PathLike | None, what: str, fix: str = "choose another output directory") -> DiskFullError:
    """The one message for a full disk: where, how much is free, and what to do.

    Args:
        path: the file or directory being written (None: unknown).
        what: what was being written ("checkpoint step-00000004").
        fix: the setting that moves the output elsewhere.
    """
    where = f"disk full at {path} while writing {what} ({_size(free_bytes(path))} free there)" if path else \
        f"disk full while writing {what} (no space left on device)"
    return DiskFullError(f"{where}; free space on that filesystem, or {fix}. Earlier outputs are intact.")

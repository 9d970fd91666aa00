"""Packed token shards: writer, manifest, integrity checks and the memmap reader.

Preprocessing writes, for each (split, source) pair, a series of shards under its output
directory; training memory-maps them and cuts fixed-length samples::

    out/manifest.json
    out/tokenizer/...                  (written by the tokenizer module)
    out/train/<source>-00000.bin .idx
    out/val/<source>-00000.bin   .idx

``.bin``: raw little-endian token ids (uint16 or uint32), documents concatenated (each ends
with EOS already). ``.idx``: raw little-endian uint64, documents + 1 document start offsets
in tokens (first 0, last == tokens). ``manifest.json`` (version 1) lists every shard with its
counts and hashes and every other file with its size and sha256, so :func:`verify` detects a
truncated, missing or corrupted file before training spends GPU hours on it.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import operator
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Literal

import numpy as np

from pipeline.errors import UserError
from pipeline.io import atomic_write_text, dumps_json, fsync_dir, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pipeline.token_shards"
MANIFEST_VERSION = 1
SHARD_DTYPES = ("uint16", "uint32")
_IDX_DTYPE = np.dtype("<u8")
_WRITE_BUFFER = 8 << 20  # bytes buffered per open shard file before a write() syscall
_IDX_CHUNK = 1 << 20  # idx entries (8 MiB) checked per step by the thorough monotonicity check
_FIX = "the file is corrupted or truncated; re-run preprocess (it resumes) or restore it"


class ShardIntegrityError(UserError):
    """A preprocessed dataset does not match its manifest.

    Args:
        problems: ``(path, what differs)`` pairs, all reported together.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"'{self.problems[0][0]}' {self.problems[0][1]}; {_FIX}")
        else:
            lines = [f"{len(self.problems)} dataset files do not match manifest.json:"]
            lines += [f"  - '{path}' {msg}" for path, msg in self.problems]
            super().__init__("\n".join([*lines, f"{_FIX}."]))


def _shard_dtype(dtype: Any) -> np.dtype:
    """Little-endian uint16/uint32 from a numpy dtype or its name; anything else is a bug."""
    dt = np.dtype(dtype)
    if dt.kind != "u" or dt.itemsize not in (2, 4):
        raise ValueError(f"shard dtype must be uint16 or uint32, got {dt}")
    return dt.newbyteorder("<")


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> np.dtype:
    """Pick the token dtype of the shards for a vocabulary.

    Args:
        vocab_size: number of token ids (ids are ``0 .. vocab_size - 1``).
        requested: ``"auto"`` (uint16 when the ids fit in 16 bits, else uint32),
            ``"uint16"`` or ``"uint32"``.

    Raises:
        UserError: the requested dtype cannot hold every id, or is unknown.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if requested == "auto":
        requested = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested not in SHARD_DTYPES:
        raise UserError(f"dtype={requested!r} is not a shard dtype; set dtype to auto, uint16 or uint32")
    limit = 1 << (16 if requested == "uint16" else 32)
    if vocab_size > limit:
        hint = "set dtype=uint32 or auto" if requested == "uint16" else "use a smaller vocabulary"
        raise UserError(f"vocabulary of {vocab_size} tokens does not fit dtype={requested} (max {limit}); {hint}")
    return np.dtype(requested).newbyteorder("<")


def shard_relpath(split: str, source: str, index: int) -> str:
    """Relative stem of shard ``index`` of a (split, source): ``train/web-00000``."""
    return f"{split}/{source}-{index:05d}"


class ShardWriter:
    """Write one shard (``<relpath>.bin`` + ``.idx``) atomically, hashing as it goes.

    Data goes to ``.<name>.tmp`` files in the shard's directory; :meth:`close` fsyncs and
    renames them into place, :meth:`abort` deletes them. As a context manager the shard is
    closed on a normal exit (entry in :attr:`entry`) and aborted on an exception.

    Args:
        out_dir: dataset output directory.
        relpath: shard path relative to ``out_dir`` without extension (``train/web-00000``;
            a trailing ``.bin`` is accepted).
        dtype: uint16 or uint32 (see :func:`dtype_for_vocab`).
        split: split recorded in the entry; default the first component of ``relpath``.
        source: source recorded in the entry; default the file name up to its last ``-``.
    """

    def __init__(self, out_dir: str | os.PathLike, relpath: str, dtype: Any,
                 split: str | None = None, source: str | None = None):
        rel = PurePosixPath(relpath)
        rel = rel.with_suffix("") if rel.suffix == ".bin" else rel
        _check_relpath(str(rel))
        self.out_dir = Path(out_dir)
        self.relpath = str(rel)
        self.dtype = _shard_dtype(dtype)
        self.split = split if split is not None else rel.parts[0]
        self.source = source if source is not None else rel.name.rsplit("-", 1)[0]
        self.documents = self.tokens = 0
        self.entry: dict | None = None
        self._max_id = int(np.iinfo(self.dtype).max)
        self._final = {k: self.out_dir / f"{self.relpath}.{k}" for k in ("bin", "idx")}
        self._tmp = {k: p.with_name(f".{p.name}.tmp") for k, p in self._final.items()}
        self._hash = {k: hashlib.sha256() for k in ("bin", "idx")}
        self._files: dict[str, Any] = {}
        self._final["bin"].parent.mkdir(parents=True, exist_ok=True)
        try:
            for k, p in self._tmp.items():
                self._files[k] = open(p, "wb", buffering=_WRITE_BUFFER)
        except BaseException:
            self.abort()
            raise
        self._write("idx", np.zeros(1, _IDX_DTYPE))  # offset of document 0

    def _write(self, kind: str, arr: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(arr)).cast("B")
        self._hash[kind].update(buf)
        self._files[kind].write(buf)

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and per-document lengths.

        Args:
            flat_tokens: 1-D integer array, the documents' tokens concatenated.
            lengths: 1-D integer array, tokens per document; sums to ``len(flat_tokens)``.

        Raises:
            ValueError: shapes disagree, a length is negative, or a token id does not fit
                the shard dtype (a bug upstream: the dtype was chosen from the vocabulary).
        """
        if self.entry is not None or not self._files:
            raise RuntimeError(f"shard '{self.relpath}' is already closed or aborted")
        flat, lens = np.asarray(flat_tokens), np.asarray(lengths)
        if flat.ndim != 1 or lens.ndim != 1:
            raise ValueError(f"flat_tokens and lengths must be 1-D, got shapes {flat.shape} and {lens.shape}")
        if (flat.size and flat.dtype.kind not in "iu") or (lens.size and lens.dtype.kind not in "iu"):
            raise ValueError(f"token ids and lengths must be integers, got {flat.dtype} and {lens.dtype}")
        lens = lens.astype(np.int64, copy=False)
        if lens.size and int(lens.min()) < 0:
            raise ValueError("document lengths must be >= 0")
        total = int(lens.sum())
        if total != flat.size:
            raise ValueError(f"lengths sum to {total} but flat_tokens holds {flat.size} tokens")
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi > self._max_id:
                raise ValueError(f"token id {lo if lo < 0 else hi} does not fit the {self.dtype.name} shard "
                                 f"'{self.relpath}' (ids 0..{self._max_id}); the shard dtype does not match the tokenizer")
            self._write("bin", flat.astype(self.dtype, copy=False))
        if lens.size:  # end offset of each new document, in tokens from the shard start
            self._write("idx", (np.cumsum(lens) + self.tokens).astype(_IDX_DTYPE))
        self.documents += int(lens.size)
        self.tokens += total

    @property
    def bytes(self) -> dict[str, int]:
        """Bytes of ``bin`` and ``idx`` written so far (used to roll over to a new shard)."""
        return {"bin": self.tokens * self.dtype.itemsize, "idx": (self.documents + 1) * 8}

    def close(self) -> dict:
        """Flush, fsync and publish the shard.

        Returns:
            The shard entry for the manifest: ``split, source, bin, idx, documents,
            tokens, sha256 {bin, idx}, bytes {bin, idx}``.
        """
        if self.entry is not None:
            return self.entry
        if not self._files:
            raise RuntimeError(f"shard '{self.relpath}' was aborted")
        size = self.bytes
        try:
            for k, f in self._files.items():
                f.flush()
                os.fsync(f.fileno())
                found = os.fstat(f.fileno()).st_size
                if found != size[k]:
                    raise RuntimeError(f"{self._tmp[k]} has {found} bytes after writing, expected {size[k]}")
                f.close()
            # idx first: a .bin in place always has its idx beside it
            os.replace(self._tmp["idx"], self._final["idx"])
            os.replace(self._tmp["bin"], self._final["bin"])
            fsync_dir(self._final["bin"].parent)
        except BaseException:
            self.abort()
            raise
        self._files = {}
        self.entry = {
            "split": self.split, "source": self.source,
            "bin": f"{self.relpath}.bin", "idx": f"{self.relpath}.idx",
            "documents": self.documents, "tokens": self.tokens,
            "sha256": {k: h.hexdigest() for k, h in self._hash.items()}, "bytes": size,
        }
        return self.entry

    def abort(self) -> None:
        """Close and delete the temporary files (no-op after :meth:`close`)."""
        if self.entry is not None:
            return
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        self._files = {}
        for p in self._tmp.values():
            p.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_relpath(relpath: str) -> None:
    p = PurePosixPath(relpath)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in relpath:
        raise ValueError(f"dataset paths must be relative POSIX paths inside the output directory, got {relpath!r}")


def list_files(out_dir: str | os.PathLike) -> list[str]:
    """Every file under ``out_dir`` as sorted relative POSIX paths, for the ``files`` map.

    Skips ``manifest.json`` and hidden names (``.x.tmp`` files of unfinished writes).
    """
    root = Path(out_dir)
    rels = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(r.as_posix() for r in rels
                  if r.as_posix() != MANIFEST_NAME and not any(part.startswith(".") for part in r.parts))


def known_hashes(shards: Iterable[dict]) -> dict[str, dict]:
    """``{relpath: {"bytes", "sha256"}}`` of shard entries, to pass as ``known`` to :func:`file_entries`."""
    return {s[k]: {"bytes": s["bytes"][k], "sha256": s["sha256"][k]} for s in shards for k in ("bin", "idx")}


def file_entries(out_dir: str | os.PathLike, relpaths: Iterable[str],
                 known: dict | None = None) -> dict[str, dict]:
    """Build the manifest's ``files`` map.

    Args:
        out_dir: dataset output directory.
        relpaths: files to list, relative POSIX paths (see :func:`list_files`).
        known: ``{relpath: {"bytes", "sha256"}}`` (or ``{relpath: sha256}``) already
            computed, e.g. by :class:`ShardWriter` (see :func:`known_hashes`); a file whose
            size on disk differs from a known ``bytes`` is hashed again.

    Returns:
        ``{relpath: {"bytes": int, "sha256": hex}}`` sorted by path.
    """
    known = known or {}
    files = {}
    for rel in sorted(relpaths):
        _check_relpath(rel)
        size = (Path(out_dir) / rel).stat().st_size
        k = known.get(rel)
        k = {"sha256": k} if isinstance(k, str) else (k or {})
        trusted = k.get("sha256") and k.get("bytes", size) == size
        files[rel] = {"bytes": size, "sha256": k["sha256"] if trusted else sha256_file(Path(out_dir) / rel)}
    return files


def compute_totals(shards: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per-split ``{"documents", "tokens"}`` sums of shard entries (``train`` and ``val`` always present)."""
    totals = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
    for s in shards:
        for key in ("documents", "tokens"):
            totals.setdefault(s["split"], {"documents": 0, "tokens": 0})[key] += s[key]
    return totals


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Write ``out_dir/manifest.json`` atomically as deterministic JSON.

    ``format`` and ``version`` are filled in when absent.
    """
    m = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest}
    if m["format"] != MANIFEST_FORMAT or m["version"] != MANIFEST_VERSION:
        raise ValueError(f"manifest format/version must be {MANIFEST_FORMAT!r}/{MANIFEST_VERSION}")
    if m.get("dtype") not in SHARD_DTYPES:
        raise ValueError(f"manifest dtype must be one of {SHARD_DTYPES}, got {m.get('dtype')!r}")
    atomic_write_text(Path(out_dir) / MANIFEST_NAME, dumps_json(m))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_manifest(m: Any, path: Path) -> None:
    """Raise UserError naming ``path`` and the key when the manifest is not usable."""
    fix = "the file is damaged or was not written by launch/preprocess.py; re-run preprocess to rewrite it"

    def bad(key: str, what: str) -> UserError:
        return UserError(f"'{path}': {key} {what}; {fix}")

    if not isinstance(m, dict):
        raise bad("the top level", "is not a JSON object")
    if m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"'{path}' is not a token-shard manifest (format {m.get('format')!r}, expected "
                        f"{MANIFEST_FORMAT!r}); point to the output directory of launch/preprocess.py")
    if m.get("version") != MANIFEST_VERSION:
        raise UserError(f"'{path}' has manifest version {m.get('version')!r} but this code reads version "
                        f"{MANIFEST_VERSION}; re-run launch/preprocess.py with this version of the pipeline")
    if m.get("dtype") not in SHARD_DTYPES:
        raise bad("dtype", f"is {m.get('dtype')!r}, expected one of {', '.join(SHARD_DTYPES)}")
    if not isinstance(m.get("shards"), list):
        raise bad("shards", "is missing or not a list")
    for i, s in enumerate(m["shards"]):
        s = s if isinstance(s, dict) else {}
        for key in ("split", "source", "bin", "idx"):
            if not isinstance(s.get(key), str):
                raise bad(f"shards[{i}].{key}", "is missing or not a string")
        for key in ("documents", "tokens"):
            if not _is_count(s.get(key)):
                raise bad(f"shards[{i}].{key}", "is missing or not a non-negative integer")
    if not isinstance(m.get("files"), dict):
        raise bad("files", "is missing or not an object")
    for rel, f in m["files"].items():
        if not isinstance(f, dict) or not _is_count(f.get("bytes")) or not isinstance(f.get("sha256"), str):
            raise bad(f"files[{rel!r}]", "needs integer 'bytes' and string 'sha256'")
    sources = m.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in sources):
        raise bad("sources", "must be a list of objects with a 'name'")


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """Read and structurally check ``out_dir/manifest.json``.

    Raises:
        UserError: no manifest, unparseable JSON, wrong format/version or missing keys.
    """
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"'{out_dir}' is not a preprocessed dataset (no {MANIFEST_NAME}); run "
                        f"launch/preprocess.py first or point to its output directory")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); the file is damaged; "
                        f"re-run launch/preprocess.py to rewrite it") from None
    _check_manifest(m, path)
    return m


def _idx_decreases_at(path: Path, count: int) -> int | None:
    """Index of the first entry smaller than its predecessor, or None (bounded memory)."""
    for start in range(0, count - 1, _IDX_CHUNK):
        # one entry of overlap with the next chunk
        chunk = np.fromfile(path, _IDX_DTYPE, count=min(_IDX_CHUNK + 1, count - start), offset=start * 8)
        bad = np.flatnonzero(chunk[1:] < chunk[:-1])
        if bad.size:
            return start + int(bad[0]) + 1
    return None


def verify(out_dir: str | os.PathLike, manifest: dict | None = None, thorough: bool = False) -> None:
    """Check a preprocessed dataset against its manifest.

    Fast: every listed file exists with its listed size; every shard's ``.bin`` holds
    ``tokens * itemsize`` bytes, its ``.idx`` ``(documents + 1) * 8`` bytes, starting with
    0 and ending with ``tokens``. Thorough additionally: sha256 of every listed file, and
    every ``.idx`` is non-decreasing.

    Args:
        out_dir: dataset output directory.
        manifest: the manifest (read from ``out_dir`` when None).
        thorough: also hash every file (reads the whole dataset).

    Raises:
        ShardIntegrityError: all problems found, at most one per file.
    """
    root = Path(out_dir)
    m = read_manifest(root) if manifest is None else manifest
    itemsize = np.dtype(m["dtype"]).itemsize
    problems: dict[str, str] = {}  # path -> first problem found for it
    sizes: dict[str, int] = {}  # relpath -> size on disk, for files that exist

    def flag(rel: str, msg: str) -> None:
        problems.setdefault(str(root / rel), msg)

    def check_size(rel: str, expected: int, why: str) -> bool:
        if rel not in sizes:
            try:
                _check_relpath(rel)
                sizes[rel] = (root / rel).stat().st_size
            except (ValueError, FileNotFoundError) as e:
                flag(rel, f"is missing (manifest.json lists it with {expected} bytes)"
                     if isinstance(e, FileNotFoundError) else "is listed with a path outside the dataset directory")
                return False
        if sizes[rel] != expected:
            flag(rel, f"has {sizes[rel]} bytes, expected {expected}{why}")
        return sizes[rel] == expected

    files = m["files"]
    hashes: dict[str, list[str]] = {}  # relpath -> expected sha256 (files map, shard entry)
    for rel, f in files.items():
        if check_size(rel, f["bytes"], " (size listed in manifest.json)"):
            hashes[rel] = [f["sha256"]]
    for s in m["shards"]:
        for kind, n, unit, width in (("bin", s["tokens"], "tokens", itemsize), ("idx", s["documents"] + 1, "offsets", 8)):
            if s[kind] not in files:
                flag(s[kind], "is a shard but is not listed in the 'files' of manifest.json (the manifest is incomplete)")
            elif check_size(s[kind], n * width, f" ({n} {unit} x {width} bytes)") and kind in (s.get("sha256") or {}):
                hashes.setdefault(s[kind], []).append(s["sha256"][kind])
        idx_path = root / s["idx"]
        if str(idx_path) not in problems:
            first, last = (int(np.fromfile(idx_path, _IDX_DTYPE, count=1, offset=8 * o)[0])
                           for o in (0, s["documents"]))  # 16 bytes read
            if first != 0:
                flag(s["idx"], f"starts with offset {first}, expected 0")
            elif last != s["tokens"]:
                flag(s["idx"], f"ends with offset {last}, expected {s['tokens']} (the shard's token count)")
            elif thorough:
                at = _idx_decreases_at(idx_path, s["documents"] + 1)
                if at is not None:
                    flag(s["idx"], f"decreases at entry {at} (offsets must be non-decreasing)")
    for rel, expected in hashes.items() if thorough else ():
        if str(root / rel) not in problems:
            found = sha256_file(root / rel)
            wrong = [e for e in expected if e != found]
            if wrong:
                flag(rel, f"has sha256 {found}, expected {wrong[0]}")
    if problems:
        raise ShardIntegrityError(list(problems.items()))


_verify = verify  # TokenDataset's ``verify`` argument shadows the function


class TokenDataset:
    """Read-only view of the shards of one split (optionally one source), memory-mapped.

    Shards are concatenated in manifest order. Maps are opened lazily and dropped when
    pickled, so an instance can be sent to DataLoader workers cheaply.

    Args:
        out_dir: dataset output directory (holding ``manifest.json``).
        split: ``"train"`` or ``"val"`` (any split present in the manifest).
        source: only this source's shards; None for all.
        verify: integrity check of the selected shards at construction: ``"none"``,
            ``"fast"`` (sizes and idx ends) or ``"thorough"`` (also sha256).

    Raises:
        UserError: no manifest, unknown split or source.
        ShardIntegrityError: the check failed.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train", source: str | None = None,
                 verify: Literal["none", "fast", "thorough"] = "fast"):
        if verify not in ("none", "fast", "thorough"):
            raise ValueError(f"verify must be 'none', 'fast' or 'thorough', got {verify!r}")
        self.out_dir, self.split, self.source = Path(out_dir), split, source
        self._manifest = m = read_manifest(self.out_dir)
        shards = m["shards"]
        splits = sorted({s["split"] for s in shards} | set(m.get("totals") or {}))
        if split not in splits:
            raise UserError(f"split {split!r} is not in dataset '{self.out_dir}'; "
                            f"available splits: {', '.join(splits)}")
        declared = [s["name"] for s in m.get("sources", [])]
        names = declared + sorted({s["source"] for s in shards} - set(declared))
        if source is not None and source not in names:
            raise UserError(f"source {source!r} is not in dataset '{self.out_dir}'; "
                            f"available sources: {', '.join(names)}")
        self.shards = [s for s in shards if s["split"] == split and (source is None or s["source"] == source)]
        self._sources = [n for n in names if n in {s["source"] for s in self.shards}]
        self._dtype = np.dtype(m["dtype"]).newbyteorder("<")
        # cumulative starts, length shards + 1: shard k holds global tokens [tok[k], tok[k+1])
        self._tok_starts = list(itertools.accumulate((s["tokens"] for s in self.shards), initial=0))
        self._doc_starts = list(itertools.accumulate((s["documents"] for s in self.shards), initial=0))
        self._maps: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.shards)
        if verify != "none":
            rels = {s[k] for s in self.shards for k in ("bin", "idx")}
            sub = {**m, "shards": self.shards, "files": {r: f for r, f in m["files"].items() if r in rels}}
            _verify(self.out_dir, sub, thorough=verify == "thorough")

    # -- pickling: maps are per process
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.shards)}

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return (f"TokenDataset('{self.out_dir}', split={self.split!r}{src}: {len(self.shards)} shards, "
                f"{self.num_documents} documents, {self.num_tokens} tokens, {self._dtype.name})")

    @property
    def num_tokens(self) -> int:
        return self._tok_starts[-1]

    @property
    def num_documents(self) -> int:
        return self._doc_starts[-1]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def sources(self) -> list[str]:
        """Names of the sources of the selected shards, in manifest order."""
        return list(self._sources)

    def _map(self, rel: str, dtype: np.dtype, count: int) -> np.ndarray:
        # re-checked here because verify="none" skips it and np.memmap's own error is cryptic
        path, expected = self.out_dir / rel, count * dtype.itemsize
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size} bytes"
            raise ShardIntegrityError([(str(path), f"{found}, expected {expected} bytes")])
        if count == 0:
            return np.empty(0, dtype)  # mmap cannot map an empty file
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) maps of selected shard ``k``, opened on first use."""
        if self._maps[k] is None:
            s = self.shards[k]
            self._maps[k] = (self._map(s["bin"], self._dtype, s["tokens"]),
                             self._map(s["idx"], _IDX_DTYPE, s["documents"] + 1))
        return self._maps[k]

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (0-based across the selected shards) as int64."""
        i = operator.index(i)
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range (dataset has {self.num_documents} documents)")
        k = bisect.bisect_right(self._doc_starts, i) - 1  # skips shards with 0 documents
        j = i - self._doc_starts[k]
        toks, idx = self._shard(k)
        return np.asarray(toks[int(idx[j]):int(idx[j + 1])], dtype=np.int64)

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated shards, as int64.

        Raises:
            IndexError: the range is not inside ``[0, num_tokens]``.
        """
        start, length = operator.index(start), operator.index(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range (dataset has {self.num_tokens} tokens)")
        out = np.empty(length, dtype=np.int64)
        k = bisect.bisect_right(self._tok_starts, start) - 1
        pos = 0
        while pos < length:
            lo = start + pos - self._tok_starts[k]
            n = min(length - pos, self._tok_starts[k + 1] - self._tok_starts[k] - lo)
            if n > 0:
                out[pos:pos + n] = self._shard(k)[0][lo:lo + n]
                pos += n
            k += 1
        return out

    def num_samples(self, seq_len: int) -> int:
        """Number of samples of ``seq_len`` tokens (+1 target token): ``(num_tokens - 1) // seq_len``."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return max(0, (self.num_tokens - 1) // seq_len)

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        """Sample ``i``: tokens ``[i * seq_len, (i + 1) * seq_len + 1)`` as int64, length ``seq_len + 1``.

        Consecutive samples overlap by one token (inputs ``x[:-1]``, targets ``x[1:]``).
        """
        i = operator.index(i)
        n = self.num_samples(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range ({n} samples of seq_len={seq_len})")
        return self.tokens(i * seq_len, seq_len + 1)

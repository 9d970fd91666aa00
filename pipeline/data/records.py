"""The one reader of JSONL and CSV/TSV records, shared by every stage that reads them.

:func:`read_records` streams the records of one file as :class:`Row` s, each with its
``file:line`` location: a JSON Lines file (one JSON object per line; blank lines skipped) or a
CSV/TSV file with a header row (one dict per row, quoted fields may hold newlines), plain or
``.gz``/``.zst`` compressed. Pre-processing (:mod:`pipeline.data.sources`), fine-tuning data
(:mod:`pipeline.data.sft`, :mod:`pipeline.data.classification`) and the evaluate stage read
through it, so a malformed line is found, named and skipped the same way everywhere.

A bad record (malformed JSON, invalid UTF-8 where it is refused, a JSON value that is not an
object, a CSV row with the wrong number of fields) either stops the read with a
:class:`~pipeline.errors.UserError` that names ``file:line`` and the caller's fix
(``bad_records="fail"``) or is counted in ``stats["bad_records"]`` and skipped (``"skip"``).
What a caller does with a good record (which fields it needs) stays with the caller.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Literal, NamedTuple

FORMATS = ("jsonl", "csv", "tsv")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
"""File extension -> record format (a ``.json`` file is read as JSON Lines)."""
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
"""Compressed-file extension -> codec (the name pyarrow uses too)."""
_IO_BUFFER = 1 << 20  # bytes of read buffer per open file
_ZSTD_MAX_WINDOW = 1 << 31  # accept files written with `zstd --long` (window up to 2 GiB)
_CSV_FIELD_LIMIT = (1 << 31) - 1  # characters; Python's default (128 Ki) is shorter than many documents
_BOM = b"\xef\xbb\xbf"
_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


class Row(NamedTuple):
    """One record as read."""

    where: str
    """``file:line`` of the record (its first line, for a CSV row spanning several)."""
    index: int
    """0-based record index in the file, the unit of ``start``: the line for JSONL (blank and bad
    lines count), the well-formed data row for CSV/TSV."""
    record: Any
    """The parsed JSON value (a dict unless ``objects=False``), or the CSV row as a dict."""


@dataclass(frozen=True)
class BadRecord:
    """Why one record was refused."""

    where: str
    """``file:line``."""
    kind: Literal["json", "utf8", "not_object", "columns", "csv"]
    detail: str
    """What the parser said (``json``, ``csv``), the JSON kind found (``not_object``), the field
    counts (``columns``)."""

    def __str__(self) -> str:
        return {"json": f"malformed JSON ({self.detail})", "utf8": "not UTF-8",
                "not_object": f"record is {self.detail}, not a JSON object",
                "columns": self.detail, "csv": f"malformed CSV ({self.detail})"}[self.kind]


def json_kind(value: Any) -> str:
    """``an object``, ``an array``, ``a string``, ``a number``, ...: a JSON value's kind, for messages."""
    return _KINDS.get(type(value), "a number")


def split_ext(name: str) -> tuple[str | None, str | None]:
    """``(format or None, compression or None)`` of a file name by its extensions."""
    low, comp = name.lower(), None
    for ext, c in COMPRESSIONS.items():
        if low.endswith(ext):
            comp, low = c, low[: -len(ext)]
            break
    return EXTENSIONS.get(os.path.splitext(low)[1]), comp


def open_binary(path: str | os.PathLike, compression: str | None) -> io.BufferedIOBase:
    """A buffered binary stream of the decompressed bytes of ``path`` (iterable by lines)."""
    if compression is None:
        return open(path, "rb", buffering=_IO_BUFFER)
    if compression == "gzip":
        return gzip.open(path, "rb")  # handles multi-member files
    import zstandard

    raw = open(path, "rb")
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        return io.BufferedReader(dctx.stream_reader(raw, read_across_frames=True, closefd=True), _IO_BUFFER)  # type: ignore[arg-type]
    except BaseException:
        raw.close()
        raise


def read_records(path: str | os.PathLike, fmt: str | None = None, *, compression: str | None | Literal["auto"] = "auto",
                 start: int = 0, bad_records: Literal["fail", "skip"] = "fail",
                 fix: str | Callable[[BadRecord], str] = "Fix the record, or set bad_records=skip to skip and count such records.",
                 stats: dict[str, int] | None = None, utf8: Literal["replace", "strict"] = "replace",
                 objects: bool = True, on_header: Callable[[list[str]], None] | None = None) -> Iterator[Row]:
    """Stream the records of one JSONL or CSV/TSV file, in file order, in bounded memory.

    Args:
        path: the file.
        fmt: ``jsonl``, ``csv`` or ``tsv``; None: by extension (:data:`EXTENSIONS`).
        compression: ``gzip``, ``zstd`` or None; ``auto``: by extension (``.gz``, ``.zst``).
        start: skip the first ``start`` records (see :attr:`Row.index`), neither counted nor
            reported: a resumed read ends with the statistics of an uninterrupted one.
        bad_records: ``fail`` raises on a bad record; ``skip`` counts and skips it.
        fix: the sentence after ``"{where}: {problem}. "`` in the error, or a function making
            the whole message from the :class:`BadRecord`.
        stats: counters updated in place (missing keys created): ``records`` (raw records read,
            bad ones included), ``bad_records`` (skipped), ``utf8_replaced`` (records whose
            invalid UTF-8 became U+FFFD).
        utf8: ``replace`` invalid UTF-8 by U+FFFD (and count the record), or ``strict``: such a
            record is bad.
        objects: a JSON value that is not an object is a bad record (False: yield any value).
        on_header: CSV/TSV only: called with the header's column names before the first row
            (also for a file without data rows), e.g. to check that a column exists.

    Yields:
        :class:`Row` ``(where, index, record)``.

    Raises:
        UserError: a bad record under ``bad_records=fail``; an unknown extension (``fmt=None``);
            an unreadable or damaged (compressed) file.
    """
    path = os.fspath(path)
    detected, comp = split_ext(os.path.basename(path))
    fmt = fmt or detected
    if fmt not in FORMATS:
        from pipeline.errors import UserError

        raise UserError(f"'{path}' has an unsupported extension; expected .jsonl, .json, .csv or .tsv (optionally "
                        "followed by .gz or .zst)")
    compression = comp if compression == "auto" else compression
    stats = {} if stats is None else stats
    for key in ("records", "bad_records", "utf8_replaced"):
        stats.setdefault(key, 0)

    def bad(problem: BadRecord) -> None:
        if bad_records != "skip":
            from pipeline.errors import UserError

            raise UserError(fix(problem) if callable(fix) else f"{problem.where}: {problem}. {fix}")
        stats["bad_records"] += 1

    reader = _read_jsonl if fmt == "jsonl" else _read_csv
    try:
        yield from reader(path, fmt, compression, start, bad, stats, utf8 == "strict", objects, on_header)
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(path, compression or fmt, e) from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":  # zstandard's, without importing it for every file
            raise _unreadable(path, compression or fmt, e) from None
        raise


def _unreadable(path: str, what: str, e: Exception) -> Exception:
    from pipeline.errors import UserError

    return UserError(f"{path}: cannot read ({type(e).__name__}: {e}). Check that the file exists, is readable "
                     f"and is a complete, valid {what} file (re-create or re-download it).")


def _read_jsonl(path: str, fmt: str, compression: str | None, start: int, bad: Callable, stats: dict,
                strict: bool, objects: bool, on_header: Any) -> Iterator[Row]:
    loads, row, prefix = json.loads, tuple.__new__, f"{path}:"  # tuple.__new__: half the cost of Row(...) per record
    with open_binary(path, compression) as fh:
        lines: Iterator[bytes] = islice(fh, start, None)  # resume: lines before start are neither decoded nor parsed
        if start == 0 and (line0 := fh.readline()):
            lines = chain([line0[3:] if line0.startswith(_BOM) else line0], lines)
        for idx, line in enumerate(lines, start):
            if line.isspace() or not line:
                continue  # a blank line has a line number but is no record
            stats["records"] += 1
            try:
                s = line.decode()
            except UnicodeDecodeError:
                if strict:
                    bad(BadRecord(f"{path}:{idx + 1}", "utf8", ""))
                    continue
                s = line.decode("utf-8", "replace")
                stats["utf8_replaced"] += 1
            try:
                obj = loads(s)
            except ValueError as e:
                detail = f"{e.msg}: column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                bad(BadRecord(f"{path}:{idx + 1}", "json", detail))
                continue
            if objects and type(obj) is not dict:
                bad(BadRecord(f"{path}:{idx + 1}", "not_object", json_kind(obj)))
                continue
            yield row(Row, (prefix + str(idx + 1), idx, obj))


def _read_csv(path: str, fmt: str, compression: str | None, start: int, bad: Callable, stats: dict,
              strict: bool, objects: bool, on_header: Callable[[list[str]], None] | None) -> Iterator[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # surrogateescape keeps invalid bytes apart from real U+FFFD, so each record is judged alone
    with io.TextIOWrapper(open_binary(path, compression), encoding="utf-8-sig", errors="surrogateescape",
                          newline="") as text:
        rows = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
        try:
            header = next(rows)
        except StopIteration:
            header = None  # an empty file: no columns, no rows
        except csv.Error as e:
            from pipeline.errors import UserError

            raise UserError(f"{path}:1: the header row is malformed CSV ({e}); fix the file") from None
        if header is None:
            return
        header = [_fix_utf8(h, False)[0] for h in header]
        if on_header is not None:
            on_header(header)
        good, end = 0, rows.line_num  # data rows read; the line the last row ended on
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                where, end = f"{path}:{end + 1}", rows.line_num
                if good >= start:
                    stats["records"] += 1
                    bad(BadRecord(where, "csv", str(e)))
                continue
            where, end = f"{path}:{end + 1}", rows.line_num
            if not row:
                continue  # a blank line
            if good < start:  # resume: rows before the start point are not counted again
                good += len(row) == len(header)
                continue
            stats["records"] += 1
            if len(row) != len(header):
                bad(BadRecord(where, "columns", f"expected {len(header)} columns, got {len(row)}"))
                continue
            replaced = False
            if not all(map(str.isascii, row)):
                fixed = [_fix_utf8(v, strict) for v in row]
                if any(f is None for f, _ in fixed):
                    bad(BadRecord(where, "utf8", ""))
                    continue
                row, replaced = [f for f, _ in fixed], any(r for _, r in fixed)
            stats["utf8_replaced"] += replaced
            yield Row(where, good, dict(zip(header, row)))
            good += 1


def _fix_utf8(value: str, strict: bool) -> tuple[str | None, bool]:
    """``(value with invalid bytes as U+FFFD, whether any were)``; ``(None, True)`` when ``strict``."""
    try:
        value.encode()
        return value, False
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
        return (None, True) if strict else (value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True)

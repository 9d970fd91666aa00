"""Streaming corpus readers for the preprocess stage.

:func:`resolve_files` expands a source (a file, glob or directory) into ordered
:class:`InputFile` s; :func:`iter_records` streams ``(text, file_index, record_index)``
from them in bounded memory, resumable at any ``(file_index, record_index)``. Formats:
jsonl; json (a top-level array, parsed whole -- the one format besides txt in file unit
held in memory at once -- or JSON Lines if it starts with ``{``); csv; parquet; txt;
hf_disk (``save_to_disk`` output); ``.gz``/``.zst`` for all but parquet and hf_disk. JSONL
and CSV are read here, not by ``datasets``' loaders: those can neither name the file and
line of a malformed record nor skip it; JSON Lines and CSV records come from the one record
reader, :func:`pipeline.data.records.read_records`.

``stats`` (cumulative across resumes): ``records`` raw records read, ``bad_records``
skipped under ``bad_records=skip``, ``utf8_replaced`` records whose invalid UTF-8 became
U+FFFD, ``files`` files opened from their start. Records before a resume point are not
counted again, nor is a file resumed in its middle, so a resumed run ends with the
statistics of an uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import zstandard

from pipeline.data.records import COMPRESSIONS, json_kind, open_binary, read_records
from pipeline.errors import UserError

FORMATS = ("auto", "txt", "jsonl", "json", "parquet", "csv", "hf_disk")
STAT_KEYS = ("records", "bad_records", "utf8_replaced", "files")
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".csv": "csv", ".parquet": "parquet"}
_SUPPORTED = ".txt .jsonl .json .csv (each optionally followed by .gz or .zst), .parquet"
_NAME_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ARROW_BATCH = 1024  # rows per parquet / hf_disk batch
_BOM = b"\xef\xbb\xbf"
_FIX_FIELD = "Set this source's text_field to the {} that holds the text."
_FIX_RECORD = "Fix the record, or set bad_records=skip to skip and count such records."
_FIX_ROW = "Fix the row (quote fields holding commas, quotes or newlines), or set bad_records=skip to skip and count such rows."
Stats = dict[str, int]
Records = Iterator[tuple[str, int, int]]


@dataclass
class SourceConfig:
    path: str = ""
    """Input: a file, a glob (e.g. data/*.jsonl.gz) or a directory (searched recursively,
    hidden entries skipped). Required."""
    name: str = ""
    """Short name used in shard file names and the manifest; "" derives it from path (file
    stem or directory name, sanitized to letters, digits, _ . -). Unique among sources."""
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "csv", "hf_disk"] = "auto"
    """auto: by extension (.txt .jsonl .json .csv, each optionally + .gz or .zst; .parquet), or
    hf_disk for a directory written by datasets' save_to_disk. Set explicitly, it applies to
    every file (a directory then contributes all its non-hidden files)."""
    text_field: str = "text"
    """Field (jsonl/json) or column (parquet/csv/hf_disk) holding the document text."""
    txt_unit: Literal["file", "paragraph"] = "file"
    """For txt: one document per file, or one per paragraph (lines up to a blank line)."""
    split: str = ""
    """For a saved DatasetDict (hf_disk): the split to read; "" means train."""
    weight: float = 1.0
    """Sampling weight of this source in training, relative to the other sources (recorded in
    the manifest; no data is duplicated)."""

    def check(self) -> list[tuple[str, str]]:
        """Problems with these values as ``(field, problem and fix)`` pairs."""
        problems: list[tuple[str, str]] = []
        if not self.path:
            problems.append(("path", "is empty; set it to a file, a glob (e.g. data/*.jsonl.gz) or a directory"))
        if self.name and not _NAME_OK.fullmatch(self.name):
            problems.append(("name", f"'{self.name}' may only use letters, digits, _ . - and must not start "
                                     "with . or -; pick another name, or name='' to derive it from the path"))
        if self.format not in FORMATS:
            problems.append(("format", f"'{self.format}' is not a format; use one of {', '.join(FORMATS)}"))
        if self.txt_unit not in ("file", "paragraph"):
            problems.append(("txt_unit", f"'{self.txt_unit}' is not a unit; use file or paragraph"))
        if not self.text_field:
            problems.append(("text_field", "is empty; set it to the field/column that holds the text (e.g. text)"))
        if self.split and self.format not in ("auto", "hf_disk"):
            problems.append(("split", f"only applies to hf_disk sources, not format {self.format}; set split=''"))
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            problems.append(("weight", f"must be a finite number > 0 (got {w!r}); e.g. weight=1.0"))
        return problems


@dataclass(frozen=True)
class InputFile:
    """One input of a source, in read order."""

    path: str  # file path, or directory for hf_disk
    format: str  # txt | jsonl | json | parquet | csv | hf_disk
    compression: str | None  # "gzip" | "zstd" | None


def _split_ext(name: str) -> tuple[str | None, str | None, str]:
    """``(format or None, compression or None, name without those extensions)``."""
    low, comp = name.lower(), None
    for ext, c in COMPRESSIONS.items():
        if low.endswith(ext):
            comp, low, name = c, low[: -len(ext)], name[: -len(ext)]
            break
    for ext, fmt in _EXT_FORMAT.items():
        if low.endswith(ext):
            return fmt, comp, name[: -len(ext)]
    return None, comp, name


def source_name(cfg: SourceConfig) -> str:
    """The source's name: ``cfg.name``, or one derived from ``cfg.path``.

    The file stem (``data/wiki.jsonl.gz`` -> ``wiki``), the directory name, or for a glob its
    last component without wildcards (``data/wiki_*.jsonl`` -> ``wiki``) or, if that leaves
    nothing, the directory above (``data/*.jsonl`` -> ``data``); sanitized to
    ``[A-Za-z0-9_.-]``. Only ``.``/``..`` are resolved against the working directory.
    """
    if cfg.name:
        return cfg.name
    sanitize = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._-")  # noqa: E731
    parts = [p for p in os.path.expanduser(cfg.path).replace("\\", "/").split("/") if p]
    while parts and parts[-1] not in (".", ".."):
        stem = sanitize(_split_ext(re.sub(r"\[[^\]]*\]|[*?]", "", parts.pop()))[2])
        if stem:
            return stem
    if parts:  # ends in . or ..: the name of the directory it designates
        return sanitize(os.path.basename(os.path.abspath("/".join(parts)))) or "source"
    return "source"


def _is_hf_dir(d: str) -> bool:
    """Whether ``d`` was written by ``datasets`` ``Dataset/DatasetDict.save_to_disk``."""
    isfile, join = os.path.isfile, os.path.join
    return isfile(join(d, "dataset_dict.json")) or (isfile(join(d, "state.json")) and isfile(join(d, "dataset_info.json")))


def _file_input(path: str, fmt: str) -> InputFile:
    det, comp, _ = _split_ext(os.path.basename(path))
    if fmt == "auto":
        if det is None:
            raise UserError(f"'{path}' has an unsupported extension; supported are {_SUPPORTED}, or a directory "
                            f"written by datasets' save_to_disk. Rename the file, or set this source's format "
                            f"(one of {', '.join(FORMATS[1:])}) to read it as that format.")
        fmt = det
    elif fmt == "hf_disk":
        raise UserError(f"'{path}' is a file, but format hf_disk reads a directory written by datasets' "
                        f"save_to_disk; point path at that directory or set format to the file's format")
    if fmt == "parquet" and comp:
        raise UserError(f"'{path}': parquet files cannot be .gz/.zst compressed as a whole (parquet compresses "
                        f"internally); decompress the file, or set format if it is not parquet")
    return InputFile(path, fmt, comp)


def _expand_dir(d: str, fmt: str) -> list[InputFile]:
    """Inputs under directory ``d``, sorted by relative path (deterministic)."""
    hf = fmt in ("auto", "hf_disk")
    if hf and _is_hf_dir(d):
        return [InputFile(d, "hf_disk", None)]
    found: list[tuple[str, InputFile]] = []
    ignored: list[str] = []
    visited: set[str] = set()
    for root, dirs, names in os.walk(d, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # reached again through a symlink: no loops, no duplicates
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = [n for n in dirs if not n.startswith(".")]
        for dn in list(dirs):
            if hf and _is_hf_dir(full := os.path.join(root, dn)):  # a saved dataset is one input
                found.append((os.path.relpath(full, d), InputFile(full, "hf_disk", None)))
                dirs.remove(dn)
        for fn in names if fmt != "hf_disk" else ():
            rel = os.path.relpath(os.path.join(root, fn), d)
            if fn.startswith("."):
                continue
            if fmt == "auto" and _split_ext(fn)[0] is None:
                ignored.append(rel)
            else:
                found.append((rel, _file_input(os.path.join(root, fn), fmt)))
    if not found:
        what = "no directory written by datasets' save_to_disk" if fmt == "hf_disk" else f"no input files ({_SUPPORTED})"
        extra = f"; ignored {len(ignored)} other file(s), e.g. '{sorted(ignored)[0]}'" if ignored else ""
        raise UserError(f"directory '{d}' contains {what}{extra}. Point this source's path at the data, "
                        f"or set its format to read files with other extensions.")
    found.sort(key=lambda kv: kv[0].replace(os.sep, "/"))
    return [f for _, f in found]


def resolve_files(cfg: SourceConfig) -> list[InputFile]:
    """Expand ``cfg.path`` into the ordered list of inputs to read.

    A file is itself; a glob gives its matches in sorted order (directories among them
    expanded in place); a directory written by ``save_to_disk`` is one ``hf_disk`` input;
    any other directory is searched recursively (hidden entries skipped) for files with a
    supported extension (every file if ``cfg.format`` is set) and saved datasets, sorted by
    relative path. The order is deterministic: resumes rely on it.

    Raises:
        UserError: nothing matches, a directory holds no inputs, or an extension is not
            supported under ``format: auto``.
    """
    if not cfg.path:
        raise UserError("path is empty; set it to a file, a glob (e.g. data/*.jsonl.gz) or a directory")
    path = os.path.expanduser(cfg.path)
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
    else:
        matches = [path] if os.path.exists(path) else []
    if not matches:
        raise UserError(f"no input matches '{cfg.path}'; check this source's path (a file, a glob such as "
                        f"data/*.jsonl.gz, or a directory; relative paths start at {os.getcwd()})")
    out: list[InputFile] = []
    seen: set[str] = set()
    for m in matches:
        for inp in _expand_dir(m, cfg.format) if os.path.isdir(m) else [_file_input(m, cfg.format)]:
            if (key := os.path.normpath(inp.path)) not in seen:  # `**` lists a file and its directory
                seen.add(key)
                out.append(inp)
    return out


# ---------------------------------------------------------------------------- reading


def _bad(where: str, problem: str, skip: bool, stats: Stats) -> None:
    """Count a bad record under ``skip``, else raise the error that names it."""
    if not skip:
        raise UserError(f"{where}: {problem}. {_FIX_RECORD}")
    stats["bad_records"] += 1


def _object_problem(obj: Any, field: str, where: str, first: bool) -> str:
    """Why a parsed JSON value is not a usable record; raises if ``text_field`` looks wrong."""
    if type(obj) is not dict:
        return f"record is {json_kind(obj)}, not a JSON object"
    if field in obj:
        return f"field '{field}' is {json_kind(obj[field])}, not a string"
    fields = ", ".join(list(obj)[:20]) + (", ..." if len(obj) > 20 else "") or "none"
    if first:  # the first object of a file lacks the field: a config error, whatever the policy
        raise UserError(f"{where}: no field '{field}' (fields: {fields}). {_FIX_FIELD.format('field')}")
    return f"no field '{field}' (fields: {fields})"


def _decode(data: bytes, stats: Stats) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        stats["utf8_replaced"] += 1
        return data.decode("utf-8", "replace")


def _read_jsonl(inp: InputFile, fi: int, r: int, cfg: SourceConfig, skip: bool, stats: Stats) -> Records:
    field, path = cfg.text_field, inp.path
    first = r == 0  # the first object of a file must have the field (else text_field is wrong)
    stats["files"] += r == 0
    for where, idx, obj in read_records(path, "jsonl", compression=inp.compression, start=r,
                                        bad_records="skip" if skip else "fail", fix=_FIX_RECORD, stats=stats):
        text = obj.get(field)
        if type(text) is str:
            first = False
            yield text, fi, idx
            continue
        problem = _object_problem(obj, field, where, first)
        first = False
        _bad(where, problem, skip, stats)


def _read_json(inp: InputFile, fi: int, r: int, cfg: SourceConfig, skip: bool, stats: Stats) -> Records:
    with open_binary(inp.path, inp.compression) as fh:  # the first non-whitespace byte tells an array from JSON Lines
        head = fh.read(4096)
        head = head[3:] if head.startswith(_BOM) else head
        while head and not head.lstrip():  # long leading whitespace (rare)
            head = fh.read(1 << 16)
    lead = head.lstrip()[:1]
    if lead != b"[":
        if lead not in (b"{", b""):
            raise UserError(f"{inp.path}: neither a JSON array nor JSON Lines (starts with {lead!r}); "
                            f"set this source's format to the file's real format")
        yield from _read_jsonl(inp, fi, r, cfg, skip, stats)
        return
    with open_binary(inp.path, inp.compression) as fh:  # a top-level array is parsed whole: it must fit in memory
        data = fh.read()
    stats["files"] += r == 0
    try:
        s, replaced = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        s, replaced = data.decode("utf-8-sig", "replace"), True  # counted per element below
    del data
    try:
        arr = json.loads(s)
    except ValueError as e:
        detail = f"{e.msg}: line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UserError(f"{inp.path}: malformed JSON ({detail}). A JSON array is parsed as a whole, so bad_records=skip "
                        f"cannot skip this; fix the file, or convert it to JSON Lines (one object per line).") from None
    del s
    field, first = cfg.text_field, r == 0
    for idx in range(r, len(arr)):
        obj = arr[idx]
        stats["records"] += 1
        if type(obj) is dict and type(text := obj.get(field)) is str:
            first = False
            if replaced and "\ufffd" in text:  # where the file's invalid bytes landed (approximately)
                stats["utf8_replaced"] += 1
            yield text, fi, idx
            continue
        problem = _object_problem(obj, field, f"{inp.path}: element {idx}", first)
        first = first and type(obj) is not dict
        _bad(f"{inp.path}: element {idx}", problem, skip, stats)


def _read_txt(inp: InputFile, fi: int, r: int, cfg: SourceConfig, skip: bool, stats: Stats) -> Records:
    if cfg.txt_unit == "file":
        if r == 0:  # else the file's one record was read before the resume point
            with open_binary(inp.path, inp.compression) as fh:
                data = fh.read()  # a document is the whole file
            stats["files"] += 1
            stats["records"] += 1
            yield _decode(data, stats), fi, 0
        return
    with open_binary(inp.path, inp.compression) as fh:
        stats["files"] += r == 0
        para: list[bytes] = []
        pidx = 0
        for line in chain(fh, [b"\n"]):  # the sentinel blank line ends the last paragraph
            if not line.isspace():
                para.append(line)
                continue
            if not para:
                continue
            if pidx >= r:  # paragraphs before the resume point are neither decoded nor counted
                data = b"".join(para)
                if b"\r\n" in data:
                    data = data.replace(b"\r\n", b"\n")  # a CR before LF is part of the line terminator
                stats["records"] += 1
                yield _decode(data[:-1] if data.endswith(b"\n") else data, stats), fi, pidx
            para = []
            pidx += 1


def _check_text_type(tp: Any, where: str, field: str) -> None:
    import pyarrow as pa

    t = pa.types
    tp = tp.value_type if t.is_dictionary(tp) else tp
    if not any(f(tp) for f in (t.is_string, t.is_large_string, t.is_string_view,
                               t.is_binary, t.is_large_binary, t.is_binary_view)):
        raise UserError(f"{where}: column '{field}' has type {tp}, not text. {_FIX_FIELD.format('column')}")


def _py_values(arr: Any) -> list:
    """Values of a text/binary arrow array: str (valid UTF-8), bytes (to decode) or None."""
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:  # parquet does not validate UTF-8: hand the bytes over, to count
        binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}
        return arr.view(binary[arr.type]).to_pylist()


def _rows(arrays: Iterator[Any], row: int, r: int, fi: int, where: str, field: str, skip: bool, stats: Stats) -> Records:
    """Yield the rows >= ``r`` of consecutive arrow arrays whose first row is number ``row``."""
    for arr in arrays:
        if row + len(arr) <= r:
            row += len(arr)  # wholly before the resume point
            continue
        if row < r:
            arr, row = arr.slice(r - row), r
        for v in _py_values(arr):
            stats["records"] += 1
            if type(v) is not str:
                if v is None:
                    _bad(f"{where}: row {row} (0-based)", f"column '{field}' is null", skip, stats)
                    row += 1
                    continue
                try:
                    v = v.decode()
                except UnicodeDecodeError:
                    v = v.decode("utf-8", "replace")
                    stats["utf8_replaced"] += 1
            yield v, fi, row
            row += 1


def _read_parquet(inp: InputFile, fi: int, r: int, cfg: SourceConfig, skip: bool, stats: Stats) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = cfg.text_field
    try:
        pf = pq.ParquetFile(inp.path)
    except pa.ArrowInvalid as e:
        raise UserError(f"{inp.path}: not a readable parquet file ({e}); re-create it, or set this source's "
                        f"format if it is another format") from None
    try:
        names = pf.schema_arrow.names
        if field not in names:
            raise UserError(f"{inp.path}: no column '{field}' (columns: {', '.join(names)}). {_FIX_FIELD.format('column')}")
        _check_text_type(pf.schema_arrow.field(field).type, inp.path, field)
        stats["files"] += r == 0
        groups, row = [], 0  # resume: start at the row group holding row r, skipping those before unread
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n <= r and not groups:
                row += n
            else:
                groups.append(g)
        if groups:
            batches = pf.iter_batches(batch_size=_ARROW_BATCH, row_groups=groups, columns=[field])
            yield from _rows((b.column(0) for b in batches), row, r, fi, inp.path, field, skip, stats)
    except pa.ArrowInvalid as e:  # a corrupt page
        raise UserError(f"{inp.path}: cannot read the parquet data ({e}); re-create the file") from None
    finally:
        pf.close()


def _read_csv(inp: InputFile, fi: int, r: int, cfg: SourceConfig, skip: bool, stats: Stats) -> Records:
    field, path = cfg.text_field, inp.path

    def check_header(header: list[str]) -> None:
        if field not in header:
            raise UserError(f"{path}: no column '{field}' (header: {', '.join(header)}). {_FIX_FIELD.format('column')}")

    stats["files"] += r == 0
    for _, idx, row in read_records(path, "csv", compression=inp.compression, start=r, bad_records="skip" if skip else "fail",
                                    fix=_FIX_ROW, stats=stats, on_header=check_header):
        yield row[field], fi, idx


def _read_hf_disk(inp: InputFile, fi: int, r: int, cfg: SourceConfig, skip: bool, stats: Stats) -> Records:
    import datasets

    field = cfg.text_field
    try:
        ds = datasets.load_from_disk(inp.path)
    except (OSError, ValueError) as e:
        raise UserError(f"{inp.path}: cannot load the saved dataset ({e}); re-create it with save_to_disk") from None
    where = inp.path
    if isinstance(ds, datasets.DatasetDict):
        split = cfg.split or "train"
        if split not in ds:
            raise UserError(f"{inp.path}: the saved DatasetDict has no split '{split}' (splits: {', '.join(ds)}); "
                            f"set this source's split to one of them")
        ds, where = ds[split], f"{inp.path} [{split}]"
    elif cfg.split:
        raise UserError(f"{inp.path}: a single saved Dataset has no splits, but split='{cfg.split}' is set; set split=''")
    if field not in ds.column_names:
        raise UserError(f"{where}: no column '{field}' (columns: {', '.join(ds.column_names)}). {_FIX_FIELD.format('column')}")
    _check_text_type(ds.data.schema.field(field).type, where, field)
    stats["files"] += r == 0
    n = len(ds)
    if r >= n:
        return
    ds = ds.select_columns([field])
    if r:
        ds = ds.select(range(r, n))  # a contiguous range: a zero-copy slice, rows before r are not read
    tables = ds.with_format("arrow").iter(batch_size=_ARROW_BATCH)
    chunks = (c for t in tables for c in t.column(0).chunks)
    yield from _rows(chunks, r, r, fi, where, field, skip, stats)


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "txt": _read_txt,
            "parquet": _read_parquet, "csv": _read_csv, "hf_disk": _read_hf_disk}


def iter_records(files: list[InputFile], cfg: SourceConfig, *, start: tuple[int, int] = (0, 0),
                 bad_records: Literal["fail", "skip"] = "fail", stats: dict[str, int]) -> Iterator[tuple[str, int, int]]:
    """Stream the documents of ``files`` in order, in bounded memory.

    Args:
        files: the source's inputs, from :func:`resolve_files`.
        cfg: the source config (``text_field``, ``txt_unit``, ``split``).
        start: ``(file_index, record_index)`` to resume at: earlier files are not opened,
            and earlier records of that file are skipped without being parsed or counted.
        bad_records: ``fail`` raises on a malformed record; ``skip`` counts and skips it.
        stats: counters updated in place (keys created if missing): ``records``,
            ``bad_records``, ``utf8_replaced``, ``files`` (see the module docstring).

    Yields:
        ``(text, file_index, record_index)``; ``record_index`` is the 0-based raw record
        within its file: JSONL line (blank lines counted, not yielded), JSON array element,
        txt paragraph (0 in file unit), or csv/parquet/hf_disk row. Text is not cleaned;
        empty documents are yielded.

    Raises:
        UserError: an unreadable/corrupt file, a missing text field or column, or a bad
            record under ``bad_records=fail`` -- naming the file and line/row.
    """
    f0, r0 = start
    if bad_records not in ("fail", "skip") or f0 < 0 or r0 < 0:
        raise ValueError(f"bad_records must be fail or skip ({bad_records!r}), start non-negative ({start!r})")
    skip = bad_records == "skip"
    for key in STAT_KEYS:
        stats.setdefault(key, 0)
    for fi in range(f0, len(files)):
        inp = files[fi]
        try:
            yield from _READERS[inp.format](inp, fi, r0 if fi == f0 else 0, cfg, skip, stats)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise UserError(f"{inp.path}: cannot read ({type(e).__name__}: {e}). Check that the file exists, is readable "
                            f"and is a complete, valid {inp.compression or inp.format} file (re-create or re-download it).") from None

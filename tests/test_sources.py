from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.data.sources import InputFile, SourceConfig, iter_records, resolve_files, source_name
from pipeline.errors import UserError


def read_all(cfg: SourceConfig, start=(0, 0), bad_records="fail", stats=None):
    stats = {} if stats is None else stats
    return list(iter_records(resolve_files(cfg), cfg, start=start, bad_records=bad_records, stats=stats)), stats


def texts(records):
    return [t for t, _, _ in records]


def write_jsonl(path, objs_or_lines, compress=None):
    lines = [o if isinstance(o, (str, bytes)) else json.dumps(o) for o in objs_or_lines]
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":  # two frames: readers must continue across frames
        half = len(data) // 2
        c = zstandard.ZstdCompressor()
        data = c.compress(data[:half]) + c.compress(data[half:])
    path.write_bytes(data)
    return str(path)


DOCS = [{"text": "alpha", "id": 1}, {"text": "beta\nline two", "id": 2}, {"text": "", "id": 3}, {"text": "ünïcode ✓"}]


# ---------------------------------------------------------------------------- config


def test_check():
    assert SourceConfig(path="a.jsonl").check() == []
    assert [k for k, _ in SourceConfig().check()] == ["path"]
    for w in (0.0, -1.0, float("nan"), float("inf")):
        assert [k for k, _ in SourceConfig(path="a", weight=w).check()] == ["weight"]
    assert [k for k, _ in SourceConfig(path="a", name="bad name/x").check()] == ["name"]
    assert [k for k, _ in SourceConfig(path="a", name=".hidden").check()] == ["name"]
    assert [k for k, _ in SourceConfig(path="a", text_field="").check()] == ["text_field"]
    assert [k for k, _ in SourceConfig(path="a", format="xml").check()] == ["format"]  # type: ignore[arg-type]
    assert [k for k, _ in SourceConfig(path="a", format="jsonl", split="test").check()] == ["split"]
    assert SourceConfig(path="a", format="hf_disk", split="test", name="ok-1.v2").check() == []


def test_source_name():
    assert source_name(SourceConfig(path="data/wiki.jsonl.gz")) == "wiki"
    assert source_name(SourceConfig(path="data/Books Corpus.v2.txt")) == "Books_Corpus.v2"
    assert source_name(SourceConfig(path="data/code/")) == "code"
    assert source_name(SourceConfig(path="data/*.jsonl.gz")) == "data"
    assert source_name(SourceConfig(path="data/wiki_*.jsonl")) == "wiki"
    assert source_name(SourceConfig(path="data/shard[0-9].parquet")) == "shard"
    assert source_name(SourceConfig(path="x.jsonl", name="given")) == "given"
    assert source_name(SourceConfig(path=".")) == os.path.basename(os.getcwd()).strip("._-") or "source"


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("compress", [None, "gz", "zst"])
def test_jsonl_formats(tmp_path, compress):
    ext = {None: "", "gz": ".gz", "zst": ".zst"}[compress]
    lines = [DOCS[0], "", DOCS[1], "   ", DOCS[2], DOCS[3]]
    path = write_jsonl(tmp_path / f"a.jsonl{ext}", lines, compress)
    cfg = SourceConfig(path=path)
    assert resolve_files(cfg) == [InputFile(path, "jsonl", {None: None, "gz": "gzip", "zst": "zstd"}[compress])]
    recs, stats = read_all(cfg)
    assert recs == [("alpha", 0, 0), ("beta\nline two", 0, 2), ("", 0, 4), ("ünïcode ✓", 0, 5)]
    assert stats == {"records": 4, "bad_records": 0, "utf8_replaced": 0, "files": 1}


def test_jsonl_bom_crlf_and_other_field(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"body": "x"}\r\n{"body": "y\\r\\n"}\r\n')
    recs, _ = read_all(SourceConfig(path=str(p), text_field="body"))
    assert recs == [("x", 0, 0), ("y\r\n", 0, 1)]


def test_json_array_and_json_lines(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text("  \n" + json.dumps(DOCS, indent=1))
    recs, stats = read_all(SourceConfig(path=str(arr)))
    assert recs == [(d["text"], 0, i) for i, d in enumerate(DOCS)]
    assert stats["records"] == 4 and stats["files"] == 1
    assert read_all(SourceConfig(path=str(arr)), start=(0, 2))[0] == recs[2:]
    lines = tmp_path / "lines.json.gz"
    lines.write_bytes(gzip.compress(b"\n".join(json.dumps(d).encode() for d in DOCS)))
    assert read_all(SourceConfig(path=str(lines)))[0] == recs
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},\n {"text": "b",}]')
    with pytest.raises(UserError, match=r"bad\.json: malformed JSON \(.*line 2 column"):
        read_all(SourceConfig(path=str(bad)), bad_records="skip")
    scalar = tmp_path / "s.json"
    scalar.write_text('"just a string"')
    with pytest.raises(UserError, match="neither a JSON array nor JSON Lines"):
        read_all(SourceConfig(path=str(scalar)))


def test_csv_gz(tmp_path):
    raw = b'id,text,extra\n1,"hello, world",x\n2,"multi\nline ""quoted""",y\n3,,z\n4,caf\xe9,w\n'
    p = tmp_path / "c.csv.gz"
    p.write_bytes(gzip.compress(raw))
    cfg = SourceConfig(path=str(p))
    assert resolve_files(cfg) == [InputFile(str(p), "csv", "gzip")]
    recs, stats = read_all(cfg)
    assert recs == [("hello, world", 0, 0), ('multi\nline "quoted"', 0, 1), ("", 0, 2), ("caf\ufffd", 0, 3)]
    assert stats == {"records": 4, "bad_records": 0, "utf8_replaced": 1, "files": 1}
    assert read_all(cfg, start=(0, 2))[0] == recs[2:]
    with pytest.raises(UserError, match=r"c\.csv\.gz: no column 'body' \(header: id, text, extra\)"):
        read_all(SourceConfig(path=str(p), text_field="body"))


def test_csv_bad_rows(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"text,n\na,1\nb,2,3\nc,4\n")
    with pytest.raises(UserError, match=r"r\.csv:3: expected 2 columns, got 3\. Fix the row .*bad_records=skip"):
        read_all(SourceConfig(path=str(p)))
    recs, stats = read_all(SourceConfig(path=str(p)), bad_records="skip")
    assert recs == [("a", 0, 0), ("c", 0, 1)]
    assert stats["bad_records"] == 1 and stats["records"] == 3


def test_parquet(tmp_path):
    p = tmp_path / "p.parquet"
    vals = [f"doc{i}" for i in range(10)]
    vals[6] = None
    pq.write_table(pa.table({"id": list(range(10)), "content": vals}), p, row_group_size=3)
    cfg = SourceConfig(path=str(p), text_field="content")
    full, stats = read_all(cfg, bad_records="skip")
    assert full == [(f"doc{i}", 0, i) for i in range(10) if i != 6]
    assert stats == {"records": 10, "bad_records": 1, "utf8_replaced": 0, "files": 1}
    for r in (1, 3, 4, 7, 9, 10, 12):  # inside / at row-group boundaries / past the end
        recs, st = read_all(cfg, start=(0, r), bad_records="skip")
        assert recs == [x for x in full if x[2] >= r]
        assert st["records"] == max(0, 10 - r) and st["bad_records"] == (1 if r <= 6 else 0) and st["files"] == 0
    with pytest.raises(UserError, match=r"p\.parquet: row 6 \(0-based\): column 'content' is null"):
        read_all(cfg)
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, content\)"):
        read_all(SourceConfig(path=str(p)))
    with pytest.raises(UserError, match="column 'id' has type int64, not text"):
        read_all(SourceConfig(path=str(p), text_field="id"))


def test_parquet_invalid_utf8(tmp_path):
    p = tmp_path / "u.parquet"
    arr = pa.array([b"ok", b"bad\xff", b"fine"], pa.binary()).view(pa.string())  # unvalidated string column
    pq.write_table(pa.table({"text": arr}), p)
    recs, stats = read_all(SourceConfig(path=str(p)))
    assert texts(recs) == ["ok", "bad\ufffd", "fine"] and stats["utf8_replaced"] == 1


def test_hf_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b", None, "d"], "n": [1, 2, 3, 4]})
    ds.save_to_disk(str(tmp_path / "single"))
    cfg = SourceConfig(path=str(tmp_path / "single"))
    assert resolve_files(cfg) == [InputFile(str(tmp_path / "single"), "hf_disk", None)]
    recs, stats = read_all(cfg, bad_records="skip")
    assert recs == [("a", 0, 0), ("b", 0, 1), ("d", 0, 3)]
    assert stats == {"records": 4, "bad_records": 1, "utf8_replaced": 0, "files": 1}
    assert read_all(cfg, start=(0, 3), bad_records="skip")[0] == [("d", 0, 3)]
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text, n\)"):
        read_all(SourceConfig(path=cfg.path, text_field="body"))
    with pytest.raises(UserError, match="single saved Dataset has no splits"):
        read_all(SourceConfig(path=cfg.path, split="test"))

    small = datasets.Dataset.from_dict({"text": ["t0", "t1"]})
    datasets.DatasetDict({"train": small, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    dd = str(tmp_path / "dd")
    assert read_all(SourceConfig(path=dd))[0] == [("t0", 0, 0), ("t1", 0, 1)]
    assert read_all(SourceConfig(path=dd, split="test"))[0] == [("a", 0, 0)]
    with pytest.raises(UserError, match=r"has no split 'dev' \(splits: train, test\)"):
        read_all(SourceConfig(path=dd, split="dev"))
    datasets.DatasetDict({"a": small, "b": small}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(UserError, match=r"has no split 'train' \(splits: a, b\); set this source's split"):
        read_all(SourceConfig(path=str(tmp_path / "ab")))
    # a directory holding saved datasets next to files: each one is an input, not its json files
    (tmp_path / "mix").mkdir()
    os.rename(tmp_path / "single", tmp_path / "mix" / "b_saved")
    write_jsonl(tmp_path / "mix" / "a.jsonl", [DOCS[0]])
    files = resolve_files(SourceConfig(path=str(tmp_path / "mix")))
    assert [(os.path.basename(f.path), f.format) for f in files] == [("a.jsonl", "jsonl"), ("b_saved", "hf_disk")]


def test_txt_units(tmp_path):
    p = tmp_path / "t.txt"
    raw = b"para one\r\nstill one\r\n\r\n \t \n\npara two  \nthird\xff line\n\n\nlast"
    p.write_bytes(raw)
    recs, stats = read_all(SourceConfig(path=str(p)))
    assert recs == [(raw.decode("utf-8", "replace"), 0, 0)]
    assert stats == {"records": 1, "bad_records": 0, "utf8_replaced": 1, "files": 1}
    cfg = SourceConfig(path=str(p), txt_unit="paragraph")
    recs, stats = read_all(cfg)
    assert recs == [("para one\nstill one", 0, 0), ("para two  \nthird\ufffd line", 0, 1), ("last", 0, 2)]
    assert stats == {"records": 3, "bad_records": 0, "utf8_replaced": 1, "files": 1}
    assert read_all(cfg, start=(0, 2)) == ([("last", 0, 2)], {"records": 1, "bad_records": 0, "utf8_replaced": 0, "files": 0})
    z = tmp_path / "z.txt.zst"
    z.write_bytes(zstandard.ZstdCompressor().compress(b"a\nb\n\nc\n"))
    assert read_all(SourceConfig(path=str(z), txt_unit="paragraph"))[0] == [("a\nb", 0, 0), ("c", 0, 1)]
    assert read_all(SourceConfig(path=str(z)), start=(0, 1))[0] == []


# ---------------------------------------------------------------------------- resolution


def test_glob_and_directory_order(tmp_path):
    d = tmp_path / "data"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for rel in ["b.jsonl", "a.txt", "sub/c.csv", "sub/deeper/a.parquet.x", "sub/a.json.zst", "README.md",
                ".skip.jsonl", ".hidden/h.jsonl", "a.jsonl.gz"]:
        (d / rel).write_bytes(b"")
    (d / "sub/deeper/a.parquet.x").unlink()
    pq.write_table(pa.table({"text": ["p"]}), d / "sub/deeper/x.parquet")
    files = resolve_files(SourceConfig(path=str(d)))
    assert [(os.path.relpath(f.path, d), f.format, f.compression) for f in files] == [
        ("a.jsonl.gz", "jsonl", "gzip"), ("a.txt", "txt", None), ("b.jsonl", "jsonl", None),
        ("sub/a.json.zst", "json", "zstd"), ("sub/c.csv", "csv", None), ("sub/deeper/x.parquet", "parquet", None)]
    g = resolve_files(SourceConfig(path=str(d / "*.jsonl*")))
    assert [os.path.basename(f.path) for f in g] == ["a.jsonl.gz", "b.jsonl"]
    rg = resolve_files(SourceConfig(path=str(d / "**" / "*.c*")))
    assert [os.path.relpath(f.path, d) for f in rg] == ["sub/c.csv"]
    forced = resolve_files(SourceConfig(path=str(d / "sub"), format="jsonl"))
    assert [(os.path.relpath(f.path, d), f.format, f.compression) for f in forced] == [
        ("sub/a.json.zst", "jsonl", "zstd"), ("sub/c.csv", "jsonl", None), ("sub/deeper/x.parquet", "jsonl", None)]


def test_resolution_errors(tmp_path):
    with pytest.raises(UserError, match=r"no input matches '.*nope\*\.jsonl'; check this source's path"):
        resolve_files(SourceConfig(path=str(tmp_path / "nope*.jsonl")))
    with pytest.raises(UserError, match="no input matches"):
        resolve_files(SourceConfig(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match=r"notes\.md' has an unsupported extension; supported are .*set this source's format"):
        resolve_files(SourceConfig(path=str(tmp_path / "notes.md")))
    assert resolve_files(SourceConfig(path=str(tmp_path / "notes.md"), format="txt")) == [
        InputFile(str(tmp_path / "notes.md"), "txt", None)]
    with pytest.raises(UserError, match=r"contains no input files .*ignored 1 other file\(s\), e\.g\. 'notes\.md'"):
        resolve_files(SourceConfig(path=str(tmp_path)))
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(UserError, match="parquet files cannot be .gz/.zst compressed"):
        resolve_files(SourceConfig(path=str(tmp_path / "x.parquet.gz")))
    with pytest.raises(UserError, match="format hf_disk reads a directory"):
        resolve_files(SourceConfig(path=str(tmp_path / "notes.md"), format="hf_disk"))


# ---------------------------------------------------------------------------- bad data


def test_malformed_json_fail_and_skip(tmp_path):
    lines = [DOCS[0], '{"text": "x" "y"}', "[1, 2]", '{"text": null}', '{"id": 5}', DOCS[1]]
    p = write_jsonl(tmp_path / "a.jsonl", lines)
    cfg = SourceConfig(path=p)
    with pytest.raises(UserError) as e:
        read_all(cfg)
    assert str(e.value) == (f"{p}:2: malformed JSON (Expecting ',' delimiter: column 14). Fix the record, "
                            f"or set bad_records=skip to skip and count such records.")
    recs, stats = read_all(cfg, bad_records="skip")
    assert recs == [("alpha", 0, 0), ("beta\nline two", 0, 5)]
    assert stats == {"records": 6, "bad_records": 4, "utf8_replaced": 0, "files": 1}
    for start, msg in [((0, 2), "a.jsonl:3: record is an array, not a JSON object"),
                       ((0, 3), "a.jsonl:4: field 'text' is null, not a string"),
                       ((0, 4), r"a.jsonl:5: no field 'text' \(fields: id\)")]:
        with pytest.raises(UserError, match=msg):
            read_all(cfg, start=start)


def test_missing_text_field_on_first_record(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ["", {"id": 1, "body": "x"}, {"text": "y"}])
    for policy in ("fail", "skip"):
        with pytest.raises(UserError) as e:
            read_all(SourceConfig(path=p), bad_records=policy)
        assert str(e.value) == (f"{p}:2: no field 'text' (fields: id, body). "
                                f"Set this source's text_field to the field that holds the text.")


def test_invalid_utf8_replaced(tmp_path):
    p = write_jsonl(tmp_path / "u.jsonl", [b'{"text": "ok"}', b'{"text": "bad \xff\xfe here"}', b'{"text": "\xc3\xa9"}'])
    recs, stats = read_all(SourceConfig(path=p))
    assert texts(recs) == ["ok", "bad \ufffd\ufffd here", "é"]
    assert stats["utf8_replaced"] == 1 and stats["records"] == 3


def test_corrupt_compressed_file(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(b"this is not gzip data at all")
    with pytest.raises(UserError, match=r"c\.jsonl\.gz: cannot read .*valid gzip file"):
        read_all(SourceConfig(path=str(p)))
    t = tmp_path / "t.jsonl.gz"
    t.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])  # truncated
    with pytest.raises(UserError, match=r"t\.jsonl\.gz: cannot read"):
        read_all(SourceConfig(path=str(t)))


# ---------------------------------------------------------------------------- resume


def test_resume_equals_tail_and_stats(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [DOCS[0], "", "not json", DOCS[1], "", DOCS[2]])
    write_jsonl(d / "b.jsonl.gz", [DOCS[3], b'{"text": "x\xffy"}', {"text": 7}], "gz")
    (d / "c.txt").write_bytes(b"p1\n\np2a\np2b\n\n\np3\n")
    pq.write_table(pa.table({"text": ["q0", None, "q2", "q3"]}), d / "d.parquet", row_group_size=2)
    pacsv.write_csv(pa.table({"text": ["c0", "c1", "c2"]}), d / "e.csv")
    cfg = SourceConfig(path=str(d), txt_unit="paragraph")
    files = resolve_files(cfg)
    assert [os.path.basename(f.path) for f in files] == ["a.jsonl", "b.jsonl.gz", "c.txt", "d.parquet", "e.csv"]

    full, checkpoints = [], []
    final: dict[str, int] = {}
    for rec in iter_records(files, cfg, bad_records="skip", stats=final):
        full.append(rec)
        checkpoints.append(((rec[1], rec[2] + 1), dict(final)))  # what the stage stores after a record
    assert texts(full) == ["alpha", "beta\nline two", "", "ünïcode ✓", "x\ufffdy", "p1", "p2a\np2b", "p3",
                           "q0", "q2", "q3", "c0", "c1", "c2"]
    assert [(f, r) for _, f, r in full][:6] == [(0, 0), (0, 3), (0, 5), (1, 0), (1, 1), (2, 0)]
    assert final == {"records": 17, "bad_records": 3, "utf8_replaced": 1, "files": 5}

    for k, (cursor, snap) in enumerate(checkpoints):
        stats = dict(snap)
        tail = list(iter_records(files, cfg, start=cursor, bad_records="skip", stats=stats))
        assert tail == full[k + 1:], cursor
        assert stats == final, cursor  # skipped records are not counted twice
    for start in [(0, 0), (0, 1), (0, 2), (1, 2), (2, 1), (3, 1), (3, 2), (4, 3), (5, 0)]:
        tail = list(iter_records(files, cfg, start=start, bad_records="skip", stats={}))
        assert tail == [x for x in full if (x[1], x[2]) >= start], start


def test_resume_does_not_parse_skipped_lines(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ["{broken", "[]", {"text": "ok"}])
    stats: dict[str, int] = {}
    recs = list(iter_records(resolve_files(SourceConfig(path=p)), SourceConfig(path=p), start=(0, 2), stats=stats))
    assert recs == [("ok", 0, 2)]
    assert stats == {"records": 1, "bad_records": 0, "utf8_replaced": 0, "files": 0}

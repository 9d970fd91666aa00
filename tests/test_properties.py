"""Property-based tests (hypothesis) of the config parser and the corpus readers.

The config parser: any value set by a dotted override arrives exactly (ints, finite
floats, booleans, any text), list indices address or append elements and refuse the rest,
unknown keys and wrong types are named, and ``--print-config`` output loads back to the
same config. The readers: any text written as JSONL (plain, gzip, zstd), CSV, Parquet or
txt reads back exactly and in order; a malformed JSONL line is reported with its line
number, and ``bad_records=skip`` keeps exactly the good lines.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config, to_yaml
from pipeline.data.sources import SourceConfig, iter_records, resolve_files
from pipeline.errors import ConfigError, UserError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text without lone surrogates (which no UTF-8 file can hold).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@dataclass
class Item:
    v: int = 0
    """An integer."""
    tag: str = ""
    """A text."""


@dataclass
class Inner:
    n: int = 1
    """An integer."""
    x: float = 0.5
    """A number."""
    flag: bool = False
    """A switch."""


@dataclass
class Demo:
    name: str = "run"
    """A text."""
    maybe: str | None = None
    """Text or null."""
    mode: Literal["fast", "thorough", "none"] = "fast"
    """A choice."""
    inner: Inner = field(default_factory=Inner)
    """A nested section."""
    items: list[Item] = field(default_factory=lambda: [Item(1, "a")])
    """A list of sections."""
    words: list[str] = field(default_factory=list)
    """A list of texts."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form mapping."""


def _load(overrides: list[str], config_file: str | None = None) -> Demo:
    return load_config(Demo, config_file, overrides)


# ---------------------------------------------------------------------------- config parser


@SETTINGS
@given(n=st.integers(), x=st.floats(allow_nan=False, allow_infinity=False), flag=st.booleans(), name=TEXT, maybe=TEXT)
def test_scalar_overrides_arrive_exactly(n: int, x: float, flag: bool, name: str, maybe: str):
    cfg = _load([f"inner.n={n}", f"inner.x={x!r}", f"inner.flag={str(flag).lower()}", f"name={name}", f"maybe={maybe}"])
    assert (cfg.inner.n, cfg.inner.x, cfg.inner.flag) == (n, x, flag)
    assert cfg.name == name  # text is taken as typed: "007", "yes", "null", "0x1F" stay text
    assert cfg.maybe == (None if maybe.strip() in ("null", "Null", "NULL", "~") else maybe)  # null as a word, where allowed


def test_null_sets_an_optional_field_only():
    assert _load(["maybe=null"]).maybe is None
    assert _load(["name=null"]).name == "null"
    assert _load(["name=007", "mode=none"]).name == "007" and _load(["mode=none"]).mode == "none"


@SETTINGS
@given(length=st.integers(0, 4), index=st.integers(0, 7), v=st.integers(-5, 5))
def test_list_indices_address_append_or_are_refused(length: int, index: int, v: int):
    whole = "items=[" + ", ".join(f"{{v: {i}}}" for i in range(length)) + "]"
    if index > length:
        with pytest.raises(ConfigError) as e:
            _load([whole, f"items.{index}.v={v}"])
        assert f"items.{index}.v: '{index}' is not a valid index into a list of {length}" in str(e.value)
        return
    cfg = _load([whole, f"items.{index}.v={v}"])
    expected = list(range(length)) + ([0] if index == length else [])
    expected[index] = v
    assert [it.v for it in cfg.items] == expected


@SETTINGS
@given(key=st.text(string.ascii_lowercase + "_", min_size=1, max_size=12), section=st.sampled_from(["", "inner.", "items.0."]))
def test_unknown_keys_are_named(key: str, section: str):
    known = {"": Demo, "inner.": Inner, "items.0.": Item}[section].__dataclass_fields__
    assume(key not in known)
    with pytest.raises(ConfigError) as e:
        _load([f"{section}{key}=1"])
    assert f"{section}{key}: unknown key" in str(e.value)


@SETTINGS
@given(text=st.text(string.ascii_letters, min_size=1, max_size=10))
def test_wrong_types_are_named(text: str):
    assume(text.lower() not in ("true", "false", "yes", "no", "on", "off", "y", "n", "null", "nan", "inf", "infinity"))
    assume(text not in ("fast", "thorough", "none"))  # the choices of `mode` are valid values
    with pytest.raises(ConfigError) as e:
        _load([f"inner.n={text}", f"inner.x={text}", f"mode={text}"])
    msg = str(e.value)
    assert "invalid config (3 problems)" in msg
    assert f"inner.n: expected an integer, got '{text}'" in msg and f"inner.x: expected a number, got '{text}'" in msg
    assert f"mode: got '{text}'; must be one of: fast, thorough, none" in msg


def _overrides():
    """Strategy: a list of valid overrides over every field type of Demo."""
    return st.fixed_dictionaries({
        "name": TEXT, "maybe": st.one_of(st.none(), TEXT), "mode": st.sampled_from(["fast", "thorough", "none"]),
        "n": st.integers(), "x": st.floats(allow_nan=False, allow_infinity=False), "flag": st.booleans(),
        "items": st.lists(st.tuples(st.integers(), TEXT), max_size=3),
        "words": st.lists(TEXT, max_size=3),
        "extra": st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=5),
                                 st.one_of(st.integers(), TEXT, st.booleans()), max_size=3),
    })


@SETTINGS
@given(v=_overrides())
def test_print_config_output_loads_back_to_the_same_config(v: dict):
    # Build through YAML text (as a user's recipe would), then print and load again.
    data = {"name": v["name"], "maybe": v["maybe"], "mode": v["mode"], "inner": {"n": v["n"], "x": v["x"], "flag": v["flag"]},
            "items": [{"v": a, "tag": b} for a, b in v["items"]], "words": v["words"], "extra": v["extra"]}
    with tempfile.TemporaryDirectory() as d:
        recipe = Path(d) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(data), encoding="utf-8")  # escaped: PyYAML cannot re-read every character raw
        cfg = _load([], str(recipe))
        assert cfg.inner.n == v["n"] and cfg.name == v["name"] and [it.tag for it in cfg.items] == [b for _, b in v["items"]]
        printed = Path(d) / "printed.yaml"
        printed.write_text(to_yaml(cfg), encoding="utf-8")
        assert _load([], str(printed)) == cfg


@SETTINGS
@given(output=TEXT.filter(lambda s: s.strip() == s and s), vocab=st.integers(300, 70000), val=st.floats(0, 0.99),
       min_chars=st.integers(0, 1000))
def test_print_config_of_a_stage_round_trips_through_the_cli(output: str, vocab: int, val: float, min_chars: int):
    from pipeline.cli import run_stage
    from pipeline.stages.preprocess import PreprocessConfig

    argv = [f"output={output}", f"tokenizer.vocab_size={vocab}", f"val_fraction={val!r}", f"clean.min_chars={min_chars}",
            "--print-config"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run_stage(PreprocessConfig, lambda cfg, ns: 0, prog="p", description="", argv=argv) == 0
    expected = load_config(PreprocessConfig, None, argv[:-1])
    assert expected.output == output
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "printed.yaml").write_text(buf.getvalue(), encoding="utf-8")
        assert load_config(PreprocessConfig, str(Path(d) / "printed.yaml")) == expected


# ---------------------------------------------------------------------------- readers


def _read(path: Path, **kw) -> tuple[list[str], dict]:
    cfg = SourceConfig(path=str(path), **{k: v for k, v in kw.items() if k != "bad_records"})
    stats: dict = {}
    texts = [t for t, _, _ in iter_records(resolve_files(cfg), cfg, bad_records=kw.get("bad_records", "fail"), stats=stats)]
    return texts, stats


@SETTINGS
@given(texts=st.lists(TEXT, max_size=12), compress=st.sampled_from(["", ".gz", ".zst"]), ascii_only=st.booleans())
def test_jsonl_reads_back_exactly(texts: list[str], compress: str, ascii_only: bool):
    body = "".join(json.dumps({"text": t, "n": i}, ensure_ascii=ascii_only) + "\n" for i, t in enumerate(texts)).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c.jsonl{compress}"
        if compress == ".gz":
            body = gzip.compress(body)
        elif compress == ".zst":
            import zstandard

            body = zstandard.ZstdCompressor().compress(body)
        path.write_bytes(body)
        got, stats = _read(path)
    assert got == texts
    assert stats["records"] == len(texts) and stats["bad_records"] == 0


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=12))
def test_csv_reads_back_exactly(texts: list[str]):
    buf = io.StringIO(newline="")
    w = csv.writer(buf)  # CR LF rows: the writer then quotes any field holding a CR or an LF
    w.writerow(["id", "text"])
    w.writerows([i, t] for i, t in enumerate(texts))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.csv"
        path.write_bytes(buf.getvalue().encode())
        got, _ = _read(path)
    assert got == texts


@SETTINGS
@given(texts=st.lists(st.one_of(TEXT, st.none()), max_size=30), group=st.integers(1, 8))
def test_parquet_reads_back_exactly_and_counts_nulls(texts: list, group: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.parquet"
        pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, row_group_size=group)
        got, stats = _read(path, bad_records="skip")
    assert got == [t for t in texts if t is not None]
    assert stats["bad_records"] == texts.count(None)


@SETTINGS
@given(text=TEXT)
def test_txt_file_unit_reads_back_exactly(text: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.txt"
        path.write_bytes(text.encode())
        got, _ = _read(path)
    assert got == [text]


# A paragraph line: not blank, no line break (CR LF is a line terminator by design).
LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1, max_size=20).filter(
    lambda s: not s.encode().isspace())


@SETTINGS
@given(paragraphs=st.lists(st.lists(LINE, min_size=1, max_size=3), max_size=6), crlf=st.booleans())
def test_txt_paragraphs_read_back_exactly(paragraphs: list[list[str]], crlf: bool):
    nl = "\r\n" if crlf else "\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.txt"
        path.write_bytes((nl + nl).join(nl.join(p) for p in paragraphs).encode() + nl.encode())
        got, _ = _read(path, txt_unit="paragraph")
    assert got == ["\n".join(p) for p in paragraphs]


BAD_LINES = ['{"text": "cut', "not json", '{"text": 3}', "[1, 2]", '{"body": "x"}']


@SETTINGS
@given(rows=st.lists(st.one_of(TEXT.map(lambda t: ("good", t)), st.sampled_from(BAD_LINES).map(lambda b: ("bad", b)),
                               st.just(("blank", ""))), min_size=1, max_size=15))
def test_malformed_jsonl_lines_are_reported_with_their_line_number(rows: list[tuple[str, str]]):
    # The first record must carry the text field (else the whole file is refused as a config error).
    rows = [("good", "first")] + rows
    lines = [json.dumps({"text": v}) if kind == "good" else v for kind, v in rows]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        bad = [i + 1 for i, (kind, _) in enumerate(rows) if kind == "bad"]
        if bad:
            with pytest.raises(UserError) as e:
                _read(path)
            assert str(e.value).startswith(f"{path}:{bad[0]}: ") and "bad_records=skip" in str(e.value)
        got, stats = _read(path, bad_records="skip")
    assert got == [v for kind, v in rows if kind == "good"]
    assert stats["bad_records"] == len(bad)
    assert stats["records"] == sum(kind != "blank" for kind, _ in rows)

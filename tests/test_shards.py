from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from pipeline.data.shards import (
    ShardIntegrityError,
    ShardWriter,
    TokenDataset,
    compute_totals,
    dtype_for_vocab,
    file_entries,
    known_hashes,
    list_files,
    read_manifest,
    verify,
    write_manifest,
)
from pipeline.errors import UserError
from pipeline.io import sha256_file

# Documents with distinct token values so every position is identifiable: token = 10 * doc + pos.
TRAIN_A = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]  # train/web-00000: 3 docs, 9 tokens
TRAIN_B = [[40], [50, 51, 52]]  # train/web-00001: 2 docs, 4 tokens
TRAIN_C = [[60, 61, 62, 63, 64]]  # train/code-00000: 1 doc, 5 tokens
VAL = [[70, 71], [80, 81, 82]]  # val/web-00000: 2 docs, 5 tokens


def _flat(docs):
    return np.array([t for d in docs for t in d], dtype=np.int64), np.array([len(d) for d in docs])


def _write(out, rel, docs, dtype=np.uint16, **kw):
    with ShardWriter(out, rel, dtype, **kw) as w:
        # two calls: documents may arrive in batches
        flat, lens = _flat(docs[:1])
        w.add_documents(flat, lens)
        flat, lens = _flat(docs[1:])
        w.add_documents(flat, lens)
    return w.entry


def _make_dataset(out, dtype="uint16"):
    shards = [
        _write(out, "train/web-00000", TRAIN_A, dtype),
        _write(out, "train/code-00000", TRAIN_C, dtype),
        _write(out, "train/web-00001", TRAIN_B, dtype),
        _write(out, "val/web-00000", VAL, dtype),
    ]
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}\n')
    rels = list_files(out)
    manifest = {
        "dtype": dtype,
        "tokenizer": {"dir": "tokenizer", "fingerprint": "ab" * 32, "vocab_size": 100,
                      "bos_id": 1, "eos_id": 2, "pad_id": 3},
        "val_fraction": 0.25,
        "sources": [{"name": "web", "weight": 1.0, "stats": {}}, {"name": "code", "weight": 0.5, "stats": {}}],
        "shards": shards,
        "files": file_entries(out, rels, known_hashes(shards)),
        "totals": compute_totals(shards),
        "stats": {},
        "config": {},
    }
    write_manifest(out, manifest)
    return manifest


@pytest.fixture
def ds_dir(tmp_path):
    out = tmp_path / "out"
    _make_dataset(out)
    return out


def test_writer_files_and_entry(tmp_path):
    entry = _write(tmp_path, "train/web-00000", TRAIN_A)
    binp, idxp = tmp_path / "train/web-00000.bin", tmp_path / "train/web-00000.idx"
    assert np.fromfile(binp, "<u2").tolist() == [10, 11, 12, 20, 21, 30, 31, 32, 33]
    assert np.fromfile(idxp, "<u8").tolist() == [0, 3, 5, 9]
    assert entry == {
        "split": "train", "source": "web",
        "bin": "train/web-00000.bin", "idx": "train/web-00000.idx",
        "documents": 3, "tokens": 9,
        "sha256": {"bin": sha256_file(binp), "idx": sha256_file(idxp)},
        "bytes": {"bin": 18, "idx": 32},
    }
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["web-00000.bin", "web-00000.idx"]


def test_writer_empty_shard(tmp_path):
    with ShardWriter(tmp_path, "val/web-00000", np.uint32) as w:
        w.add_documents(np.array([], np.int64), np.array([], np.int64))
    assert w.entry["documents"] == 0 and w.entry["tokens"] == 0
    assert w.entry["bytes"] == {"bin": 0, "idx": 8}
    assert np.fromfile(tmp_path / "val/web-00000.idx", "<u8").tolist() == [0]


def test_writer_abort_and_exception_leave_no_files(tmp_path):
    w = ShardWriter(tmp_path, "train/web-00000", np.uint16)
    w.add_documents(np.arange(5), np.array([2, 3]))
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [".web-00000.bin.tmp", ".web-00000.idx.tmp"]
    w.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "train/web-00001", np.uint16) as w2:
            w2.add_documents(np.arange(5), np.array([5]))
            raise RuntimeError("boom")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_dtype_selection_and_overflow(tmp_path):
    assert dtype_for_vocab(8000) == np.dtype("<u2")
    assert dtype_for_vocab(65536) == np.dtype("<u2")
    assert dtype_for_vocab(65537) == np.dtype("<u4")
    assert dtype_for_vocab(100, "uint32") == np.dtype("<u4")
    with pytest.raises(UserError) as e:
        dtype_for_vocab(100000, "uint16")
    assert str(e.value) == ("vocabulary of 100000 tokens does not fit dtype=uint16 (max 65536); "
                            "set dtype=uint32 or auto")
    with ShardWriter(tmp_path, "train/web-00000", np.uint16) as w:
        w.add_documents(np.array([65535]), np.array([1]))
        with pytest.raises(ValueError, match="token id 65536 does not fit"):
            w.add_documents(np.array([1, 65536]), np.array([2]))
        with pytest.raises(ValueError, match="lengths sum to 3"):
            w.add_documents(np.array([1, 2]), np.array([3]))
    # a failed add writes nothing
    assert w.entry["tokens"] == 1 and w.entry["documents"] == 1
    with ShardWriter(tmp_path, "train/web-00001", np.uint32) as w:
        w.add_documents(np.array([70000, 3]), np.array([2]))
    assert np.fromfile(tmp_path / "train/web-00001.bin", "<u4").tolist() == [70000, 3]
    assert w.entry["bytes"]["bin"] == 8


def test_manifest_roundtrip(ds_dir):
    m = read_manifest(ds_dir)
    assert m["format"] == "pipeline.token_shards" and m["version"] == 1
    assert m["totals"] == {"train": {"documents": 6, "tokens": 18}, "val": {"documents": 2, "tokens": 5}}
    assert sorted(m["files"]) == [
        "tokenizer/tokenizer.json", "train/code-00000.bin", "train/code-00000.idx",
        "train/web-00000.bin", "train/web-00000.idx", "train/web-00001.bin", "train/web-00001.idx",
        "val/web-00000.bin", "val/web-00000.idx",
    ]
    for rel, f in m["files"].items():
        assert f == {"bytes": (ds_dir / rel).stat().st_size, "sha256": sha256_file(ds_dir / rel)}
    text = (ds_dir / "manifest.json").read_text()
    write_manifest(ds_dir, m)  # deterministic
    assert (ds_dir / "manifest.json").read_text() == text
    verify(ds_dir, thorough=True)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError) as e:
        read_manifest(tmp_path / "nope")
    assert str(e.value) == (f"'{tmp_path / 'nope'}' is not a preprocessed dataset (no manifest.json); "
                            "run launch/preprocess.py first or point to its output directory")
    mf = tmp_path / "manifest.json"
    mf.write_text("{not json")
    with pytest.raises(UserError, match="manifest.json' is not valid JSON"):
        read_manifest(tmp_path)
    mf.write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(UserError, match="manifest.json' is not a token-shard manifest"):
        read_manifest(tmp_path)
    mf.write_text(json.dumps({"format": "pipeline.token_shards", "version": 2}))
    with pytest.raises(UserError, match="manifest.json' has manifest version 2"):
        read_manifest(tmp_path)
    mf.write_text(json.dumps({"format": "pipeline.token_shards", "version": 1, "dtype": "uint16",
                              "shards": [{"split": "train"}], "files": {}}))
    with pytest.raises(UserError, match=r"shards\[0\]\.source is missing"):
        read_manifest(tmp_path)


def test_documents_roundtrip(ds_dir):
    ds = TokenDataset(ds_dir, "train")
    assert ds.num_documents == 6 and ds.num_tokens == 18
    assert ds.dtype == np.dtype("<u2")
    assert ds.sources == ["web", "code"]
    docs = [ds.document(i).tolist() for i in range(ds.num_documents)]
    assert docs == TRAIN_A + TRAIN_C + TRAIN_B  # manifest order
    assert ds.document(3).dtype == np.int64
    with pytest.raises(IndexError):
        ds.document(6)
    web = TokenDataset(ds_dir, "train", source="web")
    assert [web.document(i).tolist() for i in range(web.num_documents)] == TRAIN_A + TRAIN_B
    assert web.sources == ["web"] and web.num_tokens == 13
    val = TokenDataset(ds_dir, "val", verify="thorough")
    assert [val.document(i).tolist() for i in range(2)] == VAL


def test_samples_across_shard_boundaries(ds_dir):
    ds = TokenDataset(ds_dir, "train")
    everything = [t for d in TRAIN_A + TRAIN_C + TRAIN_B for t in d]
    assert ds.tokens(0, 18).tolist() == everything
    # seq_len 4: (18 - 1) // 4 = 4 samples of 5 tokens, overlapping by one
    assert ds.num_samples(4) == 4
    samples = [ds.sample(i, 4).tolist() for i in range(4)]
    assert samples == [
        [10, 11, 12, 20, 21],
        [21, 30, 31, 32, 33],
        [33, 60, 61, 62, 63],  # spans web-00000 -> code-00000
        [63, 64, 40, 50, 51],  # spans code-00000 -> web-00001, last sample
    ]
    assert ds.sample(3, 4).dtype == np.int64 and ds.sample(3, 4).shape == (5,)
    with pytest.raises(IndexError):
        ds.sample(4, 4)
    # seq_len 17: exactly one sample covering every token
    assert ds.num_samples(17) == 1 and ds.sample(0, 17).tolist() == everything
    assert ds.num_samples(18) == 0
    # a slice spanning all three shards
    assert ds.tokens(8, 7).tolist() == [33, 60, 61, 62, 63, 64, 40]
    assert ds.tokens(18, 0).tolist() == []
    with pytest.raises(IndexError):
        ds.tokens(15, 4)


def test_unknown_split_and_source(ds_dir):
    with pytest.raises(UserError, match="split 'test' is not in dataset .*available splits: train, val"):
        TokenDataset(ds_dir, "test")
    with pytest.raises(UserError, match="source 'books' is not in dataset .*available sources: web, code"):
        TokenDataset(ds_dir, "train", source="books")


def test_pickle_roundtrip(ds_dir):
    ds = TokenDataset(ds_dir, "train")
    assert ds.sample(2, 4).tolist() == [33, 60, 61, 62, 63]  # opens maps
    blob = pickle.dumps(ds)
    assert len(blob) < 10000
    ds2 = pickle.loads(blob)
    assert all(m is None for m in ds2._maps)
    assert ds2.sample(3, 4).tolist() == [63, 64, 40, 50, 51]
    assert ds2.document(5).tolist() == [50, 51, 52]


def test_verify_flipped_byte_needs_thorough(ds_dir):
    p = ds_dir / "train/web-00001.bin"
    data = bytearray(p.read_bytes())
    data[2] ^= 0xFF
    p.write_bytes(bytes(data))
    verify(ds_dir)  # size unchanged: the fast check passes
    TokenDataset(ds_dir, "train", verify="fast")
    with pytest.raises(ShardIntegrityError) as e:
        verify(ds_dir, thorough=True)
    assert len(e.value.problems) == 1
    msg = str(e.value)
    assert f"'{p}' has sha256 {sha256_file(p)}, expected " in msg
    assert "re-run preprocess (it resumes) or restore it" in msg
    with pytest.raises(ShardIntegrityError):
        TokenDataset(ds_dir, "train", verify="thorough")
    TokenDataset(ds_dir, "val", verify="thorough")  # only the selected shards are checked


def test_verify_truncated_idx(ds_dir):
    p = ds_dir / "train/web-00000.idx"
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(ShardIntegrityError) as e:
        verify(ds_dir)
    assert str(e.value) == (f"'{p}' has 24 bytes, expected 32 (size listed in manifest.json); "
                            "the file is corrupted or truncated; re-run preprocess (it resumes) or restore it")
    with pytest.raises(ShardIntegrityError):
        TokenDataset(ds_dir, "train")


def test_verify_missing_files_collected(ds_dir):
    (ds_dir / "val/web-00000.bin").unlink()
    (ds_dir / "tokenizer/tokenizer.json").unlink()
    with pytest.raises(ShardIntegrityError) as e:
        verify(ds_dir)
    assert e.value.problems == [
        (str(ds_dir / "tokenizer/tokenizer.json"), "is missing (manifest.json lists it with 14 bytes)"),
        (str(ds_dir / "val/web-00000.bin"), "is missing (manifest.json lists it with 10 bytes)"),
    ]
    assert str(e.value).startswith("2 dataset files do not match manifest.json:\n")
    TokenDataset(ds_dir, "train")  # the train shards are intact


def test_verify_idx_contents(ds_dir):
    m = read_manifest(ds_dir)
    p = ds_dir / "train/web-00000.idx"
    p.write_bytes(np.array([0, 3, 2, 9], "<u8").tobytes())  # same size, ends right, decreases
    m["files"] = file_entries(ds_dir, list_files(ds_dir))  # hashes match the bad file
    verify(ds_dir, m)
    with pytest.raises(ShardIntegrityError, match=r"web-00000.idx' decreases at entry 2"):
        verify(ds_dir, m, thorough=True)
    p.write_bytes(np.array([0, 3, 5, 8], "<u8").tobytes())
    with pytest.raises(ShardIntegrityError, match=r"web-00000.idx' ends with offset 8, expected 9"):
        verify(ds_dir, m)

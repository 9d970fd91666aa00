"""Long documents for long-context training: ``clean.min_tokens``, the manifest's ``doc_tokens``,
rows of 16K tokens through the sampler, and the sampler's refusal of a split too small for a row.

Every run is in process (``run_entry`` for the command line, ``run`` otherwise), on one corpus
made here: 240 short documents (~100 tokens) with 10 long ones (~20K tokens) among them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, write_jsonl
from inproc import run_entry

pytestmark = pytest.mark.integration

SEQ = 16384
MIN_TOKENS = SEQ + 1  # every row of SEQ (+1) tokens then holds at most one document boundary
N_SHORT, N_LONG = 240, 10


def _long_doc(i: int) -> str:
    return f"long document {i}.\n\n" + "\n\n".join(make_docs(180, seed=1000 + i, prefix=f"part of {i}"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Short and long documents interleaved (a long one after every 24 short ones)."""
    short = make_docs(N_SHORT)
    rows = []
    for i, text in enumerate(short):
        rows.append({"text": text})
        if i % (N_SHORT // N_LONG) == N_SHORT // N_LONG - 1:
            rows.append({"text": _long_doc(i // (N_SHORT // N_LONG))})
    return write_jsonl(tmp_path_factory.mktemp("long") / "c.jsonl", rows)


def _args(corpus: Path, tok: Path, out: str, *extra: str) -> list[str]:
    return [f"sources.0.path={corpus}", f"output={out}", f"tokenizer.path={tok}", "val_fraction=0.2",
            "shard_tokens=30000", "batch_chars=60000", "workers=2", *extra]


def _cfg(args: list[str]):
    from pipeline.config import load_config
    from pipeline.stages.preprocess import PreprocessConfig

    return load_config(PreprocessConfig, None, args)


def _docs(out: Path, split: str) -> list[bytes]:
    from pipeline.data.shards import TokenDataset

    ds = TokenDataset(out, split=split)
    return [ds.document(i).tobytes() for i in range(ds.num_documents)]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(corpus: Path, tiny_tokenizer: Path, tmp_path_factory) -> dict[str, Path]:
    """The corpus preprocessed without and with ``clean.min_tokens``."""
    from pipeline.stages.preprocess import run

    root = tmp_path_factory.mktemp("runs")
    run(_cfg(_args(corpus, tiny_tokenizer, str(root / "all"))))
    run(_cfg(_args(corpus, tiny_tokenizer, str(root / "long"), f"clean.min_tokens={MIN_TOKENS}")))
    return {"all": root / "all", "long": root / "long"}


def test_only_long_documents_are_written_and_counted(runs):
    from pipeline.data.shards import read_manifest, verify

    verify(runs["long"], thorough=True)
    full, long_ = read_manifest(runs["all"]), read_manifest(runs["long"])
    for split in ("train", "val"):
        everything = _docs(runs["all"], split)
        want = [d for d in everything if len(np.frombuffer(d, np.int64)) >= MIN_TOKENS]
        assert _docs(runs["long"], split) == want, split  # the same documents, same order, same ids
    written = long_["totals"]["train"]["documents"] + long_["totals"]["val"]["documents"]
    assert written == N_LONG  # every long document passes, every short one is dropped
    st = long_["stats"]
    assert st["dropped_too_few_tokens"] == N_SHORT and st["kept"] == N_LONG and st["records"] == N_SHORT + N_LONG
    assert long_["sources"][0]["stats"] == st
    assert full["stats"]["dropped_too_few_tokens"] == 0 and full["stats"]["kept"] == N_SHORT + N_LONG
    # the length distribution of what was written, per split
    for split in ("train", "val"):
        lengths = np.array([len(np.frombuffer(d, np.int64)) for d in _docs(runs["long"], split)])
        dt = long_["doc_tokens"][split]
        assert (dt["documents"], dt["tokens"]) == (len(lengths), int(lengths.sum())) == tuple(long_["totals"][split].values())
        assert dt["max"] == lengths.max() and min(lo for lo, _, _ in dt["histogram"]) >= 16384
        for t, docs, toks in dt["at_least"]:
            assert (docs, toks) == (int((lengths >= t).sum()), int(lengths[lengths >= t].sum())), t
        assert lengths.min() * 0.87 <= dt["p50"] <= dt["max"]
    every = full["doc_tokens"]["train"]
    assert every["p50"] < 200 < every["max"] and every["at_least"][0][0] == 256
    assert [row[1] for row in every["at_least"] if row[0] == 16384] == [long_["doc_tokens"]["train"]["documents"]]


def test_cli_summary_and_bad_value(corpus: Path, tiny_tokenizer: Path, tmp_path: Path, monkeypatch, capsys):
    """The summary names the dropped count and the lengths; a negative min_tokens exits 2 naming the key."""
    args = _args(corpus, tiny_tokenizer, "out", "clean.min_tokens=-5")
    code, _, err = run_entry("preprocess.py", args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "clean.min_tokens" in err and "must be >= 0" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "clean.min_tokens" in line]) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    code, _, err = run_entry("preprocess.py", [*args[:-1], "clean.min_tokens=400"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 0, err
    assert f"dropped too_few_tokens {N_SHORT:,}" in err and "train document tokens: p50 ~" in err
    assert "share of tokens in documents of >= 4K 100%, >= 16K 100%" in err


def test_nothing_long_enough_names_the_key(corpus: Path, tiny_tokenizer: Path, tmp_path: Path, monkeypatch, capsys):
    code, _, err = run_entry("preprocess.py", _args(corpus, tiny_tokenizer, "out", "clean.min_tokens=10000000"),
                             monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert f"clean.min_tokens=10000000 ({N_SHORT + N_LONG:,} documents had fewer tokens" in err


def test_rows_of_16k_tokens_come_from_long_documents(runs):
    """seq_len=16384 through the blended sampler and the rank loader: every row is a slice of the
    long documents with at most one document boundary; without the filter a row is dozens of documents."""
    import time

    from pipeline.data.sampler import BlendedSamples, RankLoader
    from pipeline.data.shards import read_manifest

    eos = read_manifest(runs["long"])["tokenizer"]["eos_id"]
    stream = np.concatenate([np.frombuffer(d, np.int64) for d in _docs(runs["long"], "train")])
    t0 = time.perf_counter()
    samples = BlendedSamples([(runs["long"], 1.0)], "train", SEQ, seed=3)
    n = samples.components[0][2]
    assert n == (len(stream) - 1) // SEQ >= 8
    with RankLoader(samples, rank=0, world=1, micro_batch=2, grad_accum=1, end_step=n // 2) as loader:
        rows = [row.numpy() for batch in loader for row in batch]
    seconds = time.perf_counter() - t0
    assert len(rows) == 2 * (n // 2) and all(r.shape == (SEQ + 1,) for r in rows)
    for r in rows:  # each row: inside one long document, or the end of one and the start of the next
        assert int((r == eos).sum()) <= 1
    # every row is the window i * SEQ of the long documents' stream, each read once
    windows = {stream[i * SEQ:(i + 1) * SEQ + 1].tobytes() for i in range(n)}
    assert {r.tobytes() for r in rows} <= windows and len({r.tobytes() for r in rows}) == len(rows)
    assert seconds < 10, seconds  # O(rows x seq_len): no per-token index, no quadratic step
    mixed = BlendedSamples([(runs["all"], 1.0)], "train", SEQ, seed=3)
    assert max(int((mixed[g] == eos).sum()) for g in range(mixed.components[0][2])) > 10  # glued short documents


def test_too_small_splits_say_what_to_do(runs):
    from pipeline.data.sampler import BlendedSamples, Validation
    from pipeline.data.shards import read_manifest
    from pipeline.errors import UserError

    m = read_manifest(runs["long"])
    val_tokens, train_tokens = m["totals"]["val"]["tokens"], m["totals"]["train"]["tokens"]
    assert 0 < val_tokens < train_tokens
    with pytest.raises(UserError) as e:  # the val split of long documents holds fewer tokens than a row
        Validation([(runs["long"], 1.0)], seq_len=val_tokens, num_batches=4, micro_batch=1)
    msg = str(e.value)
    assert f"split 'val' of dataset '{runs['long']}' holds no sample of seq_len={val_tokens}" in msg
    assert f"lower data.seq_len to at most {val_tokens - 1:,}" in msg
    assert "larger val_fraction (now 0.2; one sample needs about" in msg and "train.eval_batches=0" in msg
    Validation([(runs["long"], 1.0)], seq_len=val_tokens - 1, num_batches=4, micro_batch=1)  # the advice holds
    with pytest.raises(UserError) as e:
        BlendedSamples([(runs["long"], 1.0)], "train", train_tokens, seed=0)
    msg = str(e.value)
    assert f"lower data.seq_len to at most {train_tokens - 1:,}" in msg
    assert f"a lower clean.min_tokens (now {MIN_TOKENS:,})" in msg and "remove the dataset from data.datasets" in msg


def test_the_train_stage_refuses_a_short_validation_split_before_any_heavy_work(runs, tmp_path: Path, monkeypatch,
                                                                              capsys):
    from pipeline.data.shards import read_manifest

    val_tokens = read_manifest(runs["long"])["totals"]["val"]["tokens"]
    out = tmp_path / "run"
    code, _, err = run_entry("train.py", [f"output={out}", f"data.datasets.0.path={runs['long']}",
                                          f"data.seq_len={val_tokens}", f"model.max_position_embeddings={val_tokens}",
                                          "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                                          "deepspeed.memory_check=false"], monkeypatch, capsys)
    assert code == 2 and "split 'val'" in err and "train.eval_batches=0" in err and "Traceback" not in err
    assert not out.exists()


class _Killed(BaseException):
    pass


def test_interrupted_run_resumes_byte_identical(corpus: Path, tiny_tokenizer: Path, tmp_path: Path, monkeypatch):
    """Stopped after two committed segments (each with dropped documents), the rerun resumes and
    writes the same bytes as the uninterrupted run, counts included."""
    from pipeline.stages import preprocess

    commit = preprocess.Preprocessor._commit
    calls = []

    def commit_then_die(self, *a, **k):
        commit(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise _Killed

    args = _args(corpus, tiny_tokenizer, str(tmp_path / "long"), f"clean.min_tokens={MIN_TOKENS}")
    with monkeypatch.context() as mp:
        mp.setattr(preprocess.Preprocessor, "_commit", commit_then_die)
        with pytest.raises(_Killed):
            preprocess.run(_cfg(args))
    records = sorted((tmp_path / "long.partial" / ".progress").glob("*.json"))
    assert len(records) == 2 and json.loads(records[-1].read_text())["stats"]["dropped_too_few_tokens"] > 0
    preprocess.run(_cfg(args))
    (tmp_path / "long").rename(tmp_path / "resumed")
    preprocess.run(_cfg(args))  # uninterrupted, into the same output path (the manifest records it)
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "long")


def test_tasks_merge_counts_and_lengths(runs, corpus: Path, tiny_tokenizer: Path, tmp_path: Path):
    """Two tasks then merge: the dropped count is partitioned (summed) and the merged length
    distribution equals the single run's."""
    from pipeline.data.shards import read_manifest
    from pipeline.stages.preprocess import run

    args = _args(corpus, tiny_tokenizer, str(tmp_path / "m"), f"clean.min_tokens={MIN_TOKENS}", "task_count=2")
    for i in range(2):
        run(_cfg([*args, "step=shards", f"task_index={i}"]))
    run(_cfg([*args, "step=merge"]))
    merged, single = read_manifest(tmp_path / "m"), read_manifest(runs["long"])
    assert merged["doc_tokens"] == single["doc_tokens"] and merged["totals"] == single["totals"]
    for key in ("kept", "dropped_too_few_tokens", "records"):
        assert merged["stats"][key] == single["stats"][key], key


def test_output_of_an_earlier_version_is_still_complete(runs, tmp_path: Path, monkeypatch, capsys):
    """An output made before clean.min_tokens existed (its config lacks the key) counts as made
    with min_tokens=0: a rerun is a no-op, not a refusal."""
    import shutil

    out = tmp_path / "all"
    shutil.copytree(runs["all"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["clean"]["min_tokens"]
    manifest["config"]["output"] = "all"  # as if made here, by the command below
    (out / "manifest.json").write_text(json.dumps(manifest))
    cfg = manifest["config"]
    args = [f"sources.0.path={cfg['sources'][0]['path']}", "output=all", f"tokenizer.path={cfg['tokenizer']['path']}",
            "val_fraction=0.2", "shard_tokens=30000", "batch_chars=60000"]
    code, _, err = run_entry("preprocess.py", args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 0 and "already complete" in err, err
    code, _, err = run_entry("preprocess.py", [*args, "clean.min_tokens=5"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "overwrite=true" in err


def test_length_buckets_and_percentiles():
    from pipeline.data.doc_lengths import LengthHistogram, bucket_of, keep_long

    n = np.arange(1, 1 << 16)
    lo = bucket_of(n)
    assert (lo <= n).all() and (lo[:15] == n[:15]).all() and ((n - lo) * 8 < np.maximum(lo, 16)).all()
    assert all(bucket_of(np.array([1 << k]))[0] == 1 << k for k in range(4, 40))  # powers of two are edges
    x = np.random.default_rng(0).integers(1, 100_000, size=20_000)
    h = LengthHistogram()
    h.add(x[:7000])
    h.merge(LengthHistogram(_add(x[7000:])))  # through the manifest form
    j = h.to_json()
    assert (j["documents"], j["tokens"], j["max"]) == (len(x), int(x.sum()), int(x.max()))
    for q in (50, 90, 99):
        assert abs(j[f"p{q}"] - np.percentile(x, q)) <= 0.02 * np.percentile(x, q), q
    for t, docs, toks in j["at_least"]:
        assert (docs, toks) == (int((x >= t).sum()), int(x[x >= t].sum()))
    flat, lengths = np.arange(10), np.array([3, 5, 2])
    val = np.array([False, True, False])
    f, ln, v, dropped = keep_long(flat, lengths, val, 3)
    assert f.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and ln.tolist() == [3, 5] and v.tolist() == [False, True] and dropped == 1
    assert keep_long(flat, lengths, val, 0)[3] == 0 and keep_long(flat, lengths, val, 0)[0] is flat


def _add(x: np.ndarray) -> dict:
    from pipeline.data.doc_lengths import LengthHistogram

    h = LengthHistogram()
    h.add(x)
    return h.to_json()

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.sampler import (
    BlendedSamples,
    FeistelPermutation,
    RankLoader,
    Validation,
    block_counts,
    block_pattern,
    rank_indices,
)
from pipeline.data.shards import ShardWriter, TokenDataset, compute_totals, file_entries, known_hashes, list_files, write_manifest
from pipeline.errors import UserError

SEQ = 8
WEB, CODE = 200, 70  # samples of seq_len SEQ per source in train
CODE_BASE = 1_000_000  # code tokens are CODE_BASE + position, web tokens their position


def _shard(out, rel, tokens, doc_len=13):
    tokens = np.asarray(tokens, np.int64)
    lens = [doc_len] * (len(tokens) // doc_len) + ([len(tokens) % doc_len] if len(tokens) % doc_len else [])
    with ShardWriter(out, rel, "uint32") as w:
        w.add_documents(tokens, np.array(lens, np.int64))
    return w.entry


def make_dataset(out, fingerprint="ab" * 32, web=WEB, code=CODE, val=(30, 10), offset=0):
    """Two sources, web:code weights 3:1; two web shards so samples cross a shard boundary."""
    n_web, n_code = web * SEQ + 1, code * SEQ + 1
    cut = n_web // 2 + 3
    shards = [
        _shard(out, "train/web-00000", offset + np.arange(cut)),
        _shard(out, "train/web-00001", offset + np.arange(cut, n_web)),
        _shard(out, "train/code-00000", offset + CODE_BASE + np.arange(n_code)),
    ]
    if val[0] or val[1]:
        shards += [_shard(out, "val/web-00000", offset + 2_000_000 + np.arange(val[0] * SEQ + 1)),
                   _shard(out, "val/code-00000", offset + 3_000_000 + np.arange(val[1] * SEQ + 1))]
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}\n")
    write_manifest(out, {
        "dtype": "uint32",
        "tokenizer": {"dir": "tokenizer", "fingerprint": fingerprint, "vocab_size": 4_000_000},
        "sources": [{"name": "web", "weight": 3.0}, {"name": "code", "weight": 1.0}],
        "shards": shards,
        "files": file_entries(out, list_files(out), known_hashes(shards)),
        "totals": compute_totals(shards),
    })
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sampler") / "a")


def _ids(s: BlendedSamples, n: int):
    return s.locate(np.arange(n))


def test_feistel_is_a_permutation_and_keyed():
    for n in (1, 2, 3, 1000, 4097):
        for key in ((0, "web", 0), (1, "web", 0), (0, "web", 1)):
            perm = FeistelPermutation(n, *key)
            out = perm(np.arange(n))
            assert sorted(out.tolist()) == list(range(n)), (n, key)
            assert [int(perm(i)) for i in (0, n - 1)] == [out[0], out[-1]]  # scalar == vectorised
    base = FeistelPermutation(1000, 0, "web", 0)(np.arange(1000))
    assert (base != np.arange(1000)).mean() > 0.95
    for key in ((1, "web", 0), (0, "web", 1), (0, "code", 0)):
        assert (FeistelPermutation(1000, *key)(np.arange(1000)) != base).mean() > 0.95
    with pytest.raises(IndexError):
        FeistelPermutation(3, 0)(3)


def test_block_pattern_weights():
    assert block_counts([3.0, 1.0]).tolist() == [3, 1]
    for w in ([0.37, 0.63], [1, 2, 3, 4], [0.123456, 0.5, 0.376544], [1e-5, 1.0]):
        c = block_counts(w)
        assert (c >= 1).all() and c.sum() <= 1 << 16
        if min(w) / sum(w) > 1e-4:
            assert np.allclose(c / c.sum(), np.array(w) / sum(w), rtol=1e-3)
        comp, rank = block_pattern(c)
        assert np.bincount(comp).tolist() == c.tolist()
        # running counts never exceed the target by a sample (largest-deficit rule)
        running = np.cumsum(np.eye(len(c), dtype=np.int64)[comp], 0)
        target = np.outer(np.arange(1, c.sum() + 1), c) / c.sum()
        assert (running <= np.ceil(target - 1e-9)).all() and (running >= target - len(c)).all()


def test_deterministic_blend_and_contents(ds):
    a, b = BlendedSamples([(ds, 1.0)], "train", SEQ, seed=1), BlendedSamples([(ds, 1.0)], "train", SEQ, seed=1)
    other = BlendedSamples([(ds, 1.0)], "train", SEQ, seed=2)
    assert [c[0].rsplit(":", 1)[1] for c in a.components] == ["web", "code"]
    assert [(round(c[1], 6), c[2]) for c in a.components] == [(0.75, WEB), (0.25, CODE)]
    assert a.block_size == 4 and a.tokenizer["fingerprint"] == "ab" * 32
    ca, ia = _ids(a, 4000)
    cb, ib = _ids(b, 4000)
    co, io = _ids(other, 4000)
    assert (ca == cb).all() and (ia == ib).all()
    assert (ca == co).all() and (ia != io).mean() > 0.9  # same blend, different shuffles
    frac = np.bincount(ca, minlength=2) / 4000
    assert abs(frac[0] - 0.75) < 0.01 and abs(frac[1] - 0.25) < 0.01
    raw = [TokenDataset(ds, "train", src) for src in ("web", "code")]
    for g in (0, 1, 2, 3, 17, 999, 3999, 10**12 + 5):
        c, i = a.component_of(g)
        if g < 4000:
            assert (c, i) == (ca[g], ia[g])
        x = a[g]
        assert x.dtype == np.int64 and x.shape == (SEQ + 1,)
        assert (x == raw[c].sample(i, SEQ)).all()
        assert x[0] == (CODE_BASE if c else 0) + i * SEQ  # tokens identify source and sample
    assert (a.batch([5, 6, 7]) == np.stack([a[5], a[6], a[7]])).all()
    assert a.epochs(4000) == pytest.approx([3000 / WEB, 1000 / CODE])


def test_each_sample_once_per_epoch_and_reshuffled(ds):
    s = BlendedSamples([(ds, 1.0)], "train", SEQ, seed=3)
    comp, idx = _ids(s, 4000)
    for c, n in ((0, WEB), (1, CODE)):
        seq = idx[comp == c]
        epochs = [seq[e * n:(e + 1) * n] for e in range(len(seq) // n)]
        assert len(epochs) >= 10
        for ep in epochs:
            assert sorted(ep.tolist()) == list(range(n))
        assert all((epochs[e] != epochs[e + 1]).mean() > 0.8 for e in range(len(epochs) - 1))


def test_several_datasets_weights_and_errors(ds, tmp_path):
    b = make_dataset(tmp_path / "b", offset=5_000_000)
    s = BlendedSamples([(ds, 1.0), (b, 3.0)], "train", SEQ, seed=0)
    assert [round(c[1], 6) for c in s.components] == [0.1875, 0.0625, 0.5625, 0.1875]
    comp, _ = _ids(s, 1600)
    assert np.bincount(comp).tolist() == [300, 100, 900, 300]
    assert s[1][0] >= 5_000_000 or s[0][0] >= 5_000_000
    # tokenizer mismatch names both directories
    c = make_dataset(tmp_path / "c", fingerprint="cd" * 32)
    with pytest.raises(UserError, match="different tokenizers") as e:
        BlendedSamples([(ds, 1.0), (c, 1.0)], "train", SEQ, seed=0)
    assert str(ds) in str(e.value) and str(c) in str(e.value)
    # an empty split (no val shards at all, or no sample of seq_len) names split and dataset
    d = make_dataset(tmp_path / "d", val=(0, 0))
    with pytest.raises(UserError, match=f"split 'val' of dataset '{d}' holds no sample"):
        BlendedSamples([(d, 1.0)], "val", SEQ, seed=0)
    with pytest.raises(UserError, match="holds no sample of seq_len=100000"):
        BlendedSamples([(ds, 1.0)], "train", 100_000, seed=0)
    with pytest.raises(UserError, match="weight -1"):
        BlendedSamples([(ds, -1.0)], "train", SEQ, seed=0)
    # a source without samples is dropped, the rest renormalised
    e = make_dataset(tmp_path / "e", code=0)
    s = BlendedSamples([(e, 1.0)], "train", SEQ, seed=0)
    assert [(c[1], c[2]) for c in s.components] == [(1.0, WEB)] and s.dropped == [(f"{e}:code", "no sample")]


def test_rank_indices_layout():
    for world, mb, ga in ((1, 4, 1), (1, 2, 2), (2, 2, 1), (2, 1, 3), (4, 3, 2)):
        G = world * mb * ga
        for t in (0, 1, 7):
            parts = [rank_indices(t, m, r, world, mb, ga) for r in range(world) for m in range(ga)]
            flat = [i for p in parts for i in p]
            assert sorted(flat) == list(range(t * G, (t + 1) * G)) and len(set(flat)) == G
            assert all(len(p) == mb for p in parts)
    for t in range(3):
        one = rank_indices(t, 0, 0, 1, 4, 1)
        assert rank_indices(t, 0, 0, 1, 2, 2) + rank_indices(t, 1, 0, 1, 2, 2) == one
        assert rank_indices(t, 0, 0, 2, 2, 1) + rank_indices(t, 0, 1, 2, 2, 1) == one
        # micro-step m with accumulation == rank m without it
        assert rank_indices(t, 1, 0, 1, 2, 2) == rank_indices(t, 0, 1, 2, 2, 1)
    with pytest.raises(ValueError):
        rank_indices(0, 2, 0, 1, 2, 2)


def _collect(loader, n):
    return [next(loader) for _ in range(n)]


def test_rank_loader_layouts_and_resume(ds):
    s = BlendedSamples([(ds, 1.0)], "train", SEQ, seed=5)
    with RankLoader(s, 0, 1, 4, 1) as a, RankLoader(s, 0, 1, 2, 2, prefetch=0) as b, \
            RankLoader(s, 0, 2, 2, 1) as r0, RankLoader(s, 1, 2, 2, 1) as r1:
        for t in range(3):
            batch = next(a)
            assert batch.dtype == torch.int64 and batch.shape == (4, SEQ + 1)
            assert torch.equal(batch, torch.cat(_collect(b, 2)))
            assert torch.equal(batch, torch.cat([next(r0), next(r1)]))
            assert torch.equal(batch, torch.from_numpy(s.batch(range(4 * t, 4 * t + 4))))
    for prefetch in (0, 3):
        with RankLoader(s, 1, 2, 2, 2, end_step=6, prefetch=prefetch) as full:
            ref = list(full)
        assert len(ref) == 12
        with RankLoader(s, 1, 2, 2, 2, prefetch=prefetch) as first:
            got = _collect(first, 7)  # 3 steps and one micro-batch of the 4th
            state = first.state_dict()
        assert state == {"consumed_samples": 24, "step": 3}
        with RankLoader(s, 1, 2, 2, 2, prefetch=prefetch, end_step=6) as resumed:
            resumed.load_state_dict(state)
            got = got[:6] + list(resumed)
            timing = resumed.pop_timing()
        assert len(got) == 12 and all(torch.equal(x, y) for x, y in zip(got, ref))
        assert timing["batches"] == 6 and timing["read_s"] > 0 and timing["wait_s"] >= 0
    # resume with another layout of the same global batch: one rank reading everything
    with RankLoader(s, 0, 1, 8, 1, prefetch=0) as single:
        single.load_state_dict(state)
        assert torch.equal(next(single)[4:], torch.cat(ref[6:8]))


def test_validation_fixed_and_split(ds):
    one = Validation([(ds, 1.0)], SEQ, num_batches=5, micro_batch=2, seed=0)
    assert len(one) == 5 and all(real for _, real in one)
    ref = [x for x, _ in one]
    again = [x for x, _ in Validation([(ds, 1.0)], SEQ, num_batches=5, micro_batch=2, seed=0)]
    assert all(torch.equal(x, y) for x, y in zip(ref, again))
    assert {int(x[0, 0]) // 1_000_000 for x in ref} <= {2, 3}  # val tokens only
    ranks = [list(Validation([(ds, 1.0)], SEQ, 5, 2, rank=r, world=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3] and [real for _, real in ranks[1]] == [True, True, False]
    real = {b: x for r in range(2) for b, (x, ok) in zip(range(r, 6, 2), ranks[r]) if ok}
    assert sorted(real) == list(range(5)) and all(torch.equal(real[b], ref[b]) for b in range(5))
    assert len(Validation([(ds, 1.0)], SEQ, 0, 2)) == 0

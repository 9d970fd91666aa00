"""Tests for pipeline.data.tokenizer: training, HF conversion exactness, backends, fingerprint, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline.data.tokenizer import TRICKY_TEXTS, TokenizerConfig, load_tokenizer, tokenizer_fingerprint
from pipeline.data.tokenizer_train import _bounded_sample, train_sentencepiece
from pipeline.errors import UserError

transformers = pytest.importorskip("transformers")
AutoTokenizer = transformers.AutoTokenizer

_SYLLABLES = ["ka", "to", "ri", "mon", "sel", "ve", "dar", "qui", "ple", "sto", "un", "ex", "ing", "tion",
              "ab", "zo", "lu", "fen", "gra", "chi"]
_EXTRA = ["naïve", "café", "über", "数据", "模型", "東京", "🙂", "ñandú", "Ζεύς", "привет", "x = f(y)", "{}"]


def make_corpus(n_chars: int, seed: int = 0) -> list[str]:
    """Documents of pseudo-words with numbers, newlines, indentation and some unicode."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(2000)] + _EXTRA
    docs, total = [], 0
    while total < n_chars:
        lines = []
        for _ in range(rng.randint(1, 6)):
            indent = " " * rng.choice([0, 0, 0, 2, 4, 8])
            lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(2, 15))))
            if rng.random() < 0.3:
                lines[-1] += f" {rng.randint(0, 10**6)}."
        doc = "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")
        docs.append(doc)
        total += len(doc)
    return docs


CORPUS = make_corpus(200_000)
HELD_OUT = make_corpus(20_000, seed=7)
VARIED = HELD_OUT[:60] + list(TRICKY_TEXTS) + [
    "a</s>b", "<s> hello </s>", "x<pad>y<unk>", "  <s>", "tokens: <s></s>", "kamon  \n\n  selve\t\t42",
]


def _train(out: Path, model_type: str = "bpe", vocab_size: int = 500, corpus: list[str] | None = None,
           **kw) -> Path:
    cfg = TokenizerConfig(model_type=model_type, vocab_size=vocab_size, **kw)
    train_sentencepiece(CORPUS if corpus is None else corpus, cfg, out, threads=2)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {mt: _train(root / mt, mt) for mt in ("bpe", "unigram")}


def _auto_ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# -- config ----------------------------------------------------------------------------------------

def test_config_check():
    assert TokenizerConfig().check() == []
    keys = [k for k, _ in TokenizerConfig(vocab_size=100, sample_chars=0, character_coverage=1.5,
                                          max_sentence_chars=0).check()]
    assert keys == ["vocab_size", "sample_chars", "character_coverage", "max_sentence_chars"]
    assert TokenizerConfig(path="/some/dir", vocab_size=100).check() == []  # vocab_size unused when loading
    assert TokenizerConfig(character_coverage=1.0).check() == []


def test_bounded_sample():
    out = _bounded_sample(["abcdefghij", "", "klmnopqrst", "uvwxyz"], sample_chars=14, piece_chars=4)
    assert out == ["abcd", "efgh", "ij", "klmn"]
    assert sum(map(len, out)) == 14
    assert _bounded_sample(["", ""], 10, 4) == []


# -- training + saved directory ---------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_saved_dir_special_tokens(trained, model_type):
    d = trained[model_type]
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(d))
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left behind
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.is_fast and len(tok) == 500
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    # add_bos_token / add_eos_token are off: default encoding adds nothing
    assert tok("hello world")["input_ids"] == tok("hello world", add_special_tokens=False)["input_ids"]
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert "chat_template" not in config and not getattr(tok, "chat_template", None)
    assert not (d / "chat_template.jinja").exists()
    h = load_tokenizer(d)
    assert (h.vocab_size, h.bos_id, h.eos_id, h.pad_id) == (500, 1, 2, 3)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_hf_conversion_matches_sentencepiece(trained, model_type):
    """The HF tokenizer reproduces SentencePiece (except special-token strings, which HF parses)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(trained[model_type] / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(trained[model_type])
    texts = HELD_OUT[:60] + list(TRICKY_TEXTS)
    assert _auto_ids(tok, texts) == sp.encode(texts)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_encode_batch_hf_backend(trained, model_type):
    tok = AutoTokenizer.from_pretrained(trained[model_type])
    h = load_tokenizer(trained[model_type])
    assert h.backend == "hf" and "verify_native" in h.backend_reason
    assert h.encode_batch(VARIED) == _auto_ids(tok, VARIED)
    assert h.encode_batch([]) == []


def test_encode_batch_sentencepiece_backend(trained):
    tok = AutoTokenizer.from_pretrained(trained["bpe"])
    h = load_tokenizer(trained["bpe"])
    assert h.verify_native(HELD_OUT[:100]) is True
    assert h.backend == "sentencepiece", h.backend_reason
    ids = h.encode_batch(VARIED)
    assert ids == _auto_ids(tok, VARIED)
    # special-token strings typed into text are parsed as special tokens, as by AutoTokenizer
    assert h.encode_batch(["a</s>b"])[0].count(2) == 1


def test_unigram_stays_on_hf_backend(trained):
    h = load_tokenizer(trained["unigram"])
    assert h.verify_native(HELD_OUT[:20]) is False
    assert h.backend == "hf" and "Unigram" in h.backend_reason


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_decode_round_trip(trained, model_type):
    tok = AutoTokenizer.from_pretrained(trained[model_type])
    for text in ["kamon selve darqui 42 café 数据", "two\nlines  with  spaces", HELD_OUT[3]]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_set_threads(trained, monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    h = load_tokenizer(trained["bpe"])
    h.set_threads(2)
    assert os.environ["RAYON_NUM_THREADS"] == "2" and os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert h._sp_threads() == 2
    h.verify_native([])
    assert h.encode_batch(["a b", "c"]) == h._encode_hf(["a b", "c"])
    # concurrent one-thread calls (the preprocess stage): HF encodes on the calling thread, same ids
    h.set_threads(2, concurrent_calls=True)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert h.encode_batch(VARIED, threads=1) == _auto_ids(AutoTokenizer.from_pretrained(trained["bpe"]), VARIED)


def test_training_is_deterministic(tmp_path):
    for mt in ("bpe", "unigram"):
        a = _train(tmp_path / f"{mt}_a", mt, corpus=CORPUS[:400])
        b = _train(tmp_path / f"{mt}_b", mt, corpus=CORPUS[:400])
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), (mt, name)


def test_training_replaces_existing_dir(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _train(out, "bpe", vocab_size=400, corpus=CORPUS[:200])
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_sample_chars_bounds_training(tmp_path):
    # the whole corpus supports 1000 unigram tokens, its first 3000 characters do not
    # (SentencePiece BPE fills its vocabulary with zero-frequency merges, so only unigram fails)
    _train(tmp_path / "full", "unigram", vocab_size=1000)
    with pytest.raises(UserError, match="sample_chars"):
        _train(tmp_path / "tok", "unigram", vocab_size=1000, sample_chars=3000)


# -- fingerprint -----------------------------------------------------------------------------------

def test_fingerprint(trained, tmp_path):
    fp = load_tokenizer(trained["bpe"]).fingerprint
    assert len(fp) == 64 and fp == load_tokenizer(trained["bpe"]).fingerprint
    assert fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(trained["bpe"]))
    copy = shutil.copytree(trained["bpe"], tmp_path / "elsewhere" / "copy")
    assert load_tokenizer(copy).fingerprint == fp
    # padding/truncation set per call by transformers do not change it
    tok = AutoTokenizer.from_pretrained(copy)
    tok(["a", "bb cc"], padding=True, truncation=True, max_length=3)
    assert tokenizer_fingerprint(tok) == fp
    other = _train(tmp_path / "other", "bpe", vocab_size=520)
    assert load_tokenizer(other).fingerprint != fp
    assert load_tokenizer(trained["unigram"]).fingerprint != fp


# -- copying a tokenizer out of a model directory --------------------------------------------------

def _model_dir(tok: Path, dest: Path, model_type: str = "llama") -> Path:
    """A tiny model saved by save_pretrained (weights, config.json, generation_config.json) with ``tok``'s
    files, a chat template and a named one beside it, and files that are neither."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(model_type, vocab_size=load_tokenizer(tok).vocab_size, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                n_embd=32, n_layer=1, n_head=2, max_position_embeddings=32, n_positions=32)
    AutoModelForCausalLM.from_config(conf).save_pretrained(dest)
    for f in tok.iterdir():
        shutil.copy2(f, dest / f.name)
    (dest / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (dest / "additional_chat_templates").mkdir()
    (dest / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    (dest / "README.md").write_text("model card")
    (dest / "training_args.bin").write_bytes(b"\0" * 64)
    return dest


_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md", "training_args.bin"}


def test_copy_from_model_dir_takes_tokenizer_files_only(trained, tmp_path):
    model = _model_dir(trained["bpe"], tmp_path / "model")
    assert _MODEL_FILES <= {p.name for p in model.iterdir()}  # what there is to leave behind
    src = load_tokenizer(model)
    copy = src.copy_to(tmp_path / "copy")
    got = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert got == ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "tokenizer.json",
                   "tokenizer.model", "tokenizer_config.json"]
    assert copy.fingerprint == src.fingerprint == load_tokenizer(trained["bpe"]).fingerprint
    assert copy.path == tmp_path / "copy"
    tok = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert tok.chat_template == {"default": (model / "chat_template.jinja").read_text(), "tool_use": "{{ messages }}"}
    # a tokenizer-only directory is copied whole, byte for byte
    load_tokenizer(trained["bpe"]).copy_to(tmp_path / "plain")
    assert {p.name: p.read_bytes() for p in (tmp_path / "plain").iterdir()} == {
        p.name: p.read_bytes() for p in trained["bpe"].iterdir()}


def test_tokenizer_file_names_known_layouts(tmp_path):
    from pipeline.data.tokenizer_files import tokenizer_file_names

    names = ["vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model.v3",
             "tokenizer.3.1.json", "qwen.tiktoken", "spiece.model", "vocab.txt", "chat_template.json",
             "config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin", "optimizer.pt", "merges.txt.bak"]
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "notes.txt").write_text("x")
    assert tokenizer_file_names(tmp_path) == sorted(names[:10])
    assert "optimizer.pt" in tokenizer_file_names(tmp_path, extra={"optimizer.pt"})


def test_copy_adds_config_json_where_it_picks_the_class(trained, tmp_path):
    """transformers picks the class of a tokenizer whose tokenizer_config.json names none from the model's
    config.json (gpt2: GPT2Tokenizer, which rebuilds the pipeline): the copy keeps that file then."""
    model = _model_dir(trained["bpe"], tmp_path / "model", model_type="gpt2")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["tokenizer_class"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = load_tokenizer(model)
    assert src.fingerprint != load_tokenizer(trained["bpe"]).fingerprint  # config.json matters here
    copy = src.copy_to(tmp_path / "copy")
    assert copy.fingerprint == src.fingerprint
    assert (tmp_path / "copy" / "config.json").is_file() and not (tmp_path / "copy" / "model.safetensors").exists()


# -- loading without transformers --------------------------------------------------------------------

def _same_handles(a, b) -> None:
    assert (a.fingerprint, a.vocab_size, a.bos_id, a.eos_id, a.pad_id) == (b.fingerprint, b.vocab_size, b.bos_id,
                                                                           b.eos_id, b.pad_id)
    texts = VARIED + ["x<|endoftext|>y"]
    assert a.encode_batch(texts) == b.encode_batch(texts)


@pytest.mark.parametrize("kind", ["bpe", "unigram", "byte-level"])
def test_direct_load_equals_transformers(trained, tmp_path, kind):
    """tokenizer.json read with `tokenizers` alone gives what AutoTokenizer gives: ids, specials, fingerprint."""
    d = _byte_level_bpe(tmp_path / "bl") if kind == "byte-level" else trained[kind]
    direct, auto = load_tokenizer(d), load_tokenizer(d, direct=False)
    assert (direct.loader, auto.loader) == ("tokenizers", "transformers")
    _same_handles(direct, auto)
    tok = AutoTokenizer.from_pretrained(d)
    assert direct.fingerprint == tokenizer_fingerprint(tok)
    assert direct.encode_batch(VARIED) == _auto_ids(tok, VARIED)
    assert direct.hf.eos_token_id == direct.eos_id  # the transformers tokenizer, loaded on demand


def _edit_config(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def test_direct_load_defers_to_transformers(trained, tmp_path):
    """Directories transformers might not load verbatim are loaded by transformers."""
    cases = {
        "class": {"tokenizer_class": "LlamaTokenizerFast"},  # may rebuild its pipeline
        "bos": {"add_bos_token": True},  # transformers adds a post-processor
        "new_special": {"sep_token": "<sep>"},  # not in the vocabulary: transformers adds it
        "unknown_key": {"add_prefix_space": True},
    }
    for name, change in cases.items():
        d = _edit_config(trained["bpe"], tmp_path / name, **change)
        h = load_tokenizer(d)
        assert h.loader == "transformers", name
        _same_handles(h, load_tokenizer(d, direct=False))
    assert load_tokenizer(tmp_path / "new_special").vocab_size == 501  # <sep> added by transformers


def test_fingerprint_cache(trained, tmp_path, monkeypatch):
    from pipeline.data import tokenizer as tokmod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = _edit_config(trained["bpe"], tmp_path / "tok")
    want = load_tokenizer(d, direct=False).fingerprint
    assert load_tokenizer(d).fingerprint == want
    entries = list((tmp_path / "cache" / "pipeline" / "tokenizer-fingerprints").iterdir())
    assert len(entries) == 1 and json.loads(entries[0].read_text())["fingerprint"] == want
    calls = []
    monkeypatch.setattr(tokmod, "_fingerprint", lambda *a: calls.append(a) or "x")
    assert load_tokenizer(d).fingerprint == want and not calls  # served from the cache
    entries[0].write_text("garbage")  # a damaged entry is recomputed
    assert load_tokenizer(d).fingerprint == "x" and len(calls) == 1
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (d / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text().replace("<pad>", "<unk>"))
    changed = load_tokenizer(d)  # other bytes, other key: pad is now id 0
    assert changed.pad_id == 0 and changed.fingerprint == load_tokenizer(d, direct=False).fingerprint != want


def test_cached_load_and_verdict(trained, tmp_path, monkeypatch):
    """A cache hit parses no tokenizer.json for native SentencePiece, and encodes exactly as AutoTokenizer."""
    import tokenizers

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = shutil.copytree(trained["bpe"], tmp_path / "tok")
    first = load_tokenizer(d)
    assert first.verify_native(HELD_OUT[:20]) is True and "cached" not in first.backend_reason
    parsed = []
    real = tokenizers.Tokenizer.from_file
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", lambda *a: parsed.append(a) or real(*a))
    h = load_tokenizer(d)
    assert h.verify_native(HELD_OUT[:20]) is True and "verdict cached" in h.backend_reason
    assert (h.fingerprint, h.vocab_size, h.eos_id, h.pad_id) == (first.fingerprint, 500, 2, 3)
    texts = VARIED + ["</s>", "</s></s>", "a </s> b<s>\n<pad> ", "x" * 50 + "<unk>"]
    ids = h.encode_batch(texts)
    assert not parsed  # texts with special-token text were cut and encoded natively
    assert ids == _auto_ids(AutoTokenizer.from_pretrained(d), texts)
    # another tokenizer.model: another key, so the verdict is not reused
    other = _train(tmp_path / "other", "bpe", vocab_size=520)
    (d / "tokenizer.model").write_bytes((other / "tokenizer.model").read_bytes())
    h = load_tokenizer(d)
    assert h.verify_native(HELD_OUT[:20]) is False and "piece" in h.backend_reason and parsed
    assert h.encode_batch(VARIED) == ids[:len(VARIED)]


# -- existing HF tokenizers --------------------------------------------------------------------------

def _byte_level_bpe(directory: Path, eos: str | None = "<|endoftext|>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS[:300], trainer=trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(str(directory))
    return directory


def test_existing_hf_bpe_tokenizer(tmp_path):
    d = _byte_level_bpe(tmp_path / "bl")
    h = load_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert h.eos_id == tok.convert_tokens_to_ids("<|endoftext|>") and h.bos_id is None and h.pad_id is None
    assert h.verify_native(HELD_OUT[:10]) is False
    assert h.backend == "hf" and "tokenizer.model" in h.backend_reason
    assert h.encode_batch(VARIED + ["x<|endoftext|>y"]) == _auto_ids(tok, VARIED + ["x<|endoftext|>y"])


# -- user errors -----------------------------------------------------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist.*tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "nope")


def test_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(UserError, match="no tokenizer files.*tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="could not load tokenizer directory"):
        load_tokenizer(tmp_path)


def test_vocab_too_large_for_sample(tmp_path):
    with pytest.raises(UserError, match=r"corpus sample too small for vocab_size=5000.*tokenizer\.vocab_size"):
        _train(tmp_path / "tok", "unigram", vocab_size=5000, corpus=CORPUS[:100])
    assert not list(tmp_path.iterdir())


def test_vocab_too_small_for_characters(tmp_path):
    with pytest.raises(UserError, match=r"vocab_size=270 is too small.*character_coverage") as e:
        _train(tmp_path / "tok", "bpe", vocab_size=270, corpus=CORPUS[:200], character_coverage=1.0)
    assert "trainer_interface.cc" not in str(e.value)


def test_empty_sample(tmp_path):
    with pytest.raises(UserError, match="sample is empty"):
        _train(tmp_path / "tok", corpus=["", ""])


def test_tokenizer_without_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="no EOS token.*eos_token.*tokenizer_config.json"):
        load_tokenizer(tmp_path)
    # and without eos in the byte-level one
    with pytest.raises(UserError, match="no EOS token"):
        load_tokenizer(_byte_level_bpe(tmp_path / "bl", eos=None))

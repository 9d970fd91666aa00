"""SFT data: chat templates, loss masks, packing isolation, loader order and resume, inspection."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from pipeline.config import field_docs
from pipeline.data import chat, sft
from pipeline.data.sampler import rank_indices
from pipeline.errors import UserError
from pipeline.training.trainer import IGNORE_INDEX, CausalLMTask

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
STRICT = ("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
          "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
          "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")

MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(scope="module")
def chatml_tok(tiny_tokenizer):
    """A copy of the tiny tokenizer with ChatML special tokens and template."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_tokenizer)
    t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    t.chat_template = CHATML
    return t


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` distinct conversations of varied length (1 or 2 turns, some with a system message)."""
    import random

    rnd = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex many bold jugglers".split()
    out = []
    for i in range(n):
        def say(k: int) -> str:
            return " ".join(rnd.choice(words) for _ in range(k)) + f" {i}."
        msgs = [{"role": "system", "content": say(2)}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            msgs += [{"role": "user", "content": say(rnd.randint(1, 6))},
                     {"role": "assistant", "content": say(rnd.randint(1, 8))}]
        out.append(msgs)
    return out


def trained_runs(ids_mask, offsets) -> list[tuple[int, int]]:
    """Character spans of the runs of consecutive trained tokens."""
    ids, mask = ids_mask
    runs, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            runs.append((offsets[start][0], offsets[i - 1][1]))
            start = None
    return runs


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("which", ["builtin", "chatml"])
@pytest.mark.parametrize("shape", ["messages", "prompt_response"])
def test_mask_covers_replies_and_end_of_turn_exactly(tok, chatml_tok, which, shape):
    t = tok if which == "builtin" else chatml_tok
    template = chat.chat_template(t, "auto")
    assert template == (chat.BUILTIN_TEMPLATE if which == "builtin" else CHATML)
    eot_text = "</s>" if which == "builtin" else "<|im_end|>"
    eot_id = t.convert_tokens_to_ids(eot_text)
    assert chat.end_of_turn_ids(t, template)[0] == eot_id
    if shape == "messages":
        msgs = chat.normalize_example({"messages": MULTI, "id": 7}, "x:1")
    else:
        msgs = chat.normalize_example({"system": "Be brief.", "prompt": "Name a colour.", "response": "Blue."}, "x:1")
    ids, mask = sft.encode_conversation(t, msgs, template)

    # the ids are exactly what apply_chat_template gives
    text = t.apply_chat_template(msgs, chat_template=template, tokenize=False)
    enc = t(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == enc["input_ids"]
    assert ids == list(t.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=False))

    # trained text: each reply followed by its end-of-turn token, nothing else
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    runs = trained_runs((ids, mask), enc["offset_mapping"])
    assert [text[a:b] for a, b in runs] == [r + eot_text for r in replies]
    # exact positions: every end-of-turn token that closes a reply is trained, the token after it is not,
    # and the token before each reply (the marker's newline) is not
    eot_positions = [i for i, x in enumerate(ids) if x == eot_id and mask[i]]
    assert len(eot_positions) == len(replies)
    for p in eot_positions:
        assert not mask[p + 1] if p + 1 < len(ids) else True
    for a, _ in runs:
        first = next(i for i, o in enumerate(enc["offset_mapping"]) if o[1] > a)
        assert mask[first] and not mask[first - 1] and text[enc["offset_mapping"][first - 1][0]] == "\n"
    # user/system tokens never trained
    for m in msgs:
        if m["role"] != "assistant":
            s = text.index(m["content"])
            assert not any(mk for mk, o in zip(mask, enc["offset_mapping"]) if s <= o[0] < s + len(m["content"]))
    # labels of a collated row: the reply's last content token predicts the end-of-turn token
    batch = sft.collate([[(ids, mask)]], len(ids), t.pad_token_id, packed=False)
    labels = batch["labels"][0].tolist()
    for p in eot_positions:
        assert labels[p - 1] == eot_id and labels[p] == IGNORE_INDEX
    assert sum(x != IGNORE_INDEX for x in labels) == sum(mask[1:])


def test_template_choice_and_generation_prompt(tok, chatml_tok):
    assert chat.chat_template(tok, "auto") == chat.BUILTIN_TEMPLATE
    assert chat.chat_template(chatml_tok, "builtin") == chat.BUILTIN_TEMPLATE
    assert chat.chat_template(chatml_tok, "tokenizer") == CHATML
    with pytest.raises(UserError, match="no chat template"):
        chat.chat_template(tok, "tokenizer")
    assert chat.end_of_turn_ids(tok, chat.BUILTIN_TEMPLATE) == [tok.eos_token_id]
    assert chat.end_of_turn_ids(chatml_tok, CHATML) == [chatml_tok.convert_tokens_to_ids("<|im_end|>"), chatml_tok.eos_token_id]
    for t in (tok, chatml_tok):
        template = chat.chat_template(t, "auto")
        ids, mask = sft.encode_conversation(t, MULTI[:3], template)
        prompt = chat.render_prompt(t, MULTI[:2], template)
        assert prompt == ids[:mask.index(True)]  # the prompt is the training prefix before the reply
        text = t.apply_chat_template(MULTI[:2], chat_template=template, tokenize=False, add_generation_prompt=True)
        assert prompt == t(text, add_special_tokens=False)["input_ids"]
    assert chat.BUILTIN_TEMPLATE in chat.__doc__ or "<|assistant|>" in chat.__doc__


def test_empty_reply_and_template_that_rewrites_earlier_turns(tok):
    ids, mask = sft.encode_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                                        chat.BUILTIN_TEMPLATE)
    assert [i for i, m in zip(ids, mask) if m] == [tok.eos_token_id]  # an empty reply still learns to stop
    # prefixes of this template are not prefixes of the whole text ("[last]" moves): the reply text is found instead
    tpl = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %} [last]{% endif %}"
           "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, mask = sft.encode_conversation(tok, MULTI, tpl)
    text = tok.apply_chat_template(MULTI, chat_template=tpl, tokenize=False)
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    # a reply's first token may carry the space before it (SentencePiece's "▁P"): that token is the reply's, so it is trained
    assert [text[a:b].lstrip(" ") for a, b in trained_runs((ids, mask), offs)] == ["It is 4.</s>", "Paris, of course. [last]</s>"]


@pytest.mark.parametrize("obj,problem", [
    ([1, 2], "not a JSON object"),
    ({"text": "hi"}, "neither 'messages' nor 'prompt'"),
    ({"messages": []}, "empty array"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "not a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "only the first"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "must start with a user"),
    ({"prompt": "p"}, "'response' is missing"),
])
def test_bad_shapes_name_the_line_and_expected_shape(obj, problem):
    with pytest.raises(UserError) as e:
        chat.normalize_example(obj, "data.jsonl:3")
    msg = str(e.value)
    assert msg.startswith("data.jsonl:3: ") and problem in msg and '"prompt"' in msg and '"messages"' in msg


# ---------------------------------------------------------------------------- reading, length
def test_read_errors_skip_counts_and_val_split(tmp_path, tok):
    good = [{"messages": m} for m in conversations(40)]
    f = write_jsonl(tmp_path / "a.jsonl", good[:20])
    write_jsonl(tmp_path / "b.jsonl", good[20:])
    recs, st = sft.read_examples(str(tmp_path / "*.jsonl"))
    assert len(recs) == 40 and st["files"] == 2 and recs[0].where == f"{f}:1"
    bad = tmp_path / "bad" / "c.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps(good[0]) + "\n\n{not json\n" + json.dumps({"text": "x"}) + "\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{bad}:3: malformed JSON")):
        sft.read_examples(str(bad))
    shape = write_jsonl(tmp_path / "bad" / "d.jsonl", [good[0], {"text": "x"}])
    with pytest.raises(UserError, match=re.escape(f"{shape}:2: neither 'messages'")):
        sft.read_examples(str(tmp_path / "bad" / "d*.jsonl"), "fail")
    recs, st = sft.read_examples(f"{bad.parent},{f}", "skip")
    assert st == {"files": 3, "records": 26, "bad_records": 3} and len(recs) == 23
    with pytest.raises(UserError, match="does not exist"):
        sft.read_examples(str(tmp_path / "missing.jsonl"))

    # validation split by content hash: stable, disjoint, independent of file order
    recs, _ = sft.read_examples(f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.jsonl'}")
    tr, va = sft.split_val(recs, 0.25)
    tr2, va2 = sft.split_val(list(reversed(recs)), 0.25)
    assert sorted(r.where for r in va) == sorted(r.where for r in va2) and 0 < len(va) < 40
    assert len(tr) + len(va) == 40

    # template rejections: fail names the record, skip counts it
    strict = sft.SFTDataConfig(train="x", template="tokenizer", seq_len=512)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok.name_or_path)
    t.chat_template = STRICT
    bad_turns = sft.Record([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"}], "d.jsonl:9")
    with pytest.raises(UserError, match="d.jsonl:9: the chat template rejected.*alternate"):
        sft.tokenize_examples(t, [recs[0], bad_turns], strict)
    strict.bad_records = "skip"
    out, st = sft.tokenize_examples(t, [recs[0], bad_turns], strict)
    assert len(out) == 1 and st["bad_records"] == 1 and st["examples"] == 2


def test_overlong_truncate_and_drop(tok):
    convs = conversations(30)
    cfg = sft.SFTDataConfig(train="x", seq_len=4096)
    full, st = sft.tokenize_examples(tok, convs, cfg)
    assert st["examples"] == 30 and st["truncated"] == st["dropped_overlong"] == 0 and len(full) == 30
    assert st["tokens"] == sum(len(i) for i, _ in full) and st["trained_tokens"] == sum(sum(m[1:]) for _, m in full)
    limit = sorted(len(i) for i, _ in full)[15]
    n_long = sum(len(i) > limit for i, _ in full)
    cut, st = sft.tokenize_examples(tok, convs, sft.SFTDataConfig(train="x", seq_len=limit))
    assert st["truncated"] == n_long and st["dropped_overlong"] == 0
    kept = [f for f in full if len(f[0]) <= limit]
    assert all(len(i) <= limit for i, _ in cut)
    for (i, m), (fi, fm) in zip(cut, full):  # the start is kept
        assert i == fi[:len(i)] and m == fm[:len(m)]
    dropped, st = sft.tokenize_examples(tok, convs, sft.SFTDataConfig(train="x", seq_len=limit, overlong="drop"))
    assert st["dropped_overlong"] == n_long and dropped == kept and st["truncated"] == 0
    # an example cut before its reply has nothing to train: dropped and counted
    short, st = sft.tokenize_examples(tok, [MULTI], sft.SFTDataConfig(train="x", seq_len=8))
    assert short == [] and st["dropped_untrained"] == 1


# ---------------------------------------------------------------------------- packing
def test_pack_and_collate_boundaries(tok):
    exs, _ = sft.tokenize_examples(tok, conversations(25), sft.SFTDataConfig(train="x", seq_len=128))
    rows = sft.pack(exs, 128)
    assert sorted(map(id, (e for r in rows for e in r))) == sorted(map(id, exs))  # every example exactly once
    assert all(sum(len(i) for i, _ in r) <= 128 for r in rows) and len(rows) < len(exs)
    assert rows == sft.pack(exs, 128)  # deterministic
    assert [len(r) for r in sft.pack(exs, 128, packing=False)] == [1] * len(exs)

    batch = sft.collate(rows[:3], 128, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 128)
    assert batch["attention_mask"].shape == (3, 1, 128, 128) and batch["attention_mask"].dtype == torch.float32
    neg = torch.finfo(torch.float32).min
    for b, row in enumerate(rows[:3]):
        o = 0
        for ids, mask in row:
            n = len(ids)
            assert batch["input_ids"][b, o:o + n].tolist() == ids
            assert batch["position_ids"][b, o:o + n].tolist() == list(range(n))
            lab = batch["labels"][b, o:o + n].tolist()
            assert lab[-1] == IGNORE_INDEX  # no target crosses into the next example
            assert lab[:-1] == [x if m else IGNORE_INDEX for x, m in zip(ids[1:], mask[1:])]
            am = batch["attention_mask"][b, 0]
            assert (am[o:o + n, o:o + n] == torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), neg)).all()
            assert (am[o:o + n, :o] == neg).all() and (am[o:o + n, o + n:] == neg).all()
            o += n
        assert (batch["input_ids"][b, o:] == tok.pad_token_id).all() and (batch["labels"][b, o:] == IGNORE_INDEX).all()
        for q in range(o, 128):  # padding sees only itself
            assert batch["attention_mask"][b, 0, q, q] == 0 and (batch["attention_mask"][b, 0, q] == 0).sum() == 1
    half = sft.collate(rows[:1], 128, tok.pad_token_id, dtype=torch.bfloat16)["attention_mask"]
    assert half.dtype == torch.bfloat16 and half.min() == torch.finfo(torch.bfloat16).min
    flat = sft.collate([[e] for e in exs[:2]], 128, tok.pad_token_id, packed=False)
    assert flat["attention_mask"].shape == (2, 128) and flat["attention_mask"][0].sum() == len(exs[0][0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_isolates_examples_in_a_real_model(tok, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, attn_implementation=attn)
    model = LlamaForCausalLM(conf).eval()
    exs, _ = sft.tokenize_examples(tok, conversations(12, seed=3), sft.SFTDataConfig(train="x", seq_len=256))
    rows = sft.pack(exs, 256)
    assert max(len(r) for r in rows) >= 3
    batch = sft.collate(rows, 256, tok.pad_token_id)
    task = CausalLMTask()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        worst, alone_loss, alone_n = 0.0, 0.0, 0
        for b, row in enumerate(rows):
            o = 0
            for ids, mask in row:
                ref = model(input_ids=torch.tensor([ids])).logits[0]
                worst = max(worst, (logits[b, o:o + len(ids)] - ref).abs().max().item())
                o += len(ids)
                labels = sft.collate([[(ids, mask)]], len(ids), tok.pad_token_id, packed=False)["labels"][0]
                alone_loss += F.cross_entropy(ref, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
                alone_n += int((labels != IGNORE_INDEX).sum())
        packed_loss, packed_n = task.loss(model, batch)
        # one example per row, right-padded with a 2-D mask: the same logits too
        flat = sft.collate([[e] for e in exs[:3]], 256, tok.pad_token_id, packed=False)
        flat_logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"]).logits
        for b, (ids, _) in enumerate(exs[:3]):
            ref = model(input_ids=torch.tensor([ids])).logits[0]
            worst = max(worst, (flat_logits[b, :len(ids)] - ref).abs().max().item())
    assert worst < 1e-5, worst
    assert int(packed_n) == alone_n == sum(sum(m[1:]) for _, m in exs)
    assert packed_loss.item() == pytest.approx(alone_loss, rel=1e-5)


# ---------------------------------------------------------------------------- order
def _fake_rows(n: int) -> list:
    """Rows whose first token id tells which row it is (ids 10 + i)."""
    return [[([10 + i, 5, 6], [False, True, True])] for i in range(n)]


def _rows_of(batch) -> list[int]:
    return [int(x) - 10 for x in batch["input_ids"][:, 0]]


def test_loader_determinism_ranks_and_epochs():
    rows = _fake_rows(24)
    kw = dict(seq_len=4, pad_id=0)

    def take(loader, k):
        return [_rows_of(next(loader)) for _ in range(k)]

    a = take(sft.SFTLoader(rows, 0, 1, 2, 2, seed=5, **kw), 12)
    assert a == take(sft.SFTLoader(rows, 0, 1, 2, 2, seed=5, **kw), 12)
    assert a != take(sft.SFTLoader(rows, 0, 1, 2, 2, seed=6, **kw), 12)
    epoch0 = [r for mb in a[:12] for r in mb]
    assert sorted(epoch0) == list(range(24)) and epoch0 != list(range(24))  # a shuffled epoch: every row once
    epoch1 = take(sft.SFTLoader(rows, 0, 1, 2, 2, seed=5, start_step=6, **kw), 12)
    assert sorted(r for mb in epoch1 for r in mb) == list(range(24)) and epoch1 != a[:12]  # a new order per epoch
    # two ranks: disjoint, and together exactly the one-rank global batch of each step (layout of rank_indices)
    r0 = take(sft.SFTLoader(rows, 0, 2, 2, 1, seed=5, **kw), 9)
    r1 = take(sft.SFTLoader(rows, 1, 2, 2, 1, seed=5, **kw), 9)
    one = take(sft.SFTLoader(rows, 0, 1, 4, 1, seed=5, **kw), 9)
    for s in range(9):
        assert not set(r0[s]) & set(r1[s]) and r0[s] + r1[s] == one[s]
    ld = sft.SFTLoader(rows, 1, 2, 2, 1, seed=5, **kw)
    assert ld.indices(3, 0) == [ld.index(g) for g in rank_indices(3, 0, 1, 2, 2, 1)]


def test_loader_resume_and_val_batches():
    rows, kw = _fake_rows(10), dict(seq_len=4, pad_id=0)
    ref = sft.SFTLoader(rows, 0, 1, 3, 2, seed=1, **kw)
    seq = [_rows_of(next(ref)) for _ in range(10)]
    ld = sft.SFTLoader(rows, 0, 1, 3, 2, seed=1, **kw)
    for _ in range(5):  # two steps and a half
        next(ld)
    state = ld.state_dict()
    assert state == {"consumed_samples": 12, "step": 2, "items": 10}
    new = sft.SFTLoader(rows, 0, 1, 3, 2, seed=1, **kw)
    new.load_state_dict(json.loads(json.dumps(state)))
    assert [_rows_of(next(new)) for _ in range(6)] == seq[4:10]  # the unfinished step is read again
    # another layout with the same global batch continues with the same rows
    r0, r1 = sft.SFTLoader(rows, 0, 2, 3, 1, seed=1, **kw), sft.SFTLoader(rows, 1, 2, 3, 1, seed=1, **kw)
    for x in (r0, r1):
        x.load_state_dict(state)
    assert _rows_of(next(r0)) + _rows_of(next(r1)) == seq[4] + seq[5]
    with pytest.raises(UserError, match="over 11 examples"):
        new.load_state_dict({**state, "items": 11})
    with pytest.raises(UserError, match="no training example"):
        sft.SFTLoader([], 0, 1, 1, 1, seed=0, **kw)

    vrows = _fake_rows(9)
    plans = [list(sft.ValBatches(vrows, r, 2, 2, **kw)) for r in range(2)]
    assert [len(p) for p in plans] == [3, 3]  # 5 batches over 2 ranks: one pad pass
    real = [_rows_of(b) for p in plans for b, ok in p if ok]
    assert sorted(r for mb in real for r in mb) == list(range(9)) and sum(not ok for p in plans for _, ok in p) == 1
    assert [_rows_of(b) for b, _ in sft.ValBatches(vrows, 1, 2, 2, **kw)] == [_rows_of(b) for b, _ in plans[1]]
    assert len(sft.ValBatches(vrows, 0, 3, 2, num_batches=2, **kw)) == 1
    assert len(sft.ValBatches(vrows, 2, 3, 2, num_batches=2, **kw)) == 1
    assert [ok for _, ok in sft.ValBatches(vrows, 2, 3, 2, num_batches=2, **kw)] == [False]
    assert list(sft.ValBatches([], 0, 2, 2, **kw)) == []


# ---------------------------------------------------------------------------- end to end, inspection
def test_prepare_and_inspect_mark_exactly_trained_tokens(tmp_path, chatml_tok):
    convs = conversations(40, seed=9)
    write_jsonl(tmp_path / "train.jsonl", [{"messages": m} if i % 2 else
                                           {"prompt": m[-2]["content"], "response": m[-1]["content"]}
                                           for i, m in enumerate(convs)])
    cfg = sft.SFTDataConfig(train=str(tmp_path / "train.jsonl"), val_fraction=0.2, seq_len=96)
    assert cfg.check() == [] and set(field_docs(sft.SFTDataConfig)) == {f for f in vars(cfg)}
    assert [k for k, _ in sft.SFTDataConfig(seq_len=1).check()] == ["seq_len"]  # an empty train is the stage's check
    data = sft.prepare(cfg, chatml_tok)
    assert data.template == CHATML and data.end_of_turn_ids[0] == chatml_tok.convert_tokens_to_ids("<|im_end|>")
    assert data.stats["read"]["records"] == 40
    assert data.stats["train"]["examples"] + data.stats["val"]["examples"] == 40 and data.val
    assert data.stats["train"]["rows"] == len(data.train_rows) < len(data.train)

    view = sft.inspect(chatml_tok, data.train, 3, color=False)
    for k, (ids, mask) in enumerate(data.train[:3]):
        assert f"example {k}: {len(ids)} tokens, {sum(mask)} trained" in view
    marked = re.findall(r"\[\[(.*?)\]\]", view, re.S)
    expect = []
    for ids, mask in data.train[:3]:
        i = 0
        while i < len(ids):
            if mask[i]:
                j = i
                while j < len(ids) and mask[j]:
                    j += 1
                expect.append(chatml_tok.decode(ids[i:j]))
                i = j
            else:
                i += 1
    assert [m.strip() for m in marked] == [e.strip() for e in expect]
    assert all(m.rstrip().endswith("<|im_end|>") for m in marked)
    assert "\033[32m" in sft.inspect(chatml_tok, data.train, 1, color=True)
    assert f"{len(data.train)} examples" in view

"""The evaluate stage's preference task: accuracy and DPO rewards on held-out pairs.

Every number is checked against an independent computation here: the conversation rendered
with ``apply_chat_template``, tokenized, and the answer tokens' log-probs summed from a plain
transformers forward pass.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import Z3_STEPS, read_jsonl, run_ranks, tb_scalars, write_jsonl
from inproc import run_entry
from pipeline.config import load_config
from pipeline.stages.evaluate import EvalConfig, run

PAIRS = [
    {"prompt": "Name the colour of the sky.", "chosen": "blue", "rejected": "green and red"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
     "chosen": "hello", "rejected": [{"role": "assistant", "content": "goodbye now"}]},
    {"chosen": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "four"}],
     "rejected": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "five"}]},
    {"prompt": [{"role": "user", "content": "Count to three."}],
     "chosen": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"}],
     "rejected": "three two one"},
    {"prompt": "Pick a word.", "chosen": "passage", "rejected": "the distractor", "system": "One word."},
]
"""TRL's shapes: string prompt, messages, implicit prompt, full conversations, a system field."""

SHORT_PAIRS = [
    {"prompt": "hi", "chosen": "yes", "rejected": "no"},
    {"prompt": "sky?", "chosen": "blue", "rejected": "red"},
    {"prompt": "go", "chosen": "one two", "rejected": "two"},
    {"prompt": "a b", "chosen": "c", "rejected": "d e"},
    {"prompt": "word", "chosen": "the passage " * 10, "rejected": "x"},  # cut at 32 tokens: keeps its start
    {"prompt": "many words in a long prompt that fills every position " * 2, "chosen": "a", "rejected": "b"},  # dropped
    {"prompt": "up", "chosen": "down", "rejected": "left"},
    {"prompt": "cat", "chosen": "dog", "rejected": "fish"},
]
"""Short pairs for a model of 32 positions (conftest's shared checkpoint)."""

CUSTOM_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                   "{% if add_generation_prompt %}### assistant:\n{% endif %}")
"""A chat template of a tokenizer (not the builtin one's markers; answers start after a newline)."""


# ---------------------------------------------------------------------------- the independent computation


def _messages(pair: dict) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen message, rejected message) of a :data:`PAIRS` record, by hand."""
    def msg(v):
        return v[-1] if isinstance(v, list) else {"role": "assistant", "content": v}

    if "chosen" in pair and "prompt" not in pair and "messages" not in pair:
        return pair["chosen"][:-1], pair["chosen"][-1], pair["rejected"][-1]
    prompt = pair.get("messages") or pair["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if "system" in pair:
        prompt = [{"role": "system", "content": pair["system"]}, *prompt]
    return prompt, msg(pair["chosen"]), msg(pair["rejected"])


def _answer_logp(model, tok, template: str, prompt: list[dict], answer: dict, seq_len: int) -> tuple[float, int]:
    """Summed log-prob of the answer's text and the EOS closing it, after the prompt (rows cut at seq_len)."""
    import torch

    prompt_text = tok.apply_chat_template(prompt, chat_template=template, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt + [answer], chat_template=template, tokenize=False)
    assert full_text.startswith(prompt_text + answer["content"] + tok.eos_token)
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    assert ids[:len(p_ids)] == p_ids  # the answer starts on a token boundary
    end = ids.index(tok.eos_token_id, len(p_ids))
    targets = [t for t in range(len(p_ids), end + 1) if t < seq_len]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids[:seq_len]])).logits.float().log_softmax(-1)[0]
    return sum(float(logp[t - 1, ids[t]]) for t in targets), len(targets)


def expected(model_dir: Path, pairs: list[dict], template: str | None = None, seq_len: int = 64, model=None):
    """[(chosen logp, rejected logp, chosen tokens, rejected tokens)] per pair, by a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.chat import BUILTIN_TEMPLATE

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir).eval()
    template = template or tok.chat_template or BUILTIN_TEMPLATE
    out = []
    for pair in pairs:
        prompt, chosen, rejected = _messages(pair)
        (c, nc), (r, nr) = (_answer_logp(model, tok, template, prompt, a, seq_len) for a in (chosen, rejected))
        out.append((c, r, nc, nr))
    return out


def _mean(xs) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------- helpers


def _cfg(out: Path, *overrides: str) -> EvalConfig:
    return load_config(EvalConfig, None, [f"output={out}", "task=preference", *overrides])


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(f, dst / f.name)


def _model(dst: Path, tokenizer_from: Path, seed: int, **conf) -> Path:
    """A tiny Llama (another seed, or another shape) with ``tokenizer_from``'s tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    base = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    AutoModelForCausalLM.from_config(LlamaConfig(**{**base, **conf})).save_pretrained(dst)
    _copy_tokenizer(tokenizer_from, dst)
    return dst


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tiny_hf_model) -> Path:
    """A second tiny Llama with the same tokenizer: the reference, and the comparison model."""
    return _model(tmp_path_factory.mktemp("ref") / "base", tiny_hf_model, seed=1)


# ---------------------------------------------------------------------------- one process


def test_accuracy_and_log_probs_equal_a_plain_forward(tmp_path, tiny_hf_model, pairs_file):
    out = tmp_path / "eval"
    report = run(_cfg(out, f"model={tiny_hf_model}", f"data={pairs_file}", "batch_size=2"))  # 3 batches, the last short
    want = expected(tiny_hf_model, PAIRS)
    rows = read_jsonl(out / "preferences.jsonl")
    assert [r["where"] for r in rows] == [f"{pairs_file}:{i + 1}" for i in range(5)]
    for r, (c, rj, nc, nr) in zip(rows, want):
        assert (r["tokens_chosen"], r["tokens_rejected"]) == (nc, nr)
        assert r["logps_chosen"] == pytest.approx(c, abs=1e-5) and r["logps_rejected"] == pytest.approx(rj, abs=1e-5)
        assert r["correct"] == (c > rj) and r["correct_per_token"] == (c / nc > rj / nr)
    m = report["models"][0]["metrics"]
    assert m["pairs"] == 5 and m["seq_len"] == 64 and (m["truncated"], m["dropped"], m["ties"]) == (0, 0, 0)
    assert m["accuracy"] == _mean([c > r for c, r, _, _ in want])
    assert m["accuracy_per_token"] == _mean([c / nc > r / nr for c, r, nc, nr in want])
    assert m["margin"] == pytest.approx(_mean([c - r for c, r, _, _ in want]), abs=1e-5)
    assert m["logps_chosen"] == pytest.approx(_mean([c for c, *_ in want]), abs=1e-5)
    assert m["logps_rejected"] == pytest.approx(_mean([r for _, r, *_ in want]), abs=1e-5)
    assert m["mean_tokens_chosen"] == _mean([nc for *_, nc, _ in want])
    assert not any(k.startswith("reward") for k in m)  # no reference, no rewards
    saved = json.loads((out / "report.json").read_text())
    assert saved["headline"] == ["accuracy", "accuracy_per_token", "margin", "logps_chosen", "logps_rejected"]
    assert saved["models"][0]["metrics"] == m and "reference" not in saved
    assert "| accuracy |" in (out / "report.md").read_text() and "| pairs | 5 |" in (out / "report.md").read_text()
    tb = tb_scalars(out / "tensorboard" / "model")
    assert tb["eval/accuracy"] == [(0, pytest.approx(m["accuracy"]))] and "eval/margin" in tb
    capped = run(_cfg(tmp_path / "capped", f"model={tiny_hf_model}", f"data={pairs_file}", "max_batches=2"))
    assert capped["models"][0]["metrics"]["pairs"] == 2


def test_the_tokenizers_own_chat_template_is_used(tmp_path, tiny_hf_model, pairs_file):
    """A model whose tokenizer carries a chat template (as a fine-tune saves it) is scored in it;
    template=builtin scores the same weights in the builtin format instead."""
    from transformers import AutoTokenizer

    own = tmp_path / "chat_model"
    shutil.copytree(tiny_hf_model, own)
    tok = AutoTokenizer.from_pretrained(own)
    tok.chat_template = CUSTOM_TEMPLATE
    tok.save_pretrained(own)
    report = run(_cfg(tmp_path / "own", f"model={own}", f"data={pairs_file}", "batch_size=5"))
    want = expected(own, PAIRS, template=CUSTOM_TEMPLATE)
    got = [(r["logps_chosen"], r["logps_rejected"]) for r in read_jsonl(tmp_path / "own" / "preferences.jsonl")]
    assert got == [(pytest.approx(c, abs=1e-5), pytest.approx(r, abs=1e-5)) for c, r, _, _ in want]
    assert report["models"][0]["metrics"]["accuracy"] == _mean([c > r for c, r, _, _ in want])
    builtin = run(_cfg(tmp_path / "builtin", f"model={own}", f"data={pairs_file}", "template=builtin"))
    plain = expected(tiny_hf_model, PAIRS)
    assert builtin["models"][0]["metrics"]["logps_chosen"] == pytest.approx(_mean([c for c, *_ in plain]), abs=1e-5)


def test_reference_rewards_and_compare_mode(tmp_path, tiny_hf_model, base_model, pairs_file):
    """model vs compare_to, both against a reference (the compare model itself: its rewards are 0,
    ties, so its reward accuracy is 0)."""
    out = tmp_path / "eval"
    report = run(_cfg(out, f"model={tiny_hf_model}", f"compare_to={base_model}", f"reference={base_model}",
                      f"data={pairs_file}", "beta=0.5", "batch_size=3", "name=dpo"))
    pi, ref = expected(tiny_hf_model, PAIRS), expected(base_model, PAIRS)
    rc = [0.5 * (p[0] - q[0]) for p, q in zip(pi, ref)]
    rr = [0.5 * (p[1] - q[1]) for p, q in zip(pi, ref)]
    a, b = report["models"]
    m = a["metrics"]
    assert m["reward_chosen"] == pytest.approx(_mean(rc), abs=1e-5)
    assert m["reward_rejected"] == pytest.approx(_mean(rr), abs=1e-5)
    assert m["reward_margin"] == pytest.approx(_mean([c - r for c, r in zip(rc, rr)]), abs=1e-5)
    assert m["reward_accuracy"] == _mean([c > r for c, r in zip(rc, rr)])
    assert m["loss"] == pytest.approx(_mean([math.log1p(math.exp(-(c - r))) for c, r in zip(rc, rr)]), abs=1e-5)
    assert m["accuracy"] == _mean([p[0] > p[1] for p in pi]) and m["beta"] == 0.5
    assert b["metrics"]["reward_accuracy"] == 0.0 and b["metrics"]["reward_ties"] == 5
    assert b["metrics"]["reward_margin"] == 0.0 and b["metrics"]["accuracy"] == _mean([q[0] > q[1] for q in ref])
    saved = json.loads((out / "report.json").read_text())
    assert saved["headline"][:4] == ["reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"]
    assert saved["difference"]["reward_accuracy"] == m["reward_accuracy"]
    assert saved["reference"]["name"] == "base" and saved["reference"]["beta"] == 0.5
    rows = read_jsonl(out / "preferences.jsonl")
    assert [r["model"] for r in rows] == ["dpo"] * 5 + ["base"] * 5
    assert [r["reward_correct"] for r in rows[:5]] == [c > r for c, r in zip(rc, rr)]
    assert "| reward_accuracy |" in (out / "report.md").read_text()
    for name, mm in (("dpo", m), ("base", b["metrics"])):  # the names DPO training logs
        tb = tb_scalars(out / "tensorboard" / name)
        assert tb["eval/reward_accuracy"] == [(0, pytest.approx(mm["reward_accuracy"]))]
        assert {"eval/reward_margin", "eval/reward_chosen", "eval/logps_chosen", "eval/accuracy"} <= set(tb)


# ---------------------------------------------------------------------------- user errors


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_hf_model) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("cls") / "classifier"
    torch.manual_seed(3)
    conf = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=64, pad_token_id=3, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    LlamaForSequenceClassification(conf).save_pretrained(out)
    _copy_tokenizer(tiny_hf_model, out)
    return out


def test_bad_inputs_exit_2_with_one_message_before_any_weight(tmp_path, tiny_hf_model, base_model, classifier,
                                                             pairs_file, monkeypatch, capsys):
    """launch/evaluate.py in this process (inproc.run_entry: loading a model's weights would fail the test)."""
    from transformers import AutoTokenizer

    bad = tmp_path / "bad.jsonl"
    small = _model(tmp_path / "small_vocab", tiny_hf_model, seed=2, vocab_size=100)
    strict = tmp_path / "strict"
    shutil.copytree(tiny_hf_model, strict)
    tok = AutoTokenizer.from_pretrained(strict)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    tok.save_pretrained(strict)
    swapped = _model(tmp_path / "swapped", tiny_hf_model, seed=4)  # the same vocabulary size, two tokens' ids swapped
    spec = json.loads((swapped / "tokenizer.json").read_text())
    a = tok("sky", add_special_tokens=False)["input_ids"][-1]
    vocab = spec["model"]["vocab"]
    x, y = (next(t for t, i in vocab.items() if i == k) for k in (a, a + 1))
    vocab[x], vocab[y] = a + 1, a
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    model, data = f"model={tiny_hf_model}", f"data={pairs_file}"
    cases = [
        ([model, f"data={tmp_path / 'nope.jsonl'}"], "data '.*nope.jsonl' does not exist"),
        ([model, f"data={bad}"], r"bad\.jsonl:2 is not valid JSON"),
        ([model, f"data={tmp_path / 'norejected.jsonl'}"], r"norejected\.jsonl:1: no 'rejected' \(keys: prompt, chosen\)"),
        ([model, data, f"reference={tmp_path / 'missing'}"], "reference '.*missing' does not exist"),
        ([f"model={classifier}", data], "model '.*' is a LlamaForSequenceClassification; task=preference needs a causal"),
        ([model, data, f"reference={classifier}"], "reference '.*' is a LlamaForSequenceClassification; task=preference"),
        ([model, data, f"reference={tiny_hf_model}"], "is the model evaluated .* every reward would be 0"),
        ([model, data, f"reference={small}"], "reference '.*small_vocab' has 100 embeddings, but the pairs tokenized for model"),
        ([model, data, f"reference={swapped}"], (f"the tokenizer of reference '.*swapped' reads the pairs' token ids as "
                                                 f"other tokens than the one of model .* \\(id {a}: ")),
        ([model, data, "template=tokenizer"], "template=tokenizer, but the tokenizer"),
        ([f"model={strict}", data], (r"pairs\.jsonl:1: the chat template rejected this pair .*roles must alternate.* "
                                     r"use the builtin template \(template=builtin\)")),
        ([model, data, "seq_len=65"], "seq_len=65 is beyond the 64 positions"),
        ([model, data, "beta=0"], "beta: must be > 0"),
        (["task=perplexity", model, data, f"reference={base_model}"], "reference: applies to task=preference only"),
    ]
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", \n')
    write_jsonl(tmp_path / "norejected.jsonl", [{"prompt": "a", "chosen": "b"}])
    for args, message in cases:
        argv = [f"output={tmp_path / 'out'}", *(["task=preference"] if not args[0].startswith("task=") else []), *args]
        code, _, err = run_entry("evaluate.py", argv, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err, (args, err)
        assert err.strip().startswith("error: ") and err.count("error:") == 1, (args, err)
        assert re.search(message, err), (args, message, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------------------- ZeRO-3


@pytest.mark.slow
@pytest.mark.integration
def test_zero3_two_ranks_equals_one_process_with_checkpoints(tmp_path, tiny_hf_model, z3_run):
    """conftest's shared 2-rank run: its latest checkpoint is the model, its step-2 checkpoint the
    reference (both consolidated on rank 0 under ZeRO-3), an HF directory the comparison."""
    from pipeline.training.hf_model import load_model

    pairs_file = write_jsonl(tmp_path / "short.jsonl", SHORT_PAIRS)
    args = [f"model={z3_run}", f"compare_to={tiny_hf_model}", f"reference={z3_run / 'checkpoints' / 'step-00000002'}",
            f"data={pairs_file}", "batch_size=2", "task=preference"]
    one = run(_cfg(tmp_path / "one", *args))
    r = run_ranks("evaluate.py", f"output={tmp_path / 'z3'}", *args, "zero3=true", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    z3 = json.loads((tmp_path / "z3" / "report.json").read_text())
    assert z3["world_size"] == 2 and not list(tmp_path.glob("z3*/_consolidated*"))
    assert (z3["models"][0]["name"], z3["models"][0]["step"]) == (f"pretrain-step{Z3_STEPS}", Z3_STEPS)
    assert z3["reference"]["step"] == 2
    m = one["models"][0]["metrics"]
    assert (m["seq_len"], m["pairs"], m["dropped"], m["truncated"]) == (32, 7, 1, 1)  # the checkpoint's positions
    for a, b in zip(one["models"], z3["models"]):
        assert a["metrics"].keys() == b["metrics"].keys()
        for k, v in a["metrics"].items():
            assert b["metrics"][k] == pytest.approx(v, abs=1e-5), k
    rows_one, rows_z3 = read_jsonl(tmp_path / "one" / "preferences.jsonl"), read_jsonl(tmp_path / "z3" / "preferences.jsonl")
    assert len(rows_one) == len(rows_z3) == 2 * 7 and rows_one[5]["where"] == f"{pairs_file}:7"  # line 6 dropped
    for a, b in zip(rows_one, rows_z3):
        assert b["logps_chosen"] == pytest.approx(a["logps_chosen"], abs=1e-5) and b["where"] == a["where"]
    # The checkpoint's numbers against a plain forward of its consolidated weights.
    kept = SHORT_PAIRS[:5] + SHORT_PAIRS[6:]
    want = expected(tiny_hf_model, kept, seq_len=32, model=load_model(z3_run)[0].eval())
    ref = expected(tiny_hf_model, kept, seq_len=32, model=load_model(z3_run / "checkpoints" / "step-00000002")[0].eval())
    assert [(r["logps_chosen"], r["logps_rejected"], r["tokens_chosen"]) for r in rows_one[:7]] == [
        (pytest.approx(c, abs=1e-5), pytest.approx(r, abs=1e-5), nc) for c, r, nc, _ in want]
    assert m["reward_accuracy"] == _mean([(p[0] - q[0]) > (p[1] - q[1]) for p, q in zip(want, ref)])

"""The evaluate stage: perplexity, classification, generation, comparison, ZeRO-3 and user errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import Z3_STEPS, read_jsonl, run_ranks, tb_scalars, write_jsonl
from inproc import run_entry
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.eval.metrics import classification_report, contains, exact_match
from pipeline.eval.ranks import rank_plan
from pipeline.stages.evaluate import EvalConfig, run

# ---------------------------------------------------------------------------- helpers


def _cfg(out: Path, *overrides: str) -> EvalConfig:
    return load_config(EvalConfig, None, [f"output={out}", *overrides])


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _manual_loss(model, windows: list[list[int]]) -> tuple[float, int]:
    """Sum of next-token losses over ``windows``: windows of one length share a forward pass."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for n in sorted({len(w) for w in windows}):
            x = torch.tensor([w for w in windows if len(w) == n])
            logits = model(input_ids=x[:, :-1]).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return total, count


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_hf_model) -> Path:
    """A second tiny Llama (another seed) with the same tokenizer: the comparison model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other") / "base"
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_hf_model)).save_pretrained(out)
    for f in tiny_hf_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    (out / "export_meta.json").write_text(json.dumps({"step": 7}))  # as launch/export.py records it
    return out


# ---------------------------------------------------------------------------- perplexity


def test_rank_plan_gives_every_rank_the_same_number_of_passes():
    plans = [rank_plan(5, r, 2) for r in range(2)]
    assert plans == [[(0, True), (2, True), (4, True)], [(1, True), (3, True), (4, False)]]
    assert sorted(b for p in plans for b, real in p if real) == list(range(5))
    assert rank_plan(3, 0, 1) == [(0, True), (1, True), (2, True)]


def test_perplexity_on_shards_equals_manual_loop_and_writes_tensorboard(tmp_path, tiny_dataset, tiny_hf_model):
    from pipeline.data.shards import TokenDataset

    out = tmp_path / "eval"
    report = run(_cfg(out, f"model={tiny_hf_model}", f"data={tiny_dataset}", "batch_size=8"))
    m = report["models"][0]["metrics"]
    assert m["seq_len"] == 64  # the model's 64 positions (below the 1024 cap)
    ds = TokenDataset(tiny_dataset, "val")
    n = ds.num_samples(64)
    total, count = _manual_loss(_lm(tiny_hf_model), [ds.sample(i, 64).tolist() for i in range(n)])
    assert m["tokens"] == count == n * 64 and m["windows"] == n
    assert m["loss"] == pytest.approx(total / count, abs=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert _report(out)["models"][0]["metrics"] == m and _report(out)["split"] == "val"
    assert "| loss |" in (out / "report.md").read_text()
    assert not (tmp_path / "eval.partial").exists()
    tb = tb_scalars(out / "tensorboard" / "model")
    assert tb["eval/loss"] == [(0, pytest.approx(m["loss"], rel=1e-6))] and tb["eval/ppl"][0][0] == 0


def test_perplexity_on_jsonl_text_with_max_batches(tmp_path, tiny_hf_model):
    from transformers import AutoTokenizer

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a short one", "x", "numbers 1 2 3 4 5 6 7 8 9 10 11 12"]
    data = write_jsonl(tmp_path / "docs.jsonl", [{"body": t} for t in texts])
    out = tmp_path / "eval"
    report = run(_cfg(out, f"model={tiny_hf_model}", f"data={data}", "text_field=body", "seq_len=8", "batch_size=3"))
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    windows = []
    for t in texts:
        ids = tok(t)["input_ids"] + [tok.eos_token_id]
        windows += [ids[s:s + 9] for s in range(0, len(ids) - 1, 8)]
    total, count = _manual_loss(_lm(tiny_hf_model), windows)
    m = report["models"][0]["metrics"]
    assert (m["tokens"], m["windows"], m["documents"]) == (count, len(windows), 4)
    assert m["loss"] == pytest.approx(total / count, abs=1e-5)
    capped = run(_cfg(tmp_path / "capped", f"model={tiny_hf_model}", f"data={data}", "text_field=body", "seq_len=8",
                      "batch_size=3", "max_batches=1"))["models"][0]["metrics"]
    assert capped["windows"] == 3 and capped["tokens"] == sum(len(w) - 1 for w in windows[:3])


def test_compare_to_reports_both_models_and_the_difference(tmp_path, tiny_dataset, tiny_hf_model, other_model):
    out = tmp_path / "cmp"
    run(_cfg(out, f"model={tiny_hf_model}", f"compare_to={other_model}", f"data={tiny_dataset}", "max_batches=2", "name=tuned"))
    r = _report(out)
    a, b = r["models"]
    assert (a["name"], a["role"], b["name"], b["role"]) == ("tuned", "model", "base", "compare_to")
    assert a["metrics"]["tokens"] == b["metrics"]["tokens"] == 2 * 8 * 64
    assert a["metrics"]["loss"] != b["metrics"]["loss"]
    assert r["difference"]["loss"] == pytest.approx(a["metrics"]["loss"] - b["metrics"]["loss"])
    md = (out / "report.md").read_text()
    assert "| metric | tuned | base | difference |" in md and md.count("\n| ") == 4  # header + loss, ppl, tokens
    assert (a["step"], b["step"]) == (0, 7)  # b is an export of step 7
    for m in (a, b):
        tb = tb_scalars(out / "tensorboard" / m["name"])
        assert tb["eval/loss"] == [(m["step"], pytest.approx(m["metrics"]["loss"], rel=1e-6))]


# ---------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_hf_model) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("cls") / "classifier"
    torch.manual_seed(3)
    conf = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=64, pad_token_id=3, eos_token_id=2, bos_token_id=1,
                       id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    LlamaForSequenceClassification(conf).save_pretrained(out)
    for f in tiny_hf_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    return out


def test_classification_predictions_match_argmax_and_metrics(tmp_path, classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["good movie", "terrible plot and acting", "it was fine I guess", "loved every minute of it", "meh",
             "the worst film of the year by far", "solid", "an average afternoon"]
    labels = ["pos", "neg", "neu", "pos", 1, "neg", "2", "neu"]  # names and integer ids both work
    data = write_jsonl(tmp_path / "cls.jsonl", [{"sentence": t, "y": y} for t, y in zip(texts, labels)])
    out = tmp_path / "eval"
    report = run(_cfg(out, "task=classification", f"model={classifier}", f"data={data}", "text_field=sentence",
                      "label_field=y", "batch_size=3"))
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(8))
    assert [r["label"] for r in rows] == ["pos", "neg", "neu", "pos", "neu", "neg", "pos", "neu"]
    model, tok = AutoModelForSequenceClassification.from_pretrained(classifier).eval(), AutoTokenizer.from_pretrained(classifier)
    with torch.no_grad():
        for r, t in zip(rows, texts):
            logits = model(**tok(t, return_tensors="pt")).logits[0]
            assert r["prediction"] == model.config.id2label[int(logits.argmax())]
            assert r["confidence"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
            assert r["correct"] == (r["prediction"] == r["label"])
    names = ["neg", "neu", "pos"]
    expected = classification_report([names.index(r["label"]) for r in rows], [names.index(r["prediction"]) for r in rows], names)
    m = report["models"][0]["metrics"]
    assert m["confusion_matrix"] == expected["confusion_matrix"] and m["per_class"] == expected["per_class"]
    assert (m["accuracy"], m["macro_f1"], m["examples"]) == (expected["accuracy"], expected["macro_f1"], 8)
    assert tb_scalars(out / "tensorboard" / "classifier")["eval/accuracy"] == [(0, pytest.approx(m["accuracy"]))]


def test_classification_csv_pairs_and_unknown_labels(tmp_path, classifier):
    data = tmp_path / "pairs.csv"
    data.write_text("premise,hypothesis,label\nit rains,the ground is wet,pos\nsun,night,neg\n")
    out = tmp_path / "eval"
    run(_cfg(out, "task=classification", f"model={classifier}", f"data={data}", "text_field=premise", "text_pair_field=hypothesis"))
    assert [(r["text_pair"], r["label"]) for r in read_jsonl(out / "predictions.jsonl")] == [("the ground is wet", "pos"), ("night", "neg")]
    data.write_text("premise,hypothesis,label\na,b,pos\nc,d,happy\ne,f,7\n")
    with pytest.raises(UserError) as e:
        run(_cfg(tmp_path / "bad", "task=classification", f"model={classifier}", f"data={data}", "text_field=premise"))
    assert "'happy'" in str(e.value) and "'7'" in str(e.value) and "neg, neu, pos" in str(e.value)
    with pytest.raises(UserError, match="text_field"):
        run(_cfg(tmp_path / "bad", "task=classification", f"model={classifier}", f"data={data}"))
    with pytest.raises(UserError, match="LlamaForCausalLM; task=classification needs a \\*ForSequenceClassification"):
        data.write_text("text,label\na,neg\n")
        run(_cfg(tmp_path / "bad", "task=classification", f"model={_causal_with_labels(tmp_path, classifier)}", f"data={data}"))
    with pytest.raises(UserError, match="LlamaForSequenceClassification; task=perplexity needs a causal language model"):
        run(_cfg(tmp_path / "bad", f"model={classifier}", f"data={data}"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def _causal_with_labels(tmp_path: Path, classifier: Path) -> Path:
    """A causal LM directory (config with labels) for the wrong-model-kind error."""
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path / "causal"
    LlamaForCausalLM(AutoConfig.from_pretrained(classifier)).save_pretrained(out)
    for f in classifier.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out / f.name)
    return out


# ---------------------------------------------------------------------------- generation


def test_generation_scores_from_the_generations_file(tmp_path, tiny_hf_model):
    rows_in = [{"prompt": "What is the capital of France?", "response": "unknown"},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
                             {"role": "assistant", "content": "unknown"}]},
               {"prompt": "Count to three.", "response": "unknown"}]
    data = write_jsonl(tmp_path / "gen.jsonl", rows_in)
    args = ["task=generation", f"model={tiny_hf_model}", "max_new_tokens=6", "batch_size=2"]
    run(_cfg(tmp_path / "first", *args, f"data={data}"))
    first = read_jsonl(tmp_path / "first" / "generations.jsonl")
    gens = [r["generation"] for r in first]
    assert len(gens) == 3 and all(0 < r["new_tokens"] <= 6 for r in first)
    # References: what greedy decoding produced (exact), something else (neither), and a
    # re-cased, punctuated piece of the generation (contained, not exact).
    words = gens[2].split() or [gens[2]]
    refs = [gens[0], "zebra quartz", words[0].upper() + "!"]
    rows_in[0]["response"], rows_in[2]["response"] = refs[0], refs[2]
    rows_in[1]["messages"][-1]["content"] = refs[1]
    write_jsonl(data, rows_in)
    out = tmp_path / "second"
    report = run(_cfg(out, *args, f"data={data}"))
    rows = read_jsonl(out / "generations.jsonl")
    assert [r["generation"] for r in rows] == gens  # greedy decoding is deterministic, batched or not
    assert [r["reference"] for r in rows] == refs
    assert [r["exact"] for r in rows] == [exact_match(g, x) for g, x in zip(gens, refs)]
    assert [r["contains"] for r in rows] == [contains(g, x) for g, x in zip(gens, refs)]
    assert rows[0]["exact"] and rows[0]["contains"] and not rows[1]["exact"] and not rows[1]["contains"]
    assert rows[2]["contains"] and (not rows[2]["exact"] or gens[2].strip() == refs[2])
    m = report["models"][0]["metrics"]
    assert m["exact_match"] == pytest.approx(sum(r["exact"] for r in rows) / 3)
    assert m["contains"] == pytest.approx(sum(r["contains"] for r in rows) / 3)
    assert m["examples"] == 3 and set(rows[0]) >= {"prompt", "reference", "generation", "exact", "contains"}
    assert "exact_match" in (out / "report.md").read_text()
    tb = tb_scalars(out / "tensorboard" / "model")
    assert tb["eval/exact_match"] == [(0, pytest.approx(m["exact_match"]))] and "eval/contains" in tb
    # One example alone, unbatched, decodes to the same text.
    write_jsonl(data, rows_in[2:])
    alone = run(_cfg(tmp_path / "alone", *args, f"data={data}"))
    assert read_jsonl(tmp_path / "alone" / "generations.jsonl")[0]["generation"] == gens[2]
    assert alone["models"][0]["metrics"]["contains"] == 1.0


def test_generation_needs_a_reference(tmp_path, tiny_hf_model):
    data = write_jsonl(tmp_path / "gen.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match=r"gen\.jsonl:1 has no reference"):
        run(_cfg(tmp_path / "out", "task=generation", f"model={tiny_hf_model}", f"data={data}"))
    write_jsonl(data, [{"prompt": "hi"}])
    with pytest.raises(UserError, match=r"gen\.jsonl:1: 'response' is missing"):
        run(_cfg(tmp_path / "out", "task=generation", f"model={tiny_hf_model}", f"data={data}"))


# ---------------------------------------------------------------------------- errors and ZeRO-3


def test_user_errors(tmp_path, tiny_dataset, tiny_hf_model):
    with pytest.raises(UserError, match="does not exist"):
        run(_cfg(tmp_path / "o", f"model={tmp_path / 'nope'}", f"data={tiny_dataset}"))
    with pytest.raises(UserError, match="data .* does not exist"):
        run(_cfg(tmp_path / "o", f"model={tiny_hf_model}", f"data={tmp_path / 'nope'}"))
    with pytest.raises(UserError, match="neither a Hugging Face model directory"):
        run(_cfg(tmp_path / "o", f"model={tmp_path}", f"data={tiny_dataset}"))
    with pytest.raises(UserError, match="split 'test' is not in dataset"):
        run(_cfg(tmp_path / "o", f"model={tiny_hf_model}", f"data={tiny_dataset}", "split=test"))
    with pytest.raises(UserError, match="beyond the 64 positions"):
        run(_cfg(tmp_path / "o", f"model={tiny_hf_model}", f"data={tiny_dataset}", "seq_len=65"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"txt": "typo"}])
    with pytest.raises(UserError, match=r"d\.jsonl:2 has no 'text' field \(fields found: txt\); set text_field="):
        run(_cfg(tmp_path / "o", f"model={tiny_hf_model}", f"data={data}"))
    assert not (tmp_path / "o").exists()


def test_cli_errors_exit_2_with_one_message(tmp_path, tiny_dataset, monkeypatch, capsys):
    # launch/evaluate.py in this process (inproc.run_entry); one real launch of it: test_error_catalogue.py
    args = [f"output={tmp_path / 'o'}", f"model={tmp_path / 'missing'}", f"data={tiny_dataset}"]
    code, _, err = run_entry("evaluate.py", args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith("error: model ") and "does not exist" in err
    (tmp_path / "o").mkdir()
    code, _, err = run_entry("evaluate.py", args, monkeypatch, capsys)
    assert code == 2 and "already exists" in err and "overwrite=true" in err
    code, _, err = run_entry("evaluate.py", ["task=classification", "batch_size=0"], monkeypatch, capsys)
    assert code == 2 and "model: no model" in err and "batch_size: must be >= 1" in err


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_checkpoint_is_evaluated_at_its_step(tmp_path, tiny_dataset, z3_run):
    """conftest's shared run (directory ``pretrain``, 2 ranks, ZeRO-3): its latest checkpoint, step 4."""
    from pipeline.data.shards import TokenDataset
    from pipeline.training.hf_model import load_model

    out = tmp_path / "eval"
    report = run(_cfg(out, f"model={z3_run}", f"data={tiny_dataset}", "max_batches=2", "batch_size=4"))
    m = report["models"][0]
    name = f"pretrain-step{Z3_STEPS}"
    assert (m["name"], m["step"]) == (name, Z3_STEPS) and m["checkpoint"].endswith(f"step-{Z3_STEPS:08d}")
    assert m["metrics"]["seq_len"] == 32  # the checkpoint's positions
    ds = TokenDataset(tiny_dataset, "val")
    total, count = _manual_loss(load_model(z3_run)[0], [ds.sample(i, 32).tolist() for i in range(8)])
    assert m["metrics"]["loss"] == pytest.approx(total / count, abs=1e-5)
    assert tb_scalars(out / "tensorboard" / name)["eval/loss"][0][0] == Z3_STEPS  # TensorBoard step = checkpoint step


@pytest.mark.slow
@pytest.mark.integration
def test_zero3_two_ranks_equals_single_process(tmp_path, tiny_dataset, tiny_hf_model, z3_run):
    """2 CPU ranks, ZeRO-3: an HF directory loaded partitioned and a checkpoint (conftest's shared
    2-rank ZeRO-3 run) consolidated on rank 0."""
    args = [f"model={tiny_hf_model}", f"compare_to={z3_run}", f"data={tiny_dataset}", "max_batches=5", "batch_size=4"]
    single = run(_cfg(tmp_path / "one", *args))
    r = run_ranks("evaluate.py", f"output={tmp_path / 'z3'}", *args, "zero3=true", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    z3 = _report(tmp_path / "z3")
    assert z3["world_size"] == 2 and not list(tmp_path.glob("z3*/_consolidated*"))
    assert single["models"][0]["metrics"]["seq_len"] == 32  # the smaller model's positions, for both
    for a, b in zip(single["models"], z3["models"]):
        assert b["name"] == a["name"] and b["metrics"]["tokens"] == a["metrics"]["tokens"] == 5 * 4 * 32
        assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], abs=1e-4)

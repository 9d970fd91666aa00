"""The fine-tuning stage: SFT and classification, from a Hugging Face directory or a pipeline checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import Z3_STEPS, run_ranks, run_script, write_jsonl
from inproc import run_entry

pytestmark = pytest.mark.integration
ENV = {"OMP_NUM_THREADS": "1"}


def _qa(tmp: Path, n: int = 240) -> Path:
    from pipeline.data.sample import generate_qa

    return write_jsonl(tmp / "qa.jsonl", list(generate_qa(n)))


def _cls(tmp: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    warm, cold = ["red", "golden", "yellow"], ["blue", "silver", "white"]
    rows = []
    for i in range(n):
        label = rng.choice(["warm", "cold"])
        color = rng.choice(warm if label == "warm" else cold)
        rows.append({"text": f"The flag of town {i} is {color} and {rng.choice(['old', 'new', 'big'])}.", "label": label})
    return write_jsonl(tmp / "cls.jsonl", rows)


def _common(out: Path, model: Path, *extra: str) -> list[str]:
    return [f"output={out}", f"model.path={model}", "train.micro_batch_size=4", "train.warmup_steps=2", "monitor.log_every=1",
            "checkpoint.every=0", "train.eval_every=0", "train.eval_batches=2", *extra]


@pytest.mark.slow
def test_sft_trains_and_saves_template(tmp_path: Path, tiny_hf_model: Path):
    data = _qa(tmp_path)
    r = run_script("finetune.py", *_common(tmp_path / "run", tiny_hf_model, "task=sft", f"sft.train={data}", "sft.seq_len=64",
                                           "train.max_steps=6", "train.lr=3e-3"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["task"] == "sft" and meta["eos_token_ids"][0] == 2 and meta["data"]["train"]["examples"] > 200
    tok_conf = json.loads((ckpt / "hf" / "tokenizer" / "tokenizer_config.json").read_text())
    template = tok_conf.get("chat_template") or (ckpt / "hf" / "tokenizer" / "chat_template.jinja").read_text()
    assert "<|assistant|>" in template
    losses = json.loads((tmp_path / "run" / "losses.json").read_text())["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "eval step 6 | loss" in r.stdout


def test_inspect_marks_trained_tokens(tmp_path: Path, tiny_hf_model: Path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Who founded Kalo?", "response": "Ren Tor"}])
    code, out, err = run_entry("finetune.py", ["--inspect", "1", *_common(tmp_path / "run", tiny_hf_model, f"sft.train={data}",
                                                                         "sft.val_fraction=0", "sft.seq_len=64")], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "Who founded Kalo?" in out and "[[" in out
    trained = "".join(part.split("]]")[0] for part in out.split("[[")[1:])
    assert "Ren Tor" in trained and "Who founded" not in trained and "</s>" in trained
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_classification_learns_above_chance(tmp_path: Path, tiny_hf_model: Path):
    data = _cls(tmp_path)
    r = run_script("finetune.py", *_common(tmp_path / "run", tiny_hf_model, "task=classification", f"classification.train={data}",
                                           "classification.max_length=32", "train.max_steps=40", "train.lr=3e-3",
                                           "train.eval_batches=0", "deepspeed.config=ds_configs/zero1.json",
                                           "classification.class_weights=balanced"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("eval step 40")]
    assert lines, r.stdout[-2000:]
    acc = float(lines[-1].split("accuracy ")[1].split()[0])
    assert acc > 0.8, lines
    conf = json.loads((tmp_path / "run" / "checkpoints" / "step-00000040" / "hf" / "config.json").read_text())
    assert conf["id2label"] == {"0": "cold", "1": "warm"} and conf["architectures"][0].endswith("ForSequenceClassification")


@pytest.mark.slow
def test_sft_from_pipeline_checkpoint_two_ranks_zero3(tmp_path: Path, z3_run: Path):
    """Fine-tuning on 2 ranks (ZeRO-3) starts from a training run's checkpoint (conftest's shared
    2-rank ZeRO-3 run, only read): rank 0 exports it into init_model. (The checkpoint of every
    shipped DeepSpeed config as a fine-tune's start: test_ds_configs_roundtrip.py.)"""
    assert json.loads((z3_run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    data = _qa(tmp_path)
    r = run_ranks("finetune.py", *_common(tmp_path / "ft", z3_run, f"sft.train={data}", "sft.seq_len=32",
                                              "train.max_steps=3", "train.micro_batch_size=2"))
    assert r.returncode == 0, r.stdout[-3000:]
    step = z3_run / "checkpoints" / f"step-{Z3_STEPS:08d}"
    assert json.loads((tmp_path / "ft" / "init_model" / "export_meta.json").read_text())["source_checkpoint"] == str(step.resolve())
    assert json.loads((tmp_path / "ft" / "checkpoints" / "step-00000003" / "meta.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("extra, message", [
    (["task=sft"], "sft.train: is empty"),
    (["task=classification", "classification.train=nowhere.jsonl"], "classification.train 'nowhere.jsonl' does not exist"),
    (["model.path=/nonexistent", "sft.train=BAD"], "model.path '/nonexistent' does not exist"),
    (["task=sft", "sft.train=BAD"], "bad.jsonl:2: 'prompt' is a number, not a string"),
])
def test_finetune_user_errors(tmp_path: Path, tiny_hf_model: Path, extra, message, monkeypatch, capsys):
    """Exit 2 and the message, no output written; refused before the process group (a bad record
    too: the records are read before it), so run in this process. (A real launch refused on a bad
    record: test_error_catalogue.py's "finetune: bad chat line".)"""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    extra = [e.replace("BAD", str(bad)) for e in extra]
    # sft.seq_len within the tiny model's 64 positions, so the data checks are reached
    code, _, err = run_entry("finetune.py", [*_common(tmp_path / "run", tiny_hf_model, "sft.seq_len=64"), *extra], monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sft_learns_to_answer_far_above_the_base_model(tmp_path: Path, tiny_hf_model: Path):
    """A small made-up chat set: after fine-tuning, greedy answers match the references."""
    from pipeline.config import load_config
    from pipeline.stages.evaluate import EvalConfig
    from pipeline.stages.evaluate import run as evaluate

    rng = random.Random(3)
    facts = [(f"What is the code word for town {t}?", rng.choice(["amber", "basalt", "cobalt", "dune", "ember", "fjord"]))
             for t in ("Kalo", "Mira", "Tor", "Vel", "Dun", "Esh", "Fa", "Gor")]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in facts]
    train = write_jsonl(tmp_path / "chat.jsonl", rows * 8)
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": q, "response": a} for q, a in facts])
    r = run_script("finetune.py", *_common(tmp_path / "ft", tiny_hf_model, f"sft.train={train}", "sft.val_fraction=0",
                                           "sft.seq_len=64", "train.max_steps=150", "train.lr=5e-3", "train.eval_batches=0",
                                           "deepspeed.config=ds_configs/zero1.json"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    # the evaluate stage in this process (its launch: test_error_catalogue.py, test_evaluate.py)
    evaluate(load_config(EvalConfig, None, [f"model={tmp_path / 'ft'}", f"compare_to={tiny_hf_model}", "task=generation",
                                            f"data={held}", f"output={tmp_path / 'eval'}", "max_new_tokens=8"]))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    scores = {m["name"]: m["metrics"]["exact_match"] for m in report["models"]}
    tuned, base = scores[report["models"][0]["name"]], scores[report["models"][1]["name"]]
    assert tuned >= 0.75 and base == 0.0, scores
    gens = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 16 and all({"prompt", "reference", "generation", "exact"} <= set(g) for g in gens)

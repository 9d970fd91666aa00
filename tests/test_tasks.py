"""The fine-tuning task registry (pipeline/training/tasks): every task has every part, the
config's ``task`` key takes exactly the registered names, and each task's parts work on tiny
data and a tiny model in process (the full stage runs are in test_finetune.py)."""

from __future__ import annotations

import inspect as pyinspect
import shutil
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_jsonl
from pipeline.config import load_config
from pipeline.errors import ConfigError, UserError
from pipeline.stages import finetune
from pipeline.stages.finetune import FinetuneConfig
from pipeline.training.tasks import TASKS, FinetuneTask
from pipeline.training.tasks.base import pad_id
from pipeline.training.tasks.classification import ClassificationLoss
from pipeline.training.trainer import CausalLMTask

HEADS = ("causal_lm", "classification")  # what pipeline.training.model.build_model and the planner build


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, list(overrides))


def _run(precision: str = "fp32") -> SimpleNamespace:
    """The parts of :class:`pipeline.training.engine.Run` a task's loaders read: one rank, 2 per micro-batch."""
    return SimpleNamespace(rank=0, world=1, dp_rank=0, dp_world=1, micro=2, accum=1, sp=1, precision=precision,
                           consumed_samples=None, shard=lambda batches: batches)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, **kw)


def _qa(path: Path, n: int = 12) -> Path:
    return write_jsonl(path, [{"prompt": f"Who keeps the key of gate {i}?", "response": f"Warden {i}"} for i in range(n)])


def _pairs(path: Path, n: int = 12) -> Path:
    return write_jsonl(path, [{"prompt": f"Who keeps the key of gate {i}?", "chosen": f"Warden {i}", "rejected": f"Nobody {i}"}
                              for i in range(n)])


def _labelled(path: Path, n: int = 24) -> Path:
    return write_jsonl(path, [{"text": f"the sky over town {i} is {'red' if i % 2 else 'blue'}", "label": "warm" if i % 2 else "cold"}
                              for i in range(n)])


# ---------------------------------------------------------------------------- the registry
@pytest.mark.parametrize("name", list(TASKS))
def test_every_registered_task_has_every_part(name):
    cls = TASKS[name]
    assert issubclass(cls, FinetuneTask) and cls.name == name
    assert not pyinspect.isabstract(cls), f"{cls.__name__} lacks {sorted(cls.__abstractmethods__)}"
    hints = typing.get_type_hints(FinetuneConfig)
    assert hints.get(cls.section) is cls.config_class, f"FinetuneConfig needs a field {cls.section}: {cls.config_class.__name__}"
    assert typing.get_type_hints(cls.config_class).get(cls.seq_len_field) is int
    assert {"train", "val"} <= set(typing.get_type_hints(cls.config_class)), "data_files reads <section>.train and .val"
    assert cls.head in HEADS and cls.data_what.strip()
    task = cls(FinetuneConfig(task=name))  # made from the config alone: nothing read yet
    assert task.seq_len == getattr(getattr(task.cfg, cls.section), cls.seq_len_field)
    assert finetune.finetune_seq_len(task.cfg) == task.seq_len and finetune.finetune_head(task.cfg) == cls.head
    sections = {c.section for c in TASKS.values()}
    assert len(sections) == len(TASKS), "two tasks share a config section"


def test_config_task_key_takes_exactly_the_registered_names():
    assert typing.get_args(typing.get_type_hints(FinetuneConfig)["task"]) == tuple(TASKS)
    with pytest.raises(ConfigError) as e:
        _cfg("task=kto", "sft.train=x.jsonl")
    assert f"task: got 'kto'; must be one of: {', '.join(TASKS)}" in str(e.value)
    assert "sft, classification" in str(e.value)  # the message users saw before the registry


@pytest.mark.parametrize("name", list(TASKS))
def test_only_the_chosen_tasks_data_is_required(name):
    """Each task's check names its own section's empty train key, and no other task's."""
    cls = TASKS[name]
    with pytest.raises(ConfigError) as e:
        _cfg(f"task={name}")
    problems = [key for key, _ in e.value.problems]
    assert problems == [f"{cls.section}.train"], problems
    assert f"{cls.section}.train: is empty; set it to {cls.data_what}" in str(e.value)
    assert _cfg(f"task={name}", f"{cls.section}.train=x.jsonl").task == name
    files = cls(_cfg(f"task={name}", f"{cls.section}.train=a.jsonl", f"{cls.section}.val=b.jsonl")).data_files()
    assert files == [(f"{cls.section}.train", "a.jsonl"), (f"{cls.section}.val", "b.jsonl")]


def test_sft_packing_needs_a_4d_mask_kernel_and_classification_does_not_care():
    with pytest.raises(ConfigError, match="model.attn_implementation: packing needs sdpa or eager"):
        _cfg("sft.train=x", "model.attn_implementation=flash_attention_2")
    _cfg("sft.train=x", "model.attn_implementation=flash_attention_2", "sft.packing=false")
    _cfg("task=classification", "classification.train=x", "model.attn_implementation=flash_attention_2")


# ---------------------------------------------------------------------------- sft
def test_sft_task_parts(tmp_path, tok):
    data = _qa(tmp_path / "qa.jsonl")
    task = TASKS["sft"](_cfg(f"sft.train={data}", "sft.val_fraction=0.25", "sft.seq_len=64", "train.eval_batches=2"))
    task.prepare(tok)
    s = task.data.stats
    assert task.describe() == f"sft: {s['train']['examples']} train / {s['val']['examples']} val examples in {s['train']['rows']} rows"
    assert s["train"]["examples"] + s["val"]["examples"] == 12 and s["val"]["examples"] > 0
    meta = task.meta()
    assert list(meta) == ["task", "eos_token_ids", "data"] and meta["task"] == "sft" and meta["eos_token_ids"] == task.data.end_of_turn_ids

    conf = _llama()
    before = conf.to_dict()
    task.configure(conf, tok)
    assert tok.chat_template == task.data.template and conf.to_dict() == before  # only the tokenizer changes

    (block,) = task.inspect(tok, 1)
    assert "--- example 0:" in block and "[[" in block

    train, val = task.loaders(_run(), 0)
    batch = next(iter(train))
    assert batch["input_ids"].shape == (2, 64) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.float32  # the 4-D packing mask in the compute dtype
    bf16 = next(iter(task.loaders(_run("bf16"), 0)[0]))
    assert bf16["attention_mask"].dtype == torch.bfloat16

    loss = task.loss()
    assert isinstance(loss, CausalLMTask)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama(), attn_implementation="sdpa")
    total, n = loss.loss(model, batch)
    assert int(n) == loss.targets(batch) > 0 and torch.isfinite(total) and loss.tokens(batch) == 2 * 64
    metrics = task.evaluate(model, val)
    assert list(metrics) == ["loss", "ppl"] and metrics["ppl"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item())
    assert model.training  # validation hands the model back in training mode


# ---------------------------------------------------------------------------- classification
def test_classification_task_parts(tmp_path, tok):
    data = _labelled(tmp_path / "cls.jsonl")
    task = TASKS["classification"](_cfg("task=classification", f"classification.train={data}", "classification.val_fraction=0.25",
                                        "classification.class_weights=balanced", "classification.max_length=16",
                                        "train.eval_batches=0"))
    task.prepare(tok)
    assert task.label_names == ["cold", "warm"]
    assert task.describe() == (f"classification: {len(task.train_items)} train / {len(task.val_items)} val examples, "
                               "labels ['cold', 'warm']")
    meta = task.meta()
    assert list(meta) == ["task", "labels", "data"] and meta["labels"] == ["cold", "warm"]
    assert meta["data"]["train"] + meta["data"]["val"] == 24

    conf = _llama(pad_token_id=None)
    task.configure(conf, tok)
    assert conf.num_labels == 2 and conf.id2label == {0: "cold", 1: "warm"} and conf.label2id == {"cold": 0, "warm": 1}
    assert conf.pad_token_id == pad_id(tok) is not None  # decoder classifiers find the last real token by it
    kept = _llama(pad_token_id=7)
    task.configure(kept, tok)
    assert kept.pad_token_id == 7

    lines = task.inspect(tok, 3)
    assert len(lines) == 3 and all(line.startswith(("[cold] ", "[warm] ")) for line in lines)
    assert "town" in lines[0]

    train, val = task.loaders(_run(), 0)
    batch = next(iter(train))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"} and batch["labels"].shape == (2,)
    loss = task.loss()
    assert isinstance(loss, ClassificationLoss) and loss.weights is not None and len(loss.weights) == 2

    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(conf)
    total, n = loss.loss(model, batch)
    assert int(n) == loss.targets(batch) == 2 and torch.isfinite(total) and loss.tokens(batch) == int(batch["attention_mask"].sum())
    metrics = task.evaluate(model, val)
    assert list(metrics) == ["loss", "accuracy"] and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0


# ---------------------------------------------------------------------------- the stage composes them
@pytest.mark.parametrize("name", list(TASKS))
def test_stage_inspect_prints_the_tasks_view(tmp_path, tiny_tokenizer, capsys, name):
    """``--inspect`` through the stage, in process: the inputs checked with the task's sequence
    length key, then the task's blocks and its describe line."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(_llama()).save_pretrained(model_dir)
    for f in Path(tiny_tokenizer).iterdir():
        shutil.copy2(f, model_dir / f.name)
    data = {"sft": _qa, "dpo": _pairs}.get(name, _labelled)(tmp_path / "d.jsonl")
    cls = TASKS[name]
    common = (f"task={name}", f"model.path={model_dir}", f"{cls.section}.train={data}", f"output={tmp_path / 'run'}")
    key = f"{cls.section}.{cls.seq_len_field}"
    with pytest.raises(UserError, match=f"the sequence length {key}=256 is beyond the model's 128 positions; lower {key}"):
        finetune.inspect(_cfg(*common, f"{key}=256"), 2)
    assert finetune.inspect(_cfg(*common, f"{key}=64"), 2) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith(f"{name}: ")
    if name == "classification":
        assert out[0].startswith(("[cold] ", "[warm] ")) and len(out) == 3
    else:
        assert "[[" in "\n".join(out)
    if name == "dpo":  # both answers of a pair, their log-prob tokens marked (answer + EOS), the prompt not
        text = "\n".join(out)
        assert "--- pair 0 chosen:" in text and "--- pair 0 rejected:" in text
        assert "Warden 0</s>]]" in text and "Nobody 0</s>]]" in text
        assert all("[[" not in line for line in out if "Who keeps the key" in line)
    assert not (tmp_path / "run").exists()

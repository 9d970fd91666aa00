"""The built-in sample: a generated corpus and a reading task, deterministic, nothing third-party.

A made-up world of towns (river, founder, founding year, flag colour, trade, symbol animal).
Two kinds of documents make up the pre-training corpus (:func:`generate`):

* *encyclopedia* articles about a fixed set of towns, whose facts repeat consistently
  across documents (a small model learns the phrasing and some of the facts);
* *reading* documents: a short passage about a freshly invented town, then questions whose
  answers are words of that passage::

      Passage: Belmi is a town on the river Dunka. The flag of Belmi is green. ...
      Question: What color is the flag of Belmi?
      Answer: green

The fine-tuning task (:func:`generate_reading`, written by :func:`write_qa`) is the same reading task as a chat: the prompt
is ``Passage: ...\\nQuestion: ...``, the reply the answer alone, checked by exact match.
Its answers are never memorised facts: every passage invents its town, so a model must
find the answer in the prompt. ``split="test"`` draws from another random stream and drops
any prompt that also occurs in the ``train`` split of the same size and seed, so held-out
prompts are never seen in fine-tuning.

Why this task: a tiny model (4 layers, 256 wide) pre-trained for a few minutes on CPU learns
to copy a word from its context (the corpus holds the task in plain text), and supervised
fine-tuning for about a minute teaches it the chat format and to stop after the answer; a
task of recalling facts seen only in pre-training is far beyond that budget.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from pipeline.io import atomic_write_text

_SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "sa", "vel", "dun", "ri", "an", "bel", "cor", "esh", "fa", "gor", "hal"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "silver", "golden"]
_TRADES = ["fishing", "weaving", "mining", "farming", "brewing", "shipbuilding", "pottery", "trade"]
_ANIMALS = ["heron", "fox", "bear", "wolf", "otter", "falcon", "stag", "owl"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _town(rng: random.Random, name: str | None = None) -> dict:
    """One town's facts (a fresh name unless given)."""
    return {
        "town": name or _name(rng, rng.randint(2, 3)),
        "river": _name(rng, 2),
        "founder": f"{_name(rng, 2)} {_name(rng, 2)}",
        "year": rng.randint(800, 1900),
        "people": rng.randint(2, 900) * 100,
        "color": rng.choice(_COLORS),
        "trade": rng.choice(_TRADES),
        "animal": rng.choice(_ANIMALS),
    }


def _world(seed: int, towns: int) -> list[dict]:
    rng = random.Random(seed)
    names: set[str] = set()
    world = []
    while len(world) < towns:
        name = _name(rng, rng.randint(2, 3))
        if name not in names:
            names.add(name)
            world.append(_town(rng, name))
    return world


_TEMPLATES = [
    "{town} is a town on the river {river}.",
    "{town} was founded in the year {year} by {founder}.",
    "About {people} people live in {town}.",
    "The flag of {town} is {color}.",
    "Most people in {town} work in {trade}.",
    "The symbol of {town} is the {animal}.",
    "{founder} founded {town} on the banks of the {river}.",
    "In {town}, the main trade is {trade}, and the flag is {color}.",
]

# Passage sentences: the three facts asked about (each answer a word of its own category),
# and the other facts, stated as distractors.
_ASKED = [
    ("color", "The flag of {town} is {color}.", "What color is the flag of {town}?"),
    ("trade", "Most people in {town} work in {trade}.", "What is the main trade of {town}?"),
    ("animal", "The symbol of {town} is the {animal}.", "What is the symbol of {town}?"),
]
_OTHER = [
    "{town} is a town on the river {river}.",
    "{town} was founded by {founder}.",
    "{town} was founded in the year {year}.",
    "About {people} people live in {town}.",
]
FACT_KINDS = tuple(k for k, _, _ in _ASKED)
"""The kinds of question of the reading task (a ``kind`` field of each :func:`generate_reading` record)."""


def _passage(rng: random.Random) -> tuple[dict, str]:
    """A fresh town and a passage stating its three asked facts and 0-2 others, in random order."""
    fact = _town(rng)
    sentences = [tpl for _, tpl, _ in _ASKED] + rng.sample(_OTHER, rng.randint(0, 2))
    rng.shuffle(sentences)
    return fact, " ".join(t.format(**fact) for t in sentences)


def reading_document(rng: random.Random) -> str:
    """A pre-training document of the reading task: a passage and its three questions with answers."""
    fact, passage = _passage(rng)
    lines = [f"Passage: {passage}"]
    for key, _, question in rng.sample(_ASKED, len(_ASKED)):
        lines += [f"Question: {question.format(**fact)}", f"Answer: {fact[key]}"]
    return "\n".join(lines)


def generate(num_docs: int = 20000, seed: int = 1234, towns: int = 400) -> Iterator[str]:
    """Yield ``num_docs`` pre-training documents (strings), deterministically for a given seed.

    A third are encyclopedia articles about ``towns`` fixed towns (with a line of arithmetic),
    two thirds reading documents (:func:`reading_document`) about invented towns, interleaved
    (the reading task is what the quickstart fine-tunes for; it gets most of the tokens).
    """
    world = _world(seed, towns)
    rng = random.Random(seed + 1)
    reading = random.Random(seed + 4)  # its own stream: the article stream stays as before
    for i in range(num_docs):
        if i % 3:
            yield reading_document(reading)
            continue
        facts = rng.sample(world, rng.randint(1, 3))
        sentences = []
        for fact in facts:
            for tpl in rng.sample(_TEMPLATES, rng.randint(2, 5)):
                sentences.append(tpl.format(**fact))
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        sentences.append(f"Note {i}: {a} plus {b} is {a + b}.")
        yield " ".join(sentences)


def write_sample(path: str | os.PathLike, num_docs: int = 20000, seed: int = 1234) -> Path:
    """Write the sample as JSON Lines (``{"text": ...}``) atomically; reuse it if present."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in generate(num_docs, seed)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _qa_stream(seed: int, split: str) -> Iterator[dict]:
    rng = random.Random(seed + (2 if split == "train" else 3))
    while True:
        fact, passage = _passage(rng)
        key, _, question = rng.choice(_ASKED)
        prompt = f"Passage: {passage}\nQuestion: {question.format(**fact)}"
        yield {"prompt": prompt, "response": str(fact[key]), "kind": key}


def generate_reading(num: int = 2000, seed: int = 1234, split: str = "train", train_size: int = 2000) -> Iterator[dict]:
    """Reading-task examples ``{"prompt", "response", "kind"}`` with exactly checkable answers.

    Args:
        num: examples to yield.
        seed: stream seed; ``train`` and ``test`` use different streams of it.
        split: ``"train"`` or ``"test"``.
        train_size: for ``split="test"``: test examples whose prompt is among the first
            ``train_size`` train prompts of the same seed are skipped, so a held-out prompt is
            never a fine-tuning prompt (pass the size of the train file).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stream = _qa_stream(seed, split)
    seen: set[str] = set()
    if split == "test":
        train = _qa_stream(seed, "train")
        seen = {next(train)["prompt"] for _ in range(train_size)}
    made = 0
    while made < num:
        rec = next(stream)
        if rec["prompt"] in seen:
            continue
        made += 1
        yield rec


_QUESTIONS = [
    ("Which river is {town} on?", "{river}"),
    ("Who founded {town}?", "{founder}"),
    ("What color is the flag of {town}?", "{color}"),
    ("What is the main trade of {town}?", "{trade}"),
    ("What is the symbol of {town}?", "{animal}"),
]


def generate_qa(num: int = 2000, seed: int = 1234, towns: int = 400, split: str = "train") -> Iterator[dict]:
    """Short closed-book questions ``{"prompt", "response"}`` about the encyclopedia's towns.

    A few tokens each, for tests that need a small chat set with checkable answers (the
    quickstart's task is :func:`generate_reading`). ``split="train"`` and ``"test"`` ask
    about disjoint halves of the towns.
    """
    world = _world(seed, towns)
    half = world[: towns // 2] if split == "train" else world[towns // 2:]
    rng = random.Random(seed + (2 if split == "train" else 3))
    for _ in range(num):
        fact = rng.choice(half)
        q, a = rng.choice(_QUESTIONS)
        yield {"prompt": q.format(**fact), "response": a.format(**fact)}


def _write_once(path: str | os.PathLike, records: Iterator[dict]) -> Path:
    """Write ``records`` as JSON Lines atomically; reuse the file if present (the records are not drawn then)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def write_qa(path: str | os.PathLike, num: int = 2000, seed: int = 1234, split: str = "train", train_size: int = 2000) -> Path:
    """Write :func:`generate_reading` as JSON Lines (prompt/response/kind) atomically; reuse it if present."""
    return _write_once(path, generate_reading(num, seed, split, train_size))


_VALUES = {"color": _COLORS, "trade": _TRADES, "animal": _ANIMALS}

HARNESS_TASK = """\
# The built-in sample's held-out reading task as multiple choice, in lm-evaluation-harness's format
# (generated by `python -m pipeline.data.sample --harness-task DIR`, pipeline/data/sample.py): the
# answer is the word of the passage, the other choices are other words of the same kind.
# python launch/evaluate.py task=harness model=... data=examples/harness/sample_reading
task: sample_reading
dataset_path: json
dataset_kwargs:
  data_files:
    test: sample_reading.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
metadata:
  version: 1.0
"""
"""The harness task file :func:`write_harness_task` writes beside its data."""


def generate_reading_choices(num: int = 200, seed: int = 1234, train_size: int = 2000, choices: int = 4) -> Iterator[dict]:
    """The held-out reading task (:func:`generate_reading`, ``split="test"``) as multiple choice:
    ``{"prompt", "choices", "answer", "kind"}``, ``answer`` the index of the passage's word among
    ``choices`` words of its kind (the others not in the passage's answer)."""
    rng = random.Random(seed + 5)
    for rec in generate_reading(num, seed, "test", train_size):
        opts = rng.sample([v for v in _VALUES[rec["kind"]] if v != rec["response"]], choices - 1) + [rec["response"]]
        rng.shuffle(opts)
        yield {"prompt": rec["prompt"], "choices": opts, "answer": opts.index(rec["response"]), "kind": rec["kind"]}


def write_harness_task(directory: str | os.PathLike, num: int = 200, seed: int = 1234, train_size: int = 2000) -> Path:
    """Write the harness task (``sample_reading.yaml``) and its data (``sample_reading.jsonl``) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "sample_reading.jsonl",
                      "".join(json.dumps(r) + "\n" for r in generate_reading_choices(num, seed, train_size)))
    atomic_write_text(d / "sample_reading.yaml", HARNESS_TASK)
    return d


CHOSEN_STYLE = "The answer is {answer}."
"""How the preference task's chosen answers are written (the fine-tuned model answers with the bare word)."""


def generate_preference(num: int = 2000, seed: int = 1234, split: str = "train", train_size: int = 2000) -> Iterator[dict]:
    """The reading task as preference pairs ``{"prompt", "chosen", "rejected", "kind", "rejects"}`` for DPO.

    The chosen answer names the passage's word in a sentence (:data:`CHOSEN_STYLE`). The rejected
    one alternates between two faults: ``rejects="word"``, the same sentence naming another word
    of the kind that is not the passage's (a distractor: preferring the chosen one needs reading
    the passage), and ``rejects="style"``, the passage's word alone, the way the fine-tuned sample
    model answers (preferring the chosen one is a change of style). Prompts and held-out
    splitting are those of :func:`generate_reading`.
    """
    rng = random.Random(seed + (6 if split == "train" else 7))
    for i, rec in enumerate(generate_reading(num, seed, split, train_size)):
        chosen = CHOSEN_STYLE.format(answer=rec["response"])
        if i % 2 == 0:
            other = rng.choice([v for v in _VALUES[rec["kind"]] if v != rec["response"]])
            rejected, rejects = CHOSEN_STYLE.format(answer=other), "word"
        else:
            rejected, rejects = rec["response"], "style"
        yield {"prompt": rec["prompt"], "chosen": chosen, "rejected": rejected, "kind": rec["kind"], "rejects": rejects}


def write_preference(path: str | os.PathLike, num: int = 2000, seed: int = 1234, split: str = "train",
                     train_size: int = 2000) -> Path:
    """Write :func:`generate_preference` as JSON Lines atomically; reuse the file if present."""
    return _write_once(path, generate_preference(num, seed, split, train_size))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.sample DIR``: write the sample fine-tuning files into DIR.

    ``qa_train.jsonl`` (reading-task examples for fine-tuning) and ``qa_test.jsonl`` (held-out
    examples, none of whose prompts is a training prompt), both prompt/response JSON Lines;
    ``pref_train.jsonl`` and ``pref_test.jsonl``: the same prompts as preference pairs for DPO
    (:func:`generate_preference`).
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.data.sample", description=main.__doc__)
    p.add_argument("dir", nargs="?", default="outputs/sample")
    p.add_argument("--train", type=int, default=2000, help="training examples")
    p.add_argument("--test", type=int, default=200, help="held-out examples")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--harness-task", metavar="DIR", default="",
                   help="write the held-out reading task as an lm-evaluation-harness multiple-choice task into DIR instead "
                        "(the repo ships it as examples/harness/sample_reading)")
    a = p.parse_args(argv)
    if a.harness_task:
        print(write_harness_task(a.harness_task, a.test, a.seed, train_size=a.train))
        return 0
    for name, n, split in (("qa_train.jsonl", a.train, "train"), ("qa_test.jsonl", a.test, "test")):
        print(write_qa(Path(a.dir) / name, n, a.seed, split, train_size=a.train))
    for name, n, split in (("pref_train.jsonl", a.train, "train"), ("pref_test.jsonl", a.test, "test")):
        print(write_preference(Path(a.dir) / name, n, a.seed, split, train_size=a.train))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The built-in sample corpus: generated, deterministic, nothing third-party.

Short encyclopedia-style articles about a made-up world (towns, rivers, people, numbers),
with facts that repeat consistently across documents so a small model can learn them.
Used by the default preprocess recipe (``format: builtin``) so the pipeline runs on a
fresh machine with no data at all.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from pipeline.io import atomic_write_text

_SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "sa", "vel", "dun", "ri", "an", "bel", "cor", "esh", "fa", "gor", "hal"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "silver", "golden"]
_TRADES = ["fishing", "weaving", "mining", "farming", "brewing", "shipbuilding", "pottery", "trade"]
_ANIMALS = ["heron", "fox", "bear", "wolf", "otter", "falcon", "stag", "owl"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _world(seed: int, towns: int) -> list[dict]:
    rng = random.Random(seed)
    names: set[str] = set()
    world = []
    while len(world) < towns:
        name = _name(rng, rng.randint(2, 3))
        if name in names:
            continue
        names.add(name)
        world.append(
            {
                "town": name,
                "river": _name(rng, 2),
                "founder": f"{_name(rng, 2)} {_name(rng, 3)}",
                "year": rng.randint(800, 1900),
                "people": rng.randint(2, 900) * 100,
                "color": rng.choice(_COLORS),
                "trade": rng.choice(_TRADES),
                "animal": rng.choice(_ANIMALS),
            }
        )
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


def generate(num_docs: int = 20000, seed: int = 1234, towns: int = 400):
    """Yield ``num_docs`` documents (strings) deterministically for a given seed."""
    world = _world(seed, towns)
    rng = random.Random(seed + 1)
    for i in range(num_docs):
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


_QUESTIONS = [
    ("Which river is {town} on?", "{river}"),
    ("Who founded {town}?", "{founder}"),
    ("What color is the flag of {town}?", "{color}"),
    ("What is the main trade of {town}?", "{trade}"),
    ("What is the symbol of {town}?", "{animal}"),
]


def generate_qa(num: int = 2000, seed: int = 1234, towns: int = 400, split: str = "train"):
    """Question/answer pairs about the sample world, with exactly checkable answers.

    ``split="train"`` and ``"test"`` use disjoint halves of the towns, so a test question
    is never seen during fine-tuning (its fact was seen during pre-training).
    """
    world = _world(seed, towns)
    half = world[: towns // 2] if split == "train" else world[towns // 2:]
    rng = random.Random(seed + (2 if split == "train" else 3))
    for _ in range(num):
        fact = rng.choice(half)
        q, a = rng.choice(_QUESTIONS)
        yield {"prompt": q.format(**fact), "response": a.format(**fact)}


def write_qa(path: str | os.PathLike, num: int = 2000, seed: int = 1234, split: str = "train") -> Path:
    """Write :func:`generate_qa` as JSON Lines (prompt/response) atomically; reuse it if present."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in generate_qa(num, seed, split=split)))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.sample DIR``: write the sample fine-tuning files into DIR.

    ``qa_train.jsonl`` (questions about the first half of the towns) and ``qa_test.jsonl``
    (the other half: never seen in fine-tuning), both prompt/response JSON Lines.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.data.sample", description=main.__doc__)
    p.add_argument("dir", nargs="?", default="outputs/sample")
    p.add_argument("--train", type=int, default=2000, help="training questions")
    p.add_argument("--test", type=int, default=200, help="held-out questions")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    for name, n, split in (("qa_train.jsonl", a.train, "train"), ("qa_test.jsonl", a.test, "test")):
        print(write_qa(Path(a.dir) / name, n, a.seed, split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

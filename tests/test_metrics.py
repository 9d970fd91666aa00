"""Evaluation metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    contains,
    exact_match,
    generation_scores,
    macro_f1,
    normalize_text,
    per_class_scores,
    perplexity,
)

# Three classes; y_true / y_pred chosen so every cell below can be counted by eye.
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
#            pred 0  1  2
CM = [[3, 1, 0],  # true 0: 4 examples, 3 right, one called 1
      [0, 1, 1],  # true 1: 2 examples, 1 right, one called 2
      [1, 0, 3]]  # true 2: 4 examples, 3 right, one called 0


def test_confusion_matrix_and_accuracy():
    assert confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == CM
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(7 / 10)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_per_class_precision_recall_f1_by_hand():
    s = per_class_scores(np.array(CM))
    # class 0: tp 3, predicted 4 (3 + 0 + 1), support 4 -> P 3/4, R 3/4, F1 3/4
    # class 1: tp 1, predicted 2 (1 + 1 + 0), support 2 -> P 1/2, R 1/2, F1 1/2
    # class 2: tp 3, predicted 4 (0 + 1 + 3), support 4 -> P 3/4, R 3/4, F1 3/4
    assert s["precision"].tolist() == pytest.approx([0.75, 0.5, 0.75])
    assert s["recall"].tolist() == pytest.approx([0.75, 0.5, 0.75])
    assert s["f1"].tolist() == pytest.approx([0.75, 0.5, 0.75])
    assert s["support"].tolist() == [4, 2, 4]
    assert macro_f1(np.array(CM)) == pytest.approx((0.75 + 0.5 + 0.75) / 3)


def test_asymmetric_precision_recall_and_zero_division():
    # true [0,0,0,1], pred [0,1,1,1]: class 0 P 1/1 R 1/3 F1 2*(1*1/3)/(4/3) = 1/2;
    # class 1 P 1/3 R 1/1 F1 1/2; class 2 never seen nor predicted: all 0, left out of macro-F1.
    cm = confusion_matrix([0, 0, 0, 1], [0, 1, 1, 1], 3)
    s = per_class_scores(cm)
    assert s["precision"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert s["recall"].tolist() == pytest.approx([1 / 3, 1.0, 0.0])
    assert s["f1"].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert macro_f1(cm) == pytest.approx(0.5)
    # A class that is a label but never predicted counts (F1 0) in the macro average.
    cm = confusion_matrix([0, 1], [0, 0], 2)
    assert per_class_scores(cm)["precision"].tolist() == pytest.approx([0.5, 0.0])
    assert macro_f1(cm) == pytest.approx((2 * 0.5 * 1 / 1.5 + 0.0) / 2)
    assert macro_f1(np.zeros((2, 2), np.int64)) == 0.0


def test_classification_report_is_json_ready():
    r = classification_report(Y_TRUE, Y_PRED, ["neg", "neu", "pos"])
    assert r["accuracy"] == pytest.approx(0.7) and r["examples"] == 10
    assert r["macro_f1"] == pytest.approx(2 / 3)
    assert r["per_class"]["neu"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["confusion_matrix"] == {"labels": ["neg", "neu", "pos"], "matrix": CM}
    assert all(type(v) in (float, int) for c in r["per_class"].values() for v in c.values())


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(512)) == pytest.approx(512)
    assert perplexity(1e6) == pytest.approx(math.exp(50))


def test_text_normalisation_and_matching():
    assert normalize_text("  The  Eiffel\tTower,\nin PARIS!! ") == "the eiffel tower in paris"
    assert normalize_text("don't «stop» — now…") == "dont stop now"
    assert exact_match("  Paris \n", "Paris")
    assert not exact_match("paris", "Paris")
    assert contains("I think it is Paris.", "paris")
    assert contains("The answer: New   York!", "new york")
    assert not contains("Lyon", "Paris")
    assert contains("首都是巴黎。", "巴黎")
    assert not contains("anything", "...")  # an empty reference matches only an empty generation
    assert contains("", "!")


def test_generation_scores():
    gens = ["Paris", "it is berlin", "Rome!", "nope"]
    refs = ["Paris", "Berlin", "rome", "yes"]
    # exact: only the first; contained: first three
    assert generation_scores(gens, refs) == {"exact_match": 0.25, "contains": 0.75, "examples": 4}
    assert generation_scores([], []) == {"exact_match": 0.0, "contains": 0.0, "examples": 0}

"""Evaluation metrics in plain Python and numpy: classification scores and text matching.

scikit-learn is deliberately not a dependency of the pipeline (a large install for a few
lines of arithmetic), so the classification scores are computed here. Conventions follow
scikit-learn's defaults where it has one:

* precision of a class never predicted, recall of a class absent from the data, and F1
  when precision + recall is 0 are 0 (``zero_division=0``);
* macro-F1 averages the F1 of every class that occurs in the data or in the predictions
  (``labels=None``): a class of the model that is neither true nor predicted anywhere
  does not drag the average down, though it is still listed per class with support 0.

Text matching for generation: :func:`exact_match` compares the stripped strings;
:func:`contains` asks whether the normalised reference (:func:`normalize_text`:
lowercase, punctuation removed, whitespace collapsed) occurs in the normalised generation.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------------- classification


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts ``C[t, p]`` of examples of true class ``t`` predicted as ``p``.

    Args:
        y_true, y_pred: class ids in ``[0, num_classes)``, same length.
        num_classes: number of classes (rows and columns).

    Returns:
        int64 array ``(num_classes, num_classes)``.
    """
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries but y_pred has {p.size}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes})")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of examples whose prediction equals the label (0.0 without examples)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries but y_pred has {p.size}")
    return float((t == p).mean()) if t.size else 0.0


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``precision``, ``recall``, ``f1`` (float64) and ``support`` (int64) of a confusion matrix."""
    tp = np.diag(cm).astype(np.int64)
    predicted = cm.sum(axis=0)  # column sums: how often each class was predicted
    support = cm.sum(axis=1)  # row sums: how often each class is the label
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes that occur as a label or as a prediction (0.0 when none does)."""
    scores = per_class_scores(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(scores["f1"][present].mean()) if present.any() else 0.0


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Every classification score, JSON-ready.

    Args:
        y_true, y_pred: class ids (indices into ``labels``).
        labels: class names in id order (the model's ``id2label``).

    Returns:
        ``{"accuracy", "macro_f1", "examples", "per_class": {label: {precision, recall, f1,
        support}}, "confusion_matrix": {"labels": [...], "matrix": [[...]]}}``; matrix rows
        are true classes, columns predicted ones.
    """
    cm = confusion_matrix(y_true, y_pred, len(labels))
    scores = per_class_scores(cm)
    per_class = {
        name: {"precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
               "f1": float(scores["f1"][i]), "support": int(scores["support"][i])}
        for i, name in enumerate(labels)
    }
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(cm),
        "examples": int(len(y_true)),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "matrix": cm.tolist()},
    }


# ---------------------------------------------------------------------------- language modelling


def perplexity(mean_loss: float) -> float:
    """``exp(mean token loss in nats)``, capped at ``exp(50)`` so a diverged model gives a number, not inf."""
    return math.exp(min(float(mean_loss), 50.0))


# ---------------------------------------------------------------------------- text matching

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation (every Unicode ``P*`` category character), collapse whitespace.

    Punctuation is removed, not replaced by a space, so ``"Paris."`` and ``"paris"``
    agree and ``"don't"`` becomes ``"dont"``.
    """
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def exact_match(generation: str, reference: str) -> bool:
    """The generation equals the reference after stripping surrounding whitespace (case kept)."""
    return generation.strip() == reference.strip()


def contains(generation: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised generation.

    A reference that normalises to nothing (only punctuation or spaces) is contained only
    in a generation that also normalises to nothing: the empty string would otherwise
    match everything.
    """
    ref, gen = normalize_text(reference), normalize_text(generation)
    if not ref:
        return not gen
    # A plain substring test, not word boundaries: scripts without spaces (Chinese, Japanese)
    # must match too. So "cat" is found in "concatenate"; exact_match is the strict score.
    return ref in gen


def generation_scores(generations: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "contains", "examples"}``: mean exact match and containment rates."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    n = len(references)
    em = sum(exact_match(g, r) for g, r in zip(generations, references))
    inside = sum(contains(g, r) for g, r in zip(generations, references))
    return {"exact_match": em / n if n else 0.0, "contains": inside / n if n else 0.0, "examples": n}

"""Sequence-classification data: text (and optional text pair) with a label.

JSONL (one object per line) or CSV/TSV (header row) files, optionally .gz/.zst, read by
:func:`pipeline.data.records.read_records`. Label names are mapped to ids in a
fixed order (``labels`` in the config, else the sorted names found in the training file)
and saved with the model as ``id2label``/``label2id``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.data.records import read_records, split_ext
from pipeline.errors import UserError
from pipeline.inputs import data_files


@dataclass
class ClassificationDataConfig:
    train: str = ""
    """Training examples: a JSONL or CSV file (or glob) with text, optional text pair, and label."""
    val: str = ""
    """Validation examples in the same format ("" takes val_fraction of train, split by text hash)."""
    val_fraction: float = 0.1
    """Fraction of train used for validation when val is empty (stable: by a hash of the text)."""
    text_field: str = "text"
    """Field (JSONL) or column (CSV) holding the text."""
    text_pair_field: str = ""
    """Field holding a second text for pair tasks (entailment, similarity); "" for single texts."""
    label_field: str = "label"
    """Field holding the label (a name or a number; numbers are used as names)."""
    labels: list[str] = field(default_factory=list)
    """Label names in id order ([]: the sorted distinct labels of the training data)."""
    max_length: int = 128
    """Tokens per example (longer texts are truncated; batches are padded to their longest)."""
    class_weights: Literal["none", "balanced"] = "none"
    """balanced: weight each class's loss by n / (classes × count), for imbalanced data."""
    bad_records: Literal["fail", "skip"] = "fail"
    """A malformed line or missing field: fail naming file and line, or skip and count."""

    def check(self) -> list[tuple[str, str]]:
        p = []
        if not 0 <= self.val_fraction < 1:
            p.append(("val_fraction", f"must be in [0, 1), got {self.val_fraction}"))
        if self.max_length <= 0:
            p.append(("max_length", f"must be > 0, got {self.max_length}"))
        if len(set(self.labels)) != len(self.labels):
            p.append(("labels", "contains a name twice"))
        return p


@dataclass
class Example:
    text: str
    pair: str | None
    label: str


def _files(pattern: str, key: str) -> list[str]:
    """The files of ``classification.<key>``, resolved and checked as every data setting is
    (:func:`pipeline.inputs.data_files`; a directory contributes its JSONL and CSV/TSV files)."""
    return [str(f) for f in data_files(pattern, f"classification.{key}", "a JSONL or CSV file (or glob) with text and label fields",
                                       suffixes=(".jsonl", ".jsonl.gz", ".jsonl.zst", ".csv", ".tsv", ".csv.gz", ".tsv.gz"))]


def read_examples(pattern: str, cfg: ClassificationDataConfig, key: str = "train", stats: dict | None = None) -> list[Example]:
    """Every example of the file(s) in order; bad records fail or are skipped (counted in ``stats``)."""
    stats = stats if stats is not None else {}
    stats.setdefault("bad_records", 0)
    out: list[Example] = []
    need = [cfg.text_field, cfg.label_field] + ([cfg.text_pair_field] if cfg.text_pair_field else [])
    fix = "Fix it, or set classification.bad_records=skip to skip and count such lines."
    for path in _files(pattern, key):
        read: dict[str, int] = {}  # the reader's counters; of them, this data reports bad_records
        # a file that is not .csv/.tsv (.gz/.zst) is read as JSON Lines, whatever its extension
        rows = read_records(path, split_ext(path)[0] or "jsonl", bad_records=cfg.bad_records, stats=read, fix=fix)
        for n, (where, _, row) in enumerate(rows):
            absent = [f for f in need if f not in row or row[f] is None]
            if absent and n == 0:  # the first record: a wrong field name, not a bad line
                which = "label_field" if absent[0] == cfg.label_field else "text_field" if absent[0] == cfg.text_field else "text_pair_field"
                raise UserError(f"{where}: no field {absent[0]!r} (fields: {', '.join(map(str, row))}); set classification.{which}")
            if absent:
                if cfg.bad_records == "skip":
                    stats["bad_records"] += 1
                    continue
                raise UserError(f"{where}: the record has no {absent[0]!r}. {fix}")
            label = row[cfg.label_field]
            out.append(Example(str(row[cfg.text_field]), str(row[cfg.text_pair_field]) if cfg.text_pair_field else None,
                               str(int(label)) if isinstance(label, float) and label.is_integer() else str(label)))
        stats["bad_records"] += read["bad_records"]
    if not out:
        raise UserError(f"classification.{key}: '{pattern}' holds no examples")
    return out


def split_val(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic split by a hash of the text (the same example always lands on the same side)."""
    train, val = [], []
    for ex in examples:
        h = int.from_bytes(hashlib.blake2b((ex.text + "\x00" + (ex.pair or "")).encode(), digest_size=4).digest(), "little")
        (val if h < fraction * 2**32 else train).append(ex)
    return train, val


def label_names(cfg: ClassificationDataConfig, train: list[Example]) -> list[str]:
    return list(cfg.labels) if cfg.labels else sorted({ex.label for ex in train}, key=lambda s: (len(s), s) if s.isdigit() else (0, s))


def encode(tokenizer, examples: list[Example], names: list[str], max_length: int, where: str) -> list[dict]:
    """One item per example: ``input_ids``, ``token_type_ids`` when the tokenizer makes them
    (BERT-style segment ids for text pairs), and ``label`` (an id); an unknown label is a user
    error naming it."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({ex.label for ex in examples} - set(index))
    if unknown:
        raise UserError(f"{where}: labels {unknown} are not among {names}; add them to classification.labels")
    if not examples:  # e.g. a validation split that a small file leaves empty (the tokenizer fails on [])
        return []
    texts = [ex.text for ex in examples]
    pairs = [ex.pair for ex in examples] if examples and examples[0].pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids")
    return [{"input_ids": ids, "label": index[ex.label], **({"token_type_ids": types[i]} if types is not None else {})}
            for i, (ids, ex) in enumerate(zip(enc["input_ids"], examples))]


def class_weights(items: list[dict], num_labels: int, mode: str) -> list[float] | None:
    if mode == "none":
        return None
    counts = np.bincount([it["label"] for it in items], minlength=num_labels).astype(np.float64)
    counts[counts == 0] = 1.0
    return (counts.sum() / (num_labels * counts)).tolist()


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example: ``input_ids``/``attention_mask`` (and
    ``token_type_ids``) (B, T), ``labels`` (B,)."""
    import torch

    longest = max(len(it["input_ids"]) for it in items)
    out = {"input_ids": torch.full((len(items), longest), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(items), longest), dtype=torch.long)}
    if "token_type_ids" in items[0]:
        out["token_type_ids"] = torch.zeros((len(items), longest), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        out["attention_mask"][i, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.tensor(it["token_type_ids"], dtype=torch.long)
    out["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return out

"""Task ``classification``: ``AutoModelForSequenceClassification`` over text (and optional text pair).

Labels are mapped to ids (:mod:`pipeline.data.classification`) and saved in the model's
config (``num_labels``, ``id2label``, ``label2id``), so the export and the evaluate stage
report names. A missing head is initialised by the model builder, also under ZeRO-3.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.data import classification as C
from pipeline.data.classification import ClassificationDataConfig
from pipeline.data.example_loader import ExampleLoader, FixedBatches
from pipeline.training.tasks.base import FinetuneTask, pad_id


class ClassificationLoss:
    """Cross-entropy over labels. With class weights the weighted sum is still divided by
    the number of examples (not by the sum of their weights), like every loss here."""

    def __init__(self, weights: list[float] | None):
        self.weights = weights

    def targets(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())  # real tokens, not padding

    @staticmethod
    def inputs(batch: dict, device) -> dict:
        """Model inputs (with BERT-style ``token_type_ids`` when present) on ``device``."""
        return {k: v.to(device) for k, v in batch.items() if k != "labels"}

    def loss(self, model, batch: dict):
        device = next(iter(model.parameters())).device
        logits = model(**self.inputs(batch, device)).logits  # (B, num_labels)
        weight = torch.tensor(self.weights, dtype=torch.float32, device=device) if self.weights else None
        labels = batch["labels"].to(device)
        return F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum"), labels.new_tensor(labels.numel())


def evaluate_classification(engine, batches) -> dict[str, float]:
    """Validation loss (unweighted) and accuracy over ``(batch, real)`` pairs (every rank, equal passes)."""
    engine.eval()
    loss_sum = correct = count = 0.0
    device = next(iter(engine.parameters())).device
    with torch.no_grad():
        for batch, real in batches:
            logits = engine(**ClassificationLoss.inputs(batch, device)).logits
            if real:
                labels = batch["labels"].to(device)
                loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                correct += float((logits.argmax(-1) == labels).sum())
                count += labels.numel()
    loss_sum, correct, count = (dist.all_reduce_sum_float(x) for x in (loss_sum, correct, count))
    engine.train()
    return {"loss": loss_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0)}


class ClassificationTask(FinetuneTask):
    """A sequence classifier: one label per text (or text pair), cross-entropy over the labels."""

    name = "classification"
    section = "classification"
    config_class = ClassificationDataConfig
    head = "classification"
    data_what = "a JSONL or CSV file with text and label fields"
    seq_len_field = "max_length"

    def prepare(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        c = self.data_cfg
        stats: dict[str, int] = {}
        train = C.read_examples(c.train, c, "train", stats)
        val = C.read_examples(c.val, c, "val", stats) if c.val else None
        if val is None:
            train, val = C.split_val(train, c.val_fraction)
        self.label_names = C.label_names(c, train)
        self.train_items = C.encode(tokenizer, train, self.label_names, c.max_length, c.train)
        self.val_items = C.encode(tokenizer, val, self.label_names, c.max_length, c.val or c.train)
        self.weights = C.class_weights(self.train_items, len(self.label_names), c.class_weights)
        self.stats = stats

    def describe(self) -> str:
        return f"classification: {len(self.train_items)} train / {len(self.val_items)} val examples, labels {self.label_names}"

    def inspect(self, tokenizer: Any, n: int) -> list[str]:
        return [f"[{self.label_names[it['label']]}] {tokenizer.decode(it['input_ids'])}" for it in self.train_items[:n]]

    def meta(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.label_names,
                "data": {"train": len(self.train_items), "val": len(self.val_items), **self.stats}}

    def configure(self, conf: Any, tokenizer: Any) -> None:
        conf.num_labels = len(self.label_names)
        conf.id2label = dict(enumerate(self.label_names))
        conf.label2id = {n: i for i, n in enumerate(self.label_names)}
        if conf.pad_token_id is None:  # the classifier reads the last non-pad token of decoder models
            conf.pad_token_id = pad_id(tokenizer)

    def loaders(self, run: Any, start_step: int) -> tuple[Any, Any | None]:
        t, pad = self.cfg.train, pad_id(self.tokenizer)
        fn = partial(C.collate, pad_id=pad)
        train = ExampleLoader(self.train_items, run.dp_rank, run.dp_world, run.micro, run.accum, t.seed, start_step, collate=fn, name="cls",
                              consumed_samples=run.consumed_samples)
        val = FixedBatches(self.val_items, run.dp_rank, run.dp_world, run.micro, collate=fn, num_batches=t.eval_batches) if self.val_items else None
        return train, val

    def loss(self) -> ClassificationLoss:
        return ClassificationLoss(self.weights)

    def evaluate(self, engine: Any, batches: Any) -> dict[str, float]:
        return evaluate_classification(engine, batches)

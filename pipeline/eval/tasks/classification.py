"""The classification task: a sequence classifier on labelled JSONL/CSV examples.

Labels are names of the model's ``config.label2id`` or integer class ids, checked against
every model before any weight is read. Metrics: accuracy, macro-F1, per-class scores and the
confusion matrix (:func:`pipeline.eval.metrics.classification_report`); one row per model and
example goes to ``predictions.jsonl``.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import UserError
from pipeline.eval.metrics import classification_report
from pipeline.eval.models import Loaded, ModelRef
from pipeline.eval.ranks import gather, my_batches, progress
from pipeline.eval.tasks.base import EvalTask, field_of, fmt, no_examples, read_data
from pipeline.inputs import max_positions

Example = tuple[str, str, "str | None", Any]  # (where, text, text pair, raw label)


def read_classification(cfg: Any) -> list[Example]:
    """``(where, text, text_pair, raw label)`` of the first ``max_batches`` (0: all) examples."""
    out = []
    for where, rec in read_data(cfg.data, "labelled examples (JSONL or CSV)"):
        text = field_of(where, rec, cfg.text_field, "text_field")
        pair = field_of(where, rec, cfg.text_pair_field, "text_pair_field") if cfg.text_pair_field else None
        label = field_of(where, rec, cfg.label_field, "label_field", kind="label")
        if isinstance(label, (dict, list, bool, float)):
            raise UserError(f"{where}: label {label!r} is not a label name or integer class id (field '{cfg.label_field}')")
        out.append((where, text, pair, label))
        if cfg.max_batches and len(out) >= cfg.max_batches:
            break
    if not out:
        raise no_examples(cfg)
    return out


def label_ids(config: Any, ref: ModelRef, examples: list[Example]) -> tuple[list[str], list[int]]:
    """The model's label names in id order and each example's class id.

    A label is looked up by name in ``config.label2id``, else read as an integer id.

    Raises:
        UserError: labels the model does not have, listing the model's labels.
    """
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(getattr(config, "num_labels", len(id2label)))]
    by_name = {name: i for i, name in enumerate(names)}
    ids, unknown = [], {}
    for where, _, _, label in examples:
        key = str(label).strip()
        if key in by_name:
            ids.append(by_name[key])
        elif re.fullmatch(r"-?\d+", key) and 0 <= int(key) < len(names):
            ids.append(int(key))
        else:
            unknown.setdefault(key, where)
    if unknown:
        shown = ", ".join(f"'{k}' ({w})" for k, w in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UserError(f"labels {shown}{more} are not labels of {ref.role} '{ref.path}'; its labels are: "
                        f"{', '.join(names)} (or ids 0..{len(names) - 1}). Fix the data's '{examples[0][0].rsplit(':', 1)[0]}' "
                        "labels, or evaluate a model trained on these labels")
    return names, ids


class Classification(EvalTask):
    """Predicted class (argmax) and its probability per example, against the labels."""

    name = "classification"
    head = "classification"
    headline = ("accuracy", "macro_f1")
    counts = ("examples",)
    rows_file = "predictions.jsonl"
    MAX_F1_ROWS = 10  # classes: more than this many per-class F1 rows would drown the table

    def read(self, cfg: Any) -> list[Example]:
        return read_classification(cfg)

    def check_model(self, ref: ModelRef, cfg: Any, examples: list[Example]) -> None:
        if ref.config is not None:
            label_ids(ref.config, ref, examples)

    def evaluate(self, lm: Loaded, cfg: Any, examples: list[Example]) -> tuple[dict, list[dict]]:
        import torch

        names, y_true = label_ids(lm.model.config, lm.ref, examples)
        tok, model = lm.tokenizer, lm.model
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if getattr(model.config, "pad_token_id", None) is None:  # decoder classifiers find the last real token by it
            model.config.pad_token_id = tok.pad_token_id
        max_len = cfg.seq_len or max_positions(model.config) or 512
        B, nb, local = cfg.batch_size, -(-len(examples) // cfg.batch_size), []
        with torch.no_grad(), progress(nb, f"{lm.ref.name} classification") as bar:
            for b, real in my_batches(nb):
                part = examples[b * B:(b + 1) * B]
                pairs = [p for _, _, p, _ in part] if cfg.text_pair_field else None
                enc = tok([t for _, t, _, _ in part], pairs, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                probs = model(**{k: v.to(lm.device) for k, v in enc.items()}).logits.float().softmax(-1)  # (B, classes)
                conf, pred = probs.max(-1)
                if real:
                    local += [(b * B + i, int(p), float(c)) for i, (p, c) in enumerate(zip(pred.tolist(), conf.tolist()))]
                bar.update()
        preds = sorted(gather(local))
        y_pred = [p for _, p, _ in preds]
        pair = (lambda i: {"text_pair": examples[i][2]}) if cfg.text_pair_field else (lambda i: {})
        rows = [{"index": i, "model": lm.ref.name, "text": examples[i][1], **pair(i),
                 "label": names[y_true[i]], "prediction": names[p], "correct": p == y_true[i], "confidence": c}
                for i, p, c in preds]
        return classification_report(y_true, y_pred, names), rows

    def markdown_rows(self, models: list[dict]) -> list[str]:
        per_class = models[0]["metrics"]["per_class"]
        if len(per_class) > self.MAX_F1_ROWS:
            return []
        return [f"| f1 {label} | " + " | ".join(fmt(m["metrics"]["per_class"].get(label, {}).get("f1", float("nan")))
                                                 for m in models) + (" | |" if len(models) == 2 else " |")
                for label in per_class]

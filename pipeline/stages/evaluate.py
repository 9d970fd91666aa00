"""Stage: evaluate a model (and optionally a second one beside it) on held-out data.

    python launch/evaluate.py --config FILE [key=value ...]
    deepspeed --num_gpus N launch/evaluate.py ... zero3=true     (a model too big for one device)

Tasks: ``perplexity`` (token shards of the preprocess stage, or JSONL text), ``classification``
(a sequence-classification model on JSONL/CSV with labels) and ``generation`` (decode chat
prompts and compare with references). Models are a Hugging Face directory or a pipeline
checkpoint, loaded through :func:`pipeline.stages.export.load_model`.

Outputs, published together (written in ``<output>.partial`` and renamed)::

    <output>/report.json          config, models, metrics, timing
    <output>/report.md            a short Markdown table
    <output>/predictions.jsonl    classification: one line per model and example
    <output>/generations.jsonl    generation: one line per model and example
    <output>/tensorboard/<name>/  eval/* scalars at the checkpoint's step (else 0)

With ``zero3=true`` (launched by deepspeed/torchrun/srun) the model is partitioned with
ZeRO-3 across the ranks; batches are dealt round-robin, every rank runs the same number of
forward passes (a rank short of one repeats a batch and discards it) and results are summed
or gathered on rank 0, which writes the outputs.
"""

from __future__ import annotations

import csv
import gc
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import dist
from pipeline.config import to_dict
from pipeline.dist import DistConfig
from pipeline.errors import UserError
from pipeline.eval.metrics import classification_report, contains, exact_match, generation_scores, perplexity
from pipeline.inputs import check_data_file, check_model, check_output, max_positions
from pipeline.io import atomic_write_json, atomic_write_text, publish_dir

Task = Literal["perplexity", "classification", "generation"]
# Scalars written to TensorBoard (eval/<name>), compared in the Markdown table and differenced.
HEADLINE = {"perplexity": ("loss", "ppl"), "classification": ("accuracy", "macro_f1"),
            "generation": ("exact_match", "contains")}
_MAX_DEFAULT_SEQ = 1024  # tokens: perplexity window when seq_len=0 (capped model positions)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class EvalConfig:
    model: str = ""
    """The model to evaluate: a Hugging Face model directory, or a pipeline checkpoint (a
    step-NNNNNNNN directory, a checkpoints directory or a run directory: its latest step)."""
    compare_to: str = ""
    """Optional second model (e.g. the base model of a fine-tune), evaluated on the same data;
    the report shows both and the difference model - compare_to. "" evaluates one model."""
    name: str = ""
    """Display name of model in the report and its TensorBoard directory ("": from the path,
    e.g. finetune-step200 for a checkpoint, the directory name for a Hugging Face model)."""
    compare_name: str = ""
    """Display name of compare_to ("": from its path)."""
    task: Task = "perplexity"
    """perplexity: mean token loss and exp of it; classification: accuracy, macro-F1, per-class
    scores, confusion matrix; generation: decode each prompt, exact match and containment."""
    data: str = ""
    """perplexity: a preprocessed dataset directory (its token shards, split below) or a JSONL/CSV
    file with a text field; classification: JSONL or CSV with text (optional text pair) and label
    fields; generation: JSONL of {"messages": [...]} or {"prompt", "response"} records, the
    response or final assistant message being the reference (removed from the prompt)."""
    split: str = "val"
    """Split of the preprocessed dataset read for perplexity on shards."""
    text_field: str = "text"
    """Field (JSONL key or CSV column) holding the text (perplexity on a file, classification)."""
    text_pair_field: str = ""
    """classification: field holding the second text of a pair ("": single texts)."""
    label_field: str = "label"
    """classification: field holding the label, a name of the model's config.label2id or an
    integer class id."""
    seq_len: int = 0
    """perplexity: tokens per window; classification: longest input in tokens (longer ones are
    truncated). 0: the model's maximum positions, capped at 1024 for perplexity."""
    max_batches: int = 0
    """Cap on the evaluation size (0: everything): batches of windows for perplexity, examples
    for classification and generation (the first ones of the file)."""
    batch_size: int = 8
    """Windows, examples or prompts per forward pass (per rank with zero3)."""
    max_new_tokens: int = 64
    """generation: most tokens generated per prompt."""
    do_sample: bool = False
    """generation: sample (with temperature and top_p) instead of greedy decoding."""
    temperature: float = 1.0
    """generation: softmax temperature when do_sample=true."""
    top_p: float = 1.0
    """generation: nucleus sampling mass when do_sample=true (1.0: no cut)."""
    seed: int = 1234
    """generation: sampling seed (batch b uses seed + b, so results do not depend on the number of ranks)."""
    template: Literal["auto", "builtin", "tokenizer"] = "auto"
    """generation: prompt format; auto uses the tokenizer's own chat template when it has one
    (the fine-tune stage saves it there), else the pipeline's built-in one."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights and activations dtype (losses are always computed in fp32)."""
    output: str = "outputs/eval"
    """Output directory: report.json, report.md, predictions.jsonl or generations.jsonl, tensorboard/."""
    zero3: bool = False
    """Load the model partitioned with ZeRO-3 over the ranks of a deepspeed/torchrun/srun
    launch (for models that do not fit one device). A pipeline checkpoint is first
    consolidated on rank 0 into a temporary Hugging Face directory under <output>.partial."""
    overwrite: bool = False
    """Replace an existing output directory (the old one stays until the new one is complete)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group backend and timeout (zero3 only)."""

    def check(self) -> list[tuple[str, str]]:
        p = []
        if not self.model:
            p.append(("model", "no model; set model=DIR (a Hugging Face model directory or a pipeline checkpoint)"))
        if not self.data:
            p.append(("data", "no data; set data=PATH (see --help for what each task reads)"))
        if not self.output:
            p.append(("output", "must name an output directory"))
        if self.compare_to and self.compare_to == self.model:
            p.append(("compare_to", "is the same path as model; give another model or leave it empty"))
        for key in ("seq_len", "max_batches"):
            if getattr(self, key) < 0:
                p.append((key, f"must be >= 0 (0: automatic/all), got {getattr(self, key)}"))
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                p.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if not self.temperature > 0:
            p.append(("temperature", f"must be > 0, got {self.temperature}"))
        if not 0 < self.top_p <= 1:
            p.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        for key in ("text_field", "label_field"):
            if self.task == "classification" and not getattr(self, key):
                p.append((key, "must name a field of the data for task=classification"))
        return p


# ---------------------------------------------------------------------------- data files


def read_records(path: str | Path, what: str) -> list[tuple[str, dict]]:
    """``(where, record)`` of every record of a JSONL or CSV/TSV file; ``where`` is ``file:line``.

    Raises:
        UserError: missing file, unknown extension, a line that is not a JSON object.
    """
    p = Path(path)
    check_data_file(p, "data", f"the {what}")
    suffix = p.suffix.lower()
    out: list[tuple[str, dict]] = []
    if suffix in (".csv", ".tsv"):
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                out.append((f"{p}:{reader.line_num}", row))
        return out
    if suffix not in (".jsonl", ".json"):
        raise UserError(f"data '{path}' has extension '{suffix}'; expected the {what} as .jsonl (or .csv/.tsv)")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p}:{n} is a JSON {type(obj).__name__}, not an object; each line must be one JSON object")
            out.append((f"{p}:{n}", obj))
    return out


def field_of(where: str, rec: dict, key: str, setting: str, kind: str = "text") -> Any:
    """``rec[key]``, or a UserError naming the line, the fields found and the config key to fix."""
    value = rec.get(key)
    if value is None or (kind == "text" and not isinstance(value, str)):
        found = ", ".join(sorted(map(str, rec))) or "none"
        what = "no" if value is None else f"a non-string ({type(value).__name__})"
        raise UserError(f"{where} has {what} '{key}' field (fields found: {found}); set {setting}= to the field holding the {kind}")
    return value


# ---------------------------------------------------------------------------- models


@dataclass
class ModelRef:
    """A model to evaluate, resolved before any weight is read."""

    role: str  # "model" or "compare_to"
    path: str
    name: str
    checkpoint: str | None  # the resolved step directory of a pipeline checkpoint
    step: int  # the checkpoint's step, else 0
    config: Any  # transformers config (labels, positions), or None when unreadable


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def resolve_model(path: str, role: str, name: str) -> ModelRef:
    """Check that ``path`` exists and find its name, step and config (no weights loaded)."""
    from transformers import AutoConfig

    source = check_model(path, role)
    checkpoint, step, config_dir = None, 0, source.config_dir
    if source.kind == "checkpoint":
        step_dir = source.step_dir
        checkpoint = str(step_dir)
        try:
            step = int(json.loads((step_dir / "meta.json").read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            m = re.search(r"step-(\d+)", step_dir.name)
            step = int(m.group(1)) if m else 0
        run = step_dir.parent.parent.name if step_dir.parent.name == "checkpoints" else step_dir.parent.name
        default = f"{run}-step{step}"
    else:
        p = source.path
        default = p.resolve().name
        try:  # an export of a checkpoint (launch/export.py) records the step it came from
            step = int(json.loads((p / "export_meta.json").read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = 0
    try:
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except Exception:  # noqa: BLE001 -- read again (with the loader's error) when the weights load
        config = None
    return ModelRef(role, path, _safe_name(name or default), checkpoint, step, config)


def check_kind(ref: ModelRef, classes: list[str], task: str) -> None:
    """Refuse a causal LM for classification and a sequence classifier for the other tasks."""
    classifier = any(c.endswith("ForSequenceClassification") for c in classes)
    if classes and classifier != (task == "classification"):
        need = ("a *ForSequenceClassification model with id2label in its config.json" if task == "classification"
                else "a causal language model (*ForCausalLM)")
        raise UserError(f"{ref.role} '{ref.path}' is a {', '.join(classes)}; task={task} needs {need}")


class Loaded:
    """A model ready for forward passes: plain (one process) or a ZeRO-3 engine's module."""

    def __init__(self, ref: ModelRef, model: Any, tokenizer: Any, engine: Any = None):
        self.ref, self.model, self.tokenizer, self.engine = ref, model, tokenizer, engine
        self.device = next(iter(model.parameters())).device

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.model = self.engine = None
        gc.collect()


def _load_hf(path: str, task: Task, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def load(ref: ModelRef, cfg: EvalConfig, work: Path) -> Loaded:
    """Load ``ref`` for ``cfg.task``, plain or (``cfg.zero3``) partitioned with ZeRO-3."""
    import torch

    from pipeline.stages.export import load_model

    dtype = getattr(torch, _DTYPES[cfg.precision])
    if not cfg.zero3:
        model, tok = load_model(ref.path, dtype=dtype)  # picks the head class from config.json
        model.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
        loaded = Loaded(ref, model, tok)
    else:
        loaded = _load_zero3(ref, cfg, work, dtype)
    try:
        check_kind(ref, [type(loaded.model).__name__], cfg.task)
    except UserError:
        loaded.close()
        raise
    loaded.model.eval()
    if cfg.task != "classification":
        loaded.model.config.use_cache = True  # training saves use_cache=false; generation wants the cache
    return loaded


def zero3_ds_config(precision: str) -> dict:
    """DeepSpeed config of the inference engine: ZeRO-3 partitioned parameters, no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; unused without training
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _load_zero3(ref: ModelRef, cfg: EvalConfig, work: Path, dtype: Any) -> Loaded:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.stages.export import load_model

    source = ref.path
    if ref.checkpoint is not None:
        # Consolidate once on rank 0 into a Hugging Face directory every rank then reads
        # partitioned (rank 0 holds the whole model in CPU memory while doing so).
        source = str(work / f"_consolidated-{ref.role}")
        if dist.is_main():
            model, tok = load_model(ref.path, dtype=dtype)
            model.save_pretrained(source)
            tok.save_pretrained(source)
            del model
            gc.collect()
        dist.barrier()
    ds = zero3_ds_config(cfg.precision)
    keep = HfDeepSpeedConfig(ds)  # makes from_pretrained load each weight into its partitions
    model, tok = _load_hf(source, cfg.task, dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    del keep
    if source != ref.path:
        dist.barrier()  # every rank has read its partitions
        if dist.is_main():
            shutil.rmtree(source, ignore_errors=True)
    return Loaded(ref, engine.module, tok, engine)


# ---------------------------------------------------------------------------- batches across ranks


def rank_plan(num_batches: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """``(batch index, real)`` per forward pass of ``rank``: batches ``rank, rank + world, ...``.

    Every rank gets ``ceil(num_batches / world)`` passes; a rank short of one repeats the
    last batch with ``real=False`` (ZeRO-3 gathers parameters collectively, so every rank
    must run every pass).
    """
    per_rank = -(-num_batches // world)
    return [(b if b < num_batches else num_batches - 1, b < num_batches) for b in (rank + k * world for k in range(per_rank))]


def _bar(total: int, desc: str):
    from pipeline.progress import progress_bar

    if dist.is_main():
        return progress_bar(total=total, desc=desc, unit="batch")
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=True)


def _gather(items: list) -> list:
    """Every rank's ``items`` concatenated (in rank order); ``items`` itself without a process group."""
    if dist.world_size() == 1:
        return items
    import torch.distributed as tdist

    out: list = [None] * dist.world_size()
    tdist.all_gather_object(out, items)
    return [x for part in out for x in part]


# ---------------------------------------------------------------------------- perplexity


def _is_shards(path: str) -> bool:
    return Path(path).is_dir()


def _check_shard_tokenizer(manifest: dict, data_dir: Path, lm: Loaded) -> None:
    """Refuse a model whose tokenizer would read the shards' token ids differently."""
    from pipeline.data.tokenizer import TRICKY_TEXTS, load_tokenizer, tokenizer_fingerprint

    info, ref = manifest["tokenizer"], lm.ref
    vocab = getattr(lm.model.config, "vocab_size", None)
    if vocab is not None and vocab < info["vocab_size"]:
        raise UserError(f"{ref.role} '{ref.path}' has {vocab} embeddings but '{data_dir}' was tokenized with "
                        f"{info['vocab_size']} tokens; evaluate it on data preprocessed with its own tokenizer")
    try:
        same = tokenizer_fingerprint(lm.tokenizer) == info["fingerprint"]
    except (AttributeError, ValueError):  # a slow tokenizer: compare encodings below
        same = False
    if same:
        return
    # A fine-tune may add chat tokens to the tokenizer (another fingerprint, same ids for text).
    theirs = load_tokenizer(data_dir / info.get("dir", "tokenizer")).hf
    for text in TRICKY_TEXTS:
        if theirs(text, add_special_tokens=False)["input_ids"] != lm.tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise UserError(f"the tokenizer of {ref.role} '{ref.path}' encodes text differently from the one '{data_dir}' "
                            f"was tokenized with (e.g. {text!r}); preprocess the data with the model's tokenizer "
                            "(tokenizer.path=MODEL_DIR) or evaluate on a JSONL text file instead")


def resolve_seq_len(cfg: EvalConfig, refs: list[ModelRef]) -> int:
    """Window length for perplexity: ``cfg.seq_len``, else the smallest model's positions capped at 1024."""
    limits = [(r, max_positions(r.config)) for r in refs if r.config is not None]
    if cfg.seq_len:
        for r, n in limits:
            if n and cfg.seq_len > n:
                raise UserError(f"seq_len={cfg.seq_len} is beyond the {n} positions of {r.role} '{r.path}'; lower seq_len")
        return cfg.seq_len
    return min([_MAX_DEFAULT_SEQ] + [n for _, n in limits if n])


def eval_perplexity(lm: Loaded, cfg: EvalConfig, seq_len: int) -> tuple[dict, list]:
    """Token-weighted mean loss over windows of ``seq_len + 1`` tokens (one shared boundary token).

    Shards: windows ``[i * seq_len, (i + 1) * seq_len + 1)`` of the split's concatenated
    tokens, exactly the samples training validates on, so every token after the first is a
    target once. A text file: each document is tokenized (with the tokenizer's own special
    tokens) plus EOS and cut the same way; a document's last window may be shorter.
    """
    import numpy as np
    import torch

    from pipeline.data.shards import TokenDataset
    from pipeline.training.trainer import IGNORE_INDEX, CausalLMTask

    B, extra = cfg.batch_size, {}
    if _is_shards(cfg.data):
        ds = TokenDataset(cfg.data, cfg.split, verify="fast")
        _check_shard_tokenizer(ds.manifest, Path(cfg.data), lm)
        n = ds.num_samples(seq_len)
        if n == 0:
            raise UserError(f"split '{cfg.split}' of '{cfg.data}' has {ds.num_tokens} tokens, fewer than one window of "
                            f"seq_len+1={seq_len + 1}; lower seq_len or use another split")
        nb = -(-n // B)

        def batch(b: int):
            return torch.from_numpy(np.stack([ds.sample(i, seq_len) for i in range(b * B, min(n, (b + 1) * B))]))
    else:
        tok = lm.tokenizer
        docs, skipped = [], 0
        for where, rec in read_records(cfg.data, "text to score (a JSONL/CSV file) or a preprocessed dataset directory"):
            ids = list(tok(field_of(where, rec, cfg.text_field, "text_field"), verbose=False)["input_ids"])
            if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
                ids.append(tok.eos_token_id)
            if len(ids) >= 2:
                docs.append(ids)
            else:  # a lone EOS: nothing to predict
                skipped += 1
        windows = [(d, s) for d, ids in enumerate(docs) for s in range(0, len(ids) - 1, seq_len)]
        if not windows:
            raise UserError(f"no document of '{cfg.data}' has 2 tokens or more; nothing to score")
        n, nb = len(windows), -(-len(windows) // B)
        extra = {"documents": len(docs), "skipped_documents": skipped}
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

        def batch(b: int):
            rows = [docs[d][s:s + seq_len + 1] for d, s in windows[b * B:(b + 1) * B]]
            T = max(len(r) for r in rows) - 1
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for i, r in enumerate(rows):  # right padding: causal attention never looks at it
                ids[i, :len(r) - 1] = torch.tensor(r[:-1])
                labels[i, :len(r) - 1] = torch.tensor(r[1:])
                mask[i, :len(r) - 1] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    if cfg.max_batches:
        nb = min(nb, cfg.max_batches)
    task, loss_sum, count = CausalLMTask(), 0.0, 0
    with torch.no_grad(), _bar(-(-nb // dist.world_size()), f"{lm.ref.name} perplexity") as bar:
        for b, real in rank_plan(nb, dist.rank(), dist.world_size()):
            loss, targets = task.loss(lm.model, batch(b))
            if real:
                loss_sum += float(loss)
                count += int(targets)
            bar.update()
    loss_sum, count = dist.all_reduce_sum_float(loss_sum), int(dist.all_reduce_sum_float(float(count)))
    mean = loss_sum / max(count, 1)
    return {"loss": mean, "ppl": perplexity(mean), "tokens": count, "windows": min(n, nb * B), "batches": nb,
            "seq_len": seq_len, **extra}, []


# ---------------------------------------------------------------------------- classification


def read_classification(cfg: EvalConfig) -> list[tuple[str, str, str | None, Any]]:
    """``(where, text, text_pair, raw label)`` of the first ``max_batches`` (0: all) examples."""
    out = []
    for where, rec in read_records(cfg.data, "labelled examples (JSONL or CSV)"):
        text = field_of(where, rec, cfg.text_field, "text_field")
        pair = field_of(where, rec, cfg.text_pair_field, "text_pair_field") if cfg.text_pair_field else None
        label = field_of(where, rec, cfg.label_field, "label_field", kind="label")
        if isinstance(label, (dict, list, bool, float)):
            raise UserError(f"{where}: label {label!r} is not a label name or integer class id (field '{cfg.label_field}')")
        out.append((where, text, pair, label))
        if cfg.max_batches and len(out) >= cfg.max_batches:
            break
    if not out:
        raise UserError(f"'{cfg.data}' holds no example; nothing to evaluate")
    return out


def label_ids(config: Any, ref: ModelRef, examples: list) -> tuple[list[str], list[int]]:
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


def eval_classification(lm: Loaded, cfg: EvalConfig, examples: list) -> tuple[dict, list]:
    import torch

    names, y_true = label_ids(lm.model.config, lm.ref, examples)
    tok, model = lm.tokenizer, lm.model
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None:  # decoder classifiers find the last real token by it
        model.config.pad_token_id = tok.pad_token_id
    max_len = cfg.seq_len or max_positions(model.config) or 512
    B, nb, local = cfg.batch_size, -(-len(examples) // cfg.batch_size), []
    with torch.no_grad(), _bar(-(-nb // dist.world_size()), f"{lm.ref.name} classification") as bar:
        for b, real in rank_plan(nb, dist.rank(), dist.world_size()):
            part = examples[b * B:(b + 1) * B]
            pairs = [p for _, _, p, _ in part] if cfg.text_pair_field else None
            enc = tok([t for _, t, _, _ in part], pairs, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            probs = model(**{k: v.to(lm.device) for k, v in enc.items()}).logits.float().softmax(-1)
            conf, pred = probs.max(-1)
            if real:
                local += [(b * B + i, int(p), float(c)) for i, (p, c) in enumerate(zip(pred.tolist(), conf.tolist()))]
            bar.update()
    preds = sorted(_gather(local))
    y_pred = [p for _, p, _ in preds]
    pair = (lambda i: {"text_pair": examples[i][2]}) if cfg.text_pair_field else (lambda i: {})
    rows = [{"index": i, "model": lm.ref.name, "text": examples[i][1], **pair(i),
             "label": names[y_true[i]], "prediction": names[p], "correct": p == y_true[i], "confidence": c}
            for i, p, c in preds]
    return classification_report(y_true, y_pred, names), rows


# ---------------------------------------------------------------------------- generation


def read_generation(cfg: EvalConfig) -> list[tuple[str, list, str]]:
    """``(where, prompt messages, reference)``: the reference is the final assistant message."""
    from pipeline.data import chat

    out = []
    for where, rec in read_records(cfg.data, "prompts with references (JSONL)"):
        given = rec.get("messages")
        last = given[-1] if isinstance(given, list) and given else None
        messages = [] if isinstance(last, dict) and last.get("role") != "assistant" else list(chat.normalize_example(rec, where))
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise UserError(f"{where} has no reference: give a \"response\" (with \"prompt\") or end \"messages\" with the "
                            "expected assistant message, after at least one message to answer")
        out.append((where, messages[:-1], str(messages[-1].get("content", ""))))
        if cfg.max_batches and len(out) >= cfg.max_batches:
            break
    if not out:
        raise UserError(f"'{cfg.data}' holds no example; nothing to evaluate")
    return out


def eval_generation(lm: Loaded, cfg: EvalConfig, examples: list) -> tuple[dict, list]:
    import torch
    from transformers import GenerationConfig

    from pipeline.data import chat

    tok, model = lm.tokenizer, lm.model
    template = chat.chat_template(tok, cfg.template)
    prompts = [list(chat.render_prompt(tok, msgs, template)) for _, msgs, _ in examples]
    stops = sorted({i for i in [tok.eos_token_id, *chat.end_of_turn_ids(tok, template)] if i is not None})
    positions = max_positions(model.config)
    limit = positions - cfg.max_new_tokens if positions else None
    if limit is not None and limit < 1:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the {positions} positions of "
                        f"{lm.ref.role} '{lm.ref.path}'; lower max_new_tokens")
    truncated = sum(limit is not None and len(p) > limit for p in prompts)
    prompts = [p[-limit:] if limit is not None else p for p in prompts]  # keep the end: the turn to answer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    # top_k=0: nucleus sampling only (GenerationConfig would otherwise also keep only the top 50).
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.do_sample else {}
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, eos_token_id=stops or None,
                               pad_token_id=pad, use_cache=True, **sampling)
    world = dist.world_size()
    B, nb, local = cfg.batch_size, -(-len(prompts) // cfg.batch_size), []
    with torch.no_grad(), _bar(-(-nb // world), f"{lm.ref.name} generation") as bar:
        for b, real in rank_plan(nb, dist.rank(), world):
            part = prompts[b * B:(b + 1) * B]
            T = max(len(p) for p in part)
            ids = torch.full((len(part), T), pad, dtype=torch.long)
            mask = torch.zeros((len(part), T), dtype=torch.long)
            for i, p in enumerate(part):  # left padding: every prompt ends where generation starts
                ids[i, T - len(p):] = torch.tensor(p)
                mask[i, T - len(p):] = 1
            torch.manual_seed(cfg.seed + b)
            out = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), generation_config=gen_cfg,
                                 synced_gpus=cfg.zero3 and world > 1)
            if real:
                for i, row in enumerate(out[:, T:].tolist()):
                    cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                    local.append((b * B + i, tok.decode(row[:cut], skip_special_tokens=True), cut))
            bar.update()
    gens = sorted(_gather(local))
    rows = [{"index": i, "model": lm.ref.name, "prompt": tok.decode(prompts[i]), "reference": examples[i][2], "generation": g,
             "exact": exact_match(g, examples[i][2]), "contains": contains(g, examples[i][2]), "new_tokens": n}
            for i, g, n in gens]
    metrics = generation_scores([r["generation"] for r in rows], [r["reference"] for r in rows])
    metrics.update(mean_new_tokens=sum(r["new_tokens"] for r in rows) / max(len(rows), 1), truncated_prompts=truncated)
    return metrics, rows


# ---------------------------------------------------------------------------- reports


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def render_markdown(report: dict) -> str:
    """The short Markdown summary: one row per headline metric, a column per model."""
    task, models = report["task"], report["models"]
    split = f" (split `{report['split']}`)" if report.get("split") else ""
    lines = [f"# Evaluation: {task}", "", f"Data: `{report['data']}`{split}"]
    for m in models:
        lines.append(f"- **{m['name']}**: `{m['path']}`" + (f", step {m['step']}" if m["checkpoint"] else ""))
    head = ["metric"] + [m["name"] for m in models] + (["difference"] if len(models) == 2 else [])
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    counts = {"perplexity": ("tokens",), "classification": ("examples",), "generation": ("examples", "mean_new_tokens")}
    keys = [*HEADLINE[task], *counts[task]]
    for k in keys:
        cells = [_fmt(m["metrics"][k]) for m in models]
        if len(models) == 2:
            diff = models[0]["metrics"][k] - models[1]["metrics"][k]
            cells.append(f"{diff:+.4f}" if isinstance(diff, float) else f"{diff:+d}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if task == "classification" and len(models[0]["metrics"]["per_class"]) <= 10:
        for label in models[0]["metrics"]["per_class"]:
            cells = [_fmt(m["metrics"]["per_class"].get(label, {}).get("f1", float("nan"))) for m in models]
            lines.append(f"| f1 {label} | " + " | ".join(cells) + (" | |" if len(models) == 2 else " |"))
    lines += ["", f"{report['timing']['seconds']:.1f} s on {report['world_size']} rank(s)."]
    return "\n".join(lines) + "\n"


def write_outputs(work: Path, report: dict, rows: list[dict]) -> None:
    """report.json, report.md, the per-example file and TensorBoard scalars, all under ``work``."""
    from torch.utils.tensorboard import SummaryWriter

    atomic_write_json(work / "report.json", report)
    atomic_write_text(work / "report.md", render_markdown(report))
    name = {"classification": "predictions.jsonl", "generation": "generations.jsonl"}.get(report["task"])
    if name:
        atomic_write_text(work / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for m in report["models"]:  # one run directory per model: TensorBoard overlays them
        with SummaryWriter(log_dir=str(work / "tensorboard" / m["name"])) as writer:
            for k in HEADLINE[report["task"]]:
                writer.add_scalar(f"eval/{k}", m["metrics"][k], m["step"])


# ---------------------------------------------------------------------------- the stage


def run(cfg: EvalConfig, local_rank: int | None = None) -> dict:
    """Evaluate ``cfg.model`` (and ``cfg.compare_to``); returns the report (on every rank)."""
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    output = Path(cfg.output)
    work = output.with_name(output.name + ".partial")
    check_output(output, inputs=[("model", cfg.model), ("compare_to", cfg.compare_to), ("data", cfg.data)])
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output '{output}' already exists; choose another output, or set overwrite=true to replace it")
    if dist.detect(local_rank_arg=local_rank).world_size > 1 and not cfg.zero3:
        raise UserError("this launch starts several processes but zero3=false: each would evaluate everything alone. "
                        "Run `python launch/evaluate.py ...`, or set zero3=true to partition the model over the ranks")
    # Everything a user can get wrong, before any weight is read.
    if cfg.task == "perplexity" and not Path(cfg.data).exists():
        raise UserError(f"data '{cfg.data}' does not exist; give a preprocessed dataset directory or a JSONL text file")
    examples: Any = {"classification": read_classification, "generation": read_generation}.get(cfg.task, lambda c: None)(cfg)
    refs = [resolve_model(cfg.model, "model", cfg.name)]
    if cfg.compare_to:
        refs.append(resolve_model(cfg.compare_to, "compare_to", cfg.compare_name))
        if refs[1].name == refs[0].name:
            refs[1].name += "-compare_to"
    seq_len = resolve_seq_len(cfg, refs) if cfg.task == "perplexity" else cfg.seq_len
    for ref in refs:
        check_kind(ref, list(getattr(ref.config, "architectures", None) or []), cfg.task)
        if cfg.task == "classification" and ref.config is not None:
            label_ids(ref.config, ref, examples)

    if cfg.zero3:
        dist.init(cfg.dist, local_rank)
    if dist.is_main():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    dist.barrier()
    task_fn: Callable = {"perplexity": lambda lm: eval_perplexity(lm, cfg, seq_len),
                         "classification": lambda lm: eval_classification(lm, cfg, examples),
                         "generation": lambda lm: eval_generation(lm, cfg, examples)}[cfg.task]
    models, rows = [], []
    try:
        for ref in refs:
            t = time.perf_counter()
            lm = load(ref, cfg, work)
            loaded_s = time.perf_counter() - t
            try:
                metrics, model_rows = task_fn(lm)
            finally:
                lm.close()
            rows += model_rows
            models.append({"role": ref.role, "name": ref.name, "path": ref.path, "checkpoint": ref.checkpoint,
                           "step": ref.step, "metrics": metrics,
                           "seconds": {"load": loaded_s, "evaluate": time.perf_counter() - t - loaded_s}})
            dist.print0(f"{ref.name}: " + ", ".join(f"{k} {_fmt(metrics[k])}" for k in HEADLINE[cfg.task]))
    except BaseException:
        if dist.is_main():  # nothing half-written stays behind (a consolidated model can be large)
            shutil.rmtree(work, ignore_errors=True)
        raise
    report = {"task": cfg.task, "data": cfg.data, "split": cfg.split if cfg.task == "perplexity" and _is_shards(cfg.data) else None,
              "config": to_dict(cfg), "world_size": dist.world_size(), "models": models,
              "difference": ({k: models[0]["metrics"][k] - models[1]["metrics"][k] for k in HEADLINE[cfg.task]}
                             if len(models) == 2 else None),
              "timing": {"started": started, "seconds": time.perf_counter() - t0}}
    if dist.is_main():
        write_outputs(work, report, rows)
        output.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(work, output)
        print(render_markdown(report), file=sys.stderr)
    dist.barrier()
    if cfg.zero3:
        dist.shutdown()
    return report

"""Stage: evaluate a model (and optionally a second one beside it) on held-out data.

    python launch/evaluate.py --config FILE [key=value ...]
    deepspeed --num_gpus N launch/evaluate.py ... zero3=true     (a model too big for one device)

Tasks: ``perplexity`` (token shards of the preprocess stage, or JSONL text), ``classification``
(a sequence-classification model on JSONL/CSV with labels) and ``generation`` (decode chat
prompts and compare with references). Models are a Hugging Face directory or a pipeline
checkpoint, loaded through :func:`pipeline.export.load_model`.

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
import importlib
import json
import math
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
from pipeline.io import atomic_write_json, atomic_write_text, publish_dir
from pipeline.metrics import classification_report, contains, exact_match, generation_scores, perplexity

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
    if not p.is_file():
        raise UserError(f"data '{path}' does not exist or is not a file; set data= to the {what}")
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


def _export():
    return importlib.import_module("pipeline.export")


def _chat():
    return importlib.import_module("pipeline.data.chat")


@dataclass
class ModelRef:
    """A model to evaluate, resolved before any weight is read."""

    role: str  # "model" or "compare_to"
    path: str
    name: str
    checkpoint: str | None  # the resolved step directory of a pipeline checkpoint
    step: int  # the checkpoint's step, else 0
    config: Any  # transformers config (labels, positions), or None when unreadable


def _resolved_dir(resolved: Any) -> Path:
    """The step directory from whatever :func:`pipeline.export.resolve_checkpoint` returns."""
    if isinstance(resolved, (tuple, list)):
        resolved = resolved[0]
    return Path(resolved)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def resolve_model(path: str, role: str, name: str) -> ModelRef:
    """Check that ``path`` exists and find its name, step and config (no weights loaded)."""
    from transformers import AutoConfig

    key = "model" if role == "model" else "compare_to"
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key} '{path}' does not exist; give a Hugging Face model directory or a pipeline checkpoint")
    export = _export()
    checkpoint, step, config_dir = None, 0, p
    if export.is_pipeline_checkpoint(p):
        step_dir = _resolved_dir(export.resolve_checkpoint(p))
        checkpoint, config_dir = str(step_dir), step_dir / "hf"
        try:
            step = int(json.loads((step_dir / "meta.json").read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            m = re.search(r"step-(\d+)", step_dir.name)
            step = int(m.group(1)) if m else 0
        run = step_dir.parent.parent.name if step_dir.parent.name == "checkpoints" else step_dir.parent.name
        default = f"{run}-step{step}"
    elif not (p / "config.json").is_file():
        raise UserError(f"{key} '{path}' is neither a Hugging Face model directory (no config.json) nor a pipeline "
                        "checkpoint (no meta.json, checkpoints/ or latest); point it at one of those")
    else:
        default = p.resolve().name
    try:
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except Exception:  # noqa: BLE001 -- read again (with the loader's error) when the weights load
        config = None
    return ModelRef(role, path, _safe_name(name or default), checkpoint, step, config)


def max_positions(config: Any) -> int | None:
    """Longest sequence the model accepts in tokens, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_classifier(model: Any) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


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

    dtype = getattr(torch, _DTYPES[cfg.precision])
    if not cfg.zero3:
        if cfg.task == "classification" and ref.checkpoint is None:
            # load_model reads causal LMs; a classifier directory keeps its own head class.
            model, tok = _load_hf(ref.path, cfg.task, dtype)
        else:
            model, tok = _export().load_model(ref.path, dtype=dtype)
        model.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
        loaded = Loaded(ref, model, tok)
    else:
        loaded = _load_zero3(ref, cfg, work, dtype)
    if cfg.task == "classification" and not _is_classifier(loaded.model):
        kind = type(loaded.model).__name__
        loaded.close()
        raise UserError(f"{ref.role} '{ref.path}' is a {kind}, not a sequence classification model; task=classification "
                        "needs a *ForSequenceClassification model with id2label in its config.json")
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

    source = ref.path
    if ref.checkpoint is not None:
        # Consolidate once on rank 0 into a Hugging Face directory every rank then reads
        # partitioned (rank 0 holds the whole model in CPU memory while doing so).
        source = str(work / f"_consolidated-{ref.role}")
        if dist.is_main():
            model, tok = _export().load_model(ref.path, dtype=dtype)
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



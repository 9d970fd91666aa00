"""Stage: evaluate a model (and optionally a second one beside it) on held-out data.

    python launch/evaluate.py --config FILE [key=value ...]
    deepspeed --num_gpus N launch/evaluate.py ... zero3=true     (a model too big for one device)

Tasks: ``perplexity`` (token shards of the preprocess stage, or JSONL text), ``classification``
(a sequence-classification model on JSONL/CSV with labels), ``generation`` (decode chat
prompts and compare with references), ``harness`` (lm-evaluation-harness tasks) and
``preference`` (held-out preference pairs: accuracy, DPO's rewards against a ``reference``),
one module each in :mod:`pipeline.eval.tasks`. Models
are a Hugging Face directory or a pipeline checkpoint (:mod:`pipeline.eval.models`); the
report is written by :mod:`pipeline.eval.report`. This module only composes them: the config,
its checks, and :func:`run`.

Outputs, published together (written in ``<output>.partial`` and renamed)::

    <output>/report.json          config, models, metrics, timing
    <output>/report.md            a short Markdown table
    <output>/predictions.jsonl    classification: one line per model and example
    <output>/generations.jsonl    generation: one line per model and example
    <output>/preferences.jsonl    preference: one line per model and pair
    <output>/tensorboard/<name>/  eval/* scalars at the checkpoint's step (else 0)

With ``zero3=true`` (launched by deepspeed/torchrun/srun) the model is partitioned with
ZeRO-3 across the ranks; batches are dealt round-robin, every rank runs the same number of
forward passes (a rank short of one repeats a batch and discards it) and results are summed
or gathered on rank 0, which writes the outputs.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import dist
from pipeline.config import to_dict
from pipeline.dist import DistConfig
from pipeline.errors import UserError
from pipeline.eval.models import check_kind, load, resolve_model
from pipeline.eval.report import render_markdown, write_outputs
from pipeline.eval.tasks import TASKS
from pipeline.eval.tasks.base import fmt
from pipeline.inputs import check_output
from pipeline.io import publish_dir

Task = Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the registry's names: perplexity, classification, ...


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
    scores, confusion matrix; generation: decode each prompt, exact match and containment;
    harness: EleutherAI's lm-evaluation-harness tasks (pip install -e ".[eval]"), their metrics
    with standard errors; preference: share of held-out pairs whose chosen answer the model
    gives a higher log-probability (summed, and per token), with reference= DPO's implicit
    reward accuracy and rewards."""
    data: str = ""
    """perplexity: a preprocessed dataset directory (its token shards, split below) or a JSONL/CSV
    file with a text field; classification: JSONL or CSV with text (optional text pair) and label
    fields; generation: JSONL of {"messages": [...]} or {"prompt", "response"} records, the
    response or final assistant message being the reference (removed from the prompt);
    harness: task names lm_eval knows and/or directories of task YAML (the harness's format,
    relative data_files read from the task's directory), comma-separated; preference: JSONL of
    preference pairs as DPO fine-tuning reads them ({"prompt" or "messages", "chosen",
    "rejected"}; strings or message lists)."""
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
    truncated); preference: most tokens of prompt + answer per row (longer ones keep their start).
    0: the model's maximum positions (of every model and the reference), capped at 1024 for perplexity."""
    max_batches: int = 0
    """Cap on the evaluation size (0: everything): batches of windows for perplexity, examples
    for classification and generation and pairs for preference (the first ones of the file),
    documents per task for harness (its limit)."""
    num_fewshot: int = -1
    """harness: examples in each prompt (-1: each task's own default)."""
    apply_chat_template: bool = False
    """harness: render every request with the model's chat template (lm_eval's
    --apply_chat_template), for chat models; a tokenizer without one gets the pipeline's builtin
    template (the one fine-tuning uses), so a base model and its chat fine-tune compare in one format."""
    batch_size: int = 8
    """Windows, examples, prompts or pairs (two rows each) per forward pass (per rank with zero3)."""
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
    """generation, preference: chat format; auto uses the tokenizer's own chat template when it has
    one (the fine-tune stage saves it there), else the pipeline's built-in one."""
    reference: str = ""
    """preference: the reference model of DPO's implicit rewards beta * (log p_model - log
    p_reference), usually the model DPO started from (the SFT model): a Hugging Face model
    directory or a pipeline checkpoint, sharing the evaluated models' tokenizer. "": accuracy
    of the log-probs alone."""
    beta: float = 0.1
    """preference with a reference: DPO's beta, the scale of the rewards (the value DPO trained with)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights and activations dtype (losses are always computed in fp32)."""
    output: str = "outputs/eval"
    """Output directory: report.json, report.md, predictions.jsonl, generations.jsonl or preferences.jsonl, tensorboard/."""
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
        if self.reference and self.task != "preference":
            p.append(("reference", f"applies to task=preference only; leave it empty for task={self.task}"))
        if not self.beta > 0:
            p.append(("beta", f"must be > 0, got {self.beta} (e.g. 0.1, the value DPO trained with)"))
        if self.num_fewshot < -1:
            p.append(("num_fewshot", f"must be >= 0, or -1 for each task's default; got {self.num_fewshot}"))
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


# ---------------------------------------------------------------------------- the stage


def run(cfg: EvalConfig, local_rank: int | None = None) -> dict:
    """Evaluate ``cfg.model`` (and ``cfg.compare_to``); returns the report (on every rank)."""
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    task = TASKS[cfg.task]
    output = Path(cfg.output)
    work = output.with_name(output.name + ".partial")
    check_output(output, inputs=[("model", cfg.model), ("compare_to", cfg.compare_to), ("reference", cfg.reference),
                                 ("data", cfg.data)])
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output '{output}' already exists; choose another output, or set overwrite=true to replace it")
    if dist.detect(local_rank_arg=local_rank).world_size > 1 and not cfg.zero3:
        raise UserError("this launch starts several processes but zero3=false: each would evaluate everything alone. "
                        "Run `python launch/evaluate.py ...`, or set zero3=true to partition the model over the ranks")
    # Everything a user can get wrong, before any weight is read.
    data = task.read(cfg)
    refs = [resolve_model(cfg.model, "model", cfg.name)]
    if cfg.compare_to:
        refs.append(resolve_model(cfg.compare_to, "compare_to", cfg.compare_name))
        if refs[1].name == refs[0].name:
            refs[1].name += "-compare_to"
    state = task.prepare(cfg, refs, data)
    for ref in refs:
        check_kind(ref, list(getattr(ref.config, "architectures", None) or []), task.name, task.head)
        task.check_model(ref, cfg, state)

    if cfg.zero3:
        dist.init(cfg.dist, local_rank)
    if dist.is_main():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    dist.barrier()
    models, rows = [], []
    try:
        extra = task.before_models(cfg, state, lambda r: load(r, task.name, task.head, cfg.precision, cfg.zero3, work))
        for ref in refs:
            t = time.perf_counter()
            lm = load(ref, task.name, task.head, cfg.precision, cfg.zero3, work)
            loaded_s = time.perf_counter() - t
            try:
                metrics, model_rows = task.evaluate(lm, cfg, state)
            finally:
                lm.close()
            rows += model_rows
            models.append({"role": ref.role, "name": ref.name, "path": ref.path, "checkpoint": ref.checkpoint,
                           "step": ref.step, "metrics": metrics,
                           "seconds": {"load": loaded_s, "evaluate": time.perf_counter() - t - loaded_s}})
            dist.print0(f"{ref.name}: " + ", ".join(f"{k} {fmt(metrics[k])}" for k in task.headline_for(state, metrics)))
    except BaseException:
        if dist.is_main():  # nothing half-written stays behind (a consolidated model can be large)
            shutil.rmtree(work, ignore_errors=True)
        raise
    headline = task.headline_for(state, models[0]["metrics"])
    report = {"task": cfg.task, "data": cfg.data, "split": task.split(cfg),
              "config": to_dict(cfg), "world_size": dist.world_size(), "models": models, "headline": list(headline),
              "difference": ({k: models[0]["metrics"][k] - models[1]["metrics"][k] for k in headline
                              if k in models[1]["metrics"]} if len(models) == 2 else None),
              "timing": {"started": started, "seconds": time.perf_counter() - t0}, **extra}
    if dist.is_main():
        write_outputs(work, report, rows)
        output.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(work, output)
        print(render_markdown(report), file=sys.stderr)
    dist.barrier()
    if cfg.zero3:
        dist.shutdown()
    return report


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/evaluate.py``: the command line (``--config``, overrides, ``--print-config``); returns the exit code."""
    from pipeline.cli import run_stage

    return run_stage(EvalConfig, lambda cfg, ns: run(cfg, ns.local_rank) and 0, prog="launch/evaluate.py", argv=argv,
                     description=description)

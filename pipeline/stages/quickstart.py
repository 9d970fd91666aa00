"""The main job on built-in defaults: corpus -> tokenizer and shards -> pre-training -> SFT ->
evaluation (base vs fine-tuned; exact match, a harness score) -> verified export -> report, in one command.

    python launch/quickstart.py [--output DIR] [--tiny] [--ranks N] [--set STAGE.key=value ...]

Every stage is its own process, run with its recipe (``configs/sample/<stage>.yaml``) and
overrides that put every output under one run directory (default ``outputs/quickstart``)::

    data/            preprocess: SentencePiece tokenizer, token shards, manifest.json
    qa_train.jsonl   the reading task: fine-tuning examples (pipeline.data.sample)
    qa_test.jsonl    held-out examples (no prompt is a training prompt)
    pretrain/        pre-training run: checkpoints/, tensorboard/, losses.json
    finetune/        SFT run: checkpoints/, tensorboard/, init_model/ (the base as HF)
    eval/            base vs fine-tuned exact match: report.md, generations.jsonl, tensorboard/
    eval-harness/    base vs fine-tuned, lm-evaluation-harness on examples/harness/sample_reading
    export/          the fine-tuned model as a verified Hugging Face directory
    report/          PNG plots and report.md from every stage's TensorBoard events
    logs/<stage>.log each stage's full output
    summary.json, summary.md

The training stages run through the ``deepspeed`` launcher on N ranks (the GPUs where
there are any, else 2 CPU ranks) with ZeRO-3 and CPU offload (the recipes' DeepSpeed JSON).
TensorBoard reads every stage at once from the run directory: its runs are
``pretrain/tensorboard``, ``finetune/tensorboard``, ``eval/tensorboard/{base,finetuned}``,
``eval-harness/tensorboard/{base,finetuned}``. Without lm-evaluation-harness (``pip install -e ".[eval]"``)
the quickstart says so up front and skips the harness stage alone (``--set harness.*`` is then refused).

Re-running resumes: the preprocess and data stages check their own outputs, a training
stage whose latest checkpoint reached ``train.max_steps`` is skipped (else it resumes from
that checkpoint), and evaluation and export are skipped once published for the current
checkpoints (each stage publishes atomically; a stale result is replaced only once its
successor is complete). A failing stage stops the chain: its name, log and exit code are
printed, with the end of its log, and the quickstart exits with that code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoint_paths import latest, read_meta
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.rendezvous import free_port

ROOT = Path(__file__).resolve().parents[2]  # pipeline/stages/quickstart.py -> the repository
RECIPES = ROOT / "configs" / "sample"
STAGES = ("preprocess", "sample-qa", "pretrain", "finetune", "evaluate", "harness", "export", "verify-export", "report")
_OVERRIDABLE = ("preprocess", "pretrain", "finetune", "evaluate", "harness")
# The harness task (held-out passages, 4-way multiple choice) and its settings: all 200 documents (13 s on 2 cores).
# In the chat template: fine-tuning taught the task in chat form (plain text: both models at chance).
HARNESS_TASK, HARNESS = ROOT / "examples" / "harness" / "sample_reading", ["max_batches=200", "apply_chat_template=true"]
_HARNESS_SCORED = ("data", "max_batches", "num_fewshot", "precision", "apply_chat_template")  # other ones: redone
HARNESS_INSTALL = 'pip install -e ".[eval]"'  # as pipeline.eval.tasks.harness.INSTALL
HARNESS_SKIPPED = "lm-evaluation-harness is not installed, so the harness stage (base vs fine-tuned on a multiple-choice task) is skipped"
# Console lines of a stage worth showing while it runs (the full output is in its log).
_ECHO = re.compile(r"^(step \d+ \||eval step \d+|train: |finetune: |resumed from|already |checkpoint |error: |"
                   r"preprocess: |  train: |base: |finetuned: |exported |report: |pipeline: )")

# --tiny: a few-minute run of every stage for tests (too short to learn the task).
TINY = {
    "preprocess": ["sample_docs=1500", "tokenizer.vocab_size=512", "val_fraction=0.05"],
    "pretrain": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "data.seq_len=64",
                 "model.max_position_embeddings=256", "train.micro_batch_size=8", "train.max_steps=40", "train.lr=3e-3",
                 "train.warmup_steps=5", "train.eval_every=20", "train.eval_batches=4", "checkpoint.every=0",
                 "monitor.log_every=5"],
    "finetune": ["sft.seq_len=160", "train.max_steps=12", "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every=6",
                 "train.eval_batches=2", "checkpoint.every=0", "monitor.log_every=3"],
    "evaluate": ["max_batches=16", "max_new_tokens=8"],  # harness: all 200 documents (under 1 s more than 50)
}
TINY_QA = (240, 16)  # fine-tuning / held-out examples


@dataclass
class Options:
    output: Path
    ranks: int
    tiny: bool = False
    overrides: dict[str, list[str]] = field(default_factory=dict)
    qa: tuple[int, int] = (2000, 200)


class StageFailed(Exception):
    """A stage exited non-zero: its name, log path and exit code."""

    def __init__(self, stage: str, log: Path, code: int, tail: str):
        self.stage, self.log, self.code, self.tail = stage, log, code, tail
        super().__init__(f"stage '{stage}' failed with exit code {code}; its log: {log}")


# ---------------------------------------------------------------------------- commands


def _overrides(opts: Options, stage: str) -> list[str]:
    return (TINY.get(stage, []) if opts.tiny else []) + opts.overrides.get(stage, [])


def _deepspeed(opts: Options, script: str) -> list[str]:
    # A free port per launch: two quickstarts (or tests) on one machine must not collide on 29500.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(opts.ranks),
            "--master_port", str(free_port()), str(ROOT / "launch" / script)]


def commands(opts: Options) -> dict[str, list[str]]:
    """The command line of every subprocess stage, wired output -> input under ``opts.output``."""
    out, py = opts.output, sys.executable
    recipe = lambda stage: ["--config", str(RECIPES / f"{stage}.yaml")]  # noqa: E731
    return {
        "preprocess": [py, str(ROOT / "launch" / "preprocess.py"), *recipe("preprocess"), f"output={out / 'data'}",
                       *_overrides(opts, "preprocess")],
        "sample-qa": [py, "-m", "pipeline.data.sample", str(out), "--train", str(opts.qa[0]), "--test", str(opts.qa[1])],
        "pretrain": [*_deepspeed(opts, "train.py"), *recipe("pretrain"), f"output={out / 'pretrain'}",
                     f"data.datasets.0.path={out / 'data'}", *_overrides(opts, "pretrain")],
        "finetune": [*_deepspeed(opts, "finetune.py"), *recipe("finetune"), f"output={out / 'finetune'}",
                     f"model.path={out / 'pretrain'}", f"sft.train={out / 'qa_train.jsonl'}", *_overrides(opts, "finetune")],
        # overwrite: is_done() found the published result stale (the stages keep it until the new one is complete)
        "evaluate": [py, str(ROOT / "launch" / "evaluate.py"), *recipe("evaluate"), f"model={out / 'finetune'}",
                     f"compare_to={out / 'pretrain'}", "name=finetuned", "compare_name=base", f"data={out / 'qa_test.jsonl'}",
                     f"output={out / 'eval'}", "overwrite=true", *_overrides(opts, "evaluate")],
        "harness": [py, str(ROOT / "launch" / "evaluate.py"), "task=harness", f"model={out / 'finetune'}",
                    f"compare_to={out / 'pretrain'}", "name=finetuned", "compare_name=base", f"data={HARNESS_TASK}",
                    f"output={out / 'eval-harness'}", "overwrite=true", *HARNESS, *_overrides(opts, "harness")],
        "export": [py, str(ROOT / "launch" / "export.py"), "--checkpoint", str(out / "finetune"),
                   "--output", str(out / "export"), "--overwrite"],
        "report": [py, str(ROOT / "launch" / "report.py"), "--logdir", str(out), "--output", str(out / "report")],
    }


def _latest_meta(run: Path) -> dict | None:
    """``meta.json`` of a training run's latest checkpoint, or None when it has none."""
    try:
        path = latest(run / "checkpoints")
        meta = read_meta(path) if path is not None else None
    except (UserError, OSError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def _max_steps(opts: Options, stage: str) -> int:
    """``train.max_steps`` of a training stage's recipe with the quickstart's overrides."""
    from pipeline.config import load_config

    if stage == "pretrain":
        from pipeline.stages.train import TrainConfig as cls
    else:
        from pipeline.stages.finetune import FinetuneConfig as cls
    overrides = [o for o in _overrides(opts, stage) if o.startswith("train.")]
    return load_config(cls, str(RECIPES / f"{stage}.yaml"), overrides).train.max_steps


def check_recipes(opts: Options, cmds: dict[str, list[str]]) -> None:
    """Every config stage's recipe with the quickstart's keys and ``--set`` overrides, loaded as
    the stage will load it, before the first stage runs: a wrong key or value for a late stage
    (``--set finetune.train.max_step=5``) is refused in seconds, not after the stages before it.

    Raises:
        UserError: a recipe is refused (the stage, its recipe, and the loader's message).
    """
    from pipeline.config import load_config
    from pipeline.stages.evaluate import EvalConfig
    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.stages.preprocess import PreprocessConfig
    from pipeline.stages.train import TrainConfig

    for stage, cls in (("preprocess", PreprocessConfig), ("pretrain", TrainConfig), ("finetune", FinetuneConfig),
                       ("evaluate", EvalConfig)):
        cmd = cmds[stage]
        recipe = cmd[cmd.index("--config") + 1]
        try:
            load_config(cls, recipe, cmd[cmd.index("--config") + 2:])
        except UserError as e:
            raise UserError(f"the {stage} stage would refuse its recipe {recipe} with these settings "
                            f"(nothing was run): {e}") from None
    if opts.overrides.get("harness") and harness_missing():
        raise UserError(f"--set harness.*: the harness stage needs lm-evaluation-harness, which is not installed; "
                        f"run {HARNESS_INSTALL} (or drop --set harness.*: the quickstart then skips that stage)")
    try:
        harness_config(opts, cmds)
    except UserError as e:
        raise UserError(f"the harness stage would refuse its settings (launch/evaluate.py task=harness "
                        f"{' '.join(HARNESS + opts.overrides.get('harness', []))}) (nothing was run): {e}") from None


def harness_missing() -> bool:
    """Whether lm-evaluation-harness (the optional ``eval`` extra) is absent: looked up, not imported."""
    return importlib.util.find_spec("lm_eval") is None


def harness_config(opts: Options, cmds: dict[str, list[str]] | None = None) -> Any:
    """The harness stage's evaluate config as the stage will load it, its task directories' YAML read (no
    lm_eval import). Raises UserError: a wrong key or value, a task directory that is not one."""
    from pipeline.config import load_config
    from pipeline.eval.tasks.harness import local_tasks
    from pipeline.stages.evaluate import EvalConfig

    cfg = load_config(EvalConfig, None, (cmds or commands(opts))["harness"][2:])
    if cfg.task != "harness":
        raise UserError(f"task: this stage runs task=harness, got task={cfg.task}; set evaluate.task for the evaluate stage")
    for item in (x.strip() for x in cfg.data.split(",") if x.strip()):
        if (ROOT / item).is_dir():  # relative to the repository, where the stage runs (an absolute path stays)
            local_tasks(ROOT / item)
        elif os.sep in item or item.endswith((".yaml", ".yml")):
            raise UserError(f"data: '{item}' is not a directory; a local harness task is a directory of task YAML")
    return cfg


def is_done(opts: Options, stage: str) -> bool:
    """Whether a stage's published output is already there (its run is then skipped)."""
    out = opts.output
    if stage in ("pretrain", "finetune"):
        meta = _latest_meta(out / stage)
        return meta is not None and meta["step"] >= _max_steps(opts, stage)
    # Evaluation and export count as done only for the models the training stages hold now
    # (a rerun with more steps trains on, and then evaluates and exports again).
    steps = {name: (_latest_meta(out / name) or {}).get("step") for name in ("pretrain", "finetune")}
    if stage == "evaluate":
        models = {m.get("name"): m.get("step") for m in (_read_json(out / "eval" / "report.json") or {}).get("models", [])}
        return models == {"finetuned": steps["finetune"], "base": steps["pretrain"]}
    if stage == "harness":
        return _harness_report(opts, steps) is not None
    if stage == "export":
        return (_read_json(out / "export" / "export_meta.json") or {}).get("step") == steps["finetune"]
    return False  # preprocess and sample-qa check their own outputs (cheaply) and say so


def _harness_report(opts: Options, steps: dict | None = None) -> dict | None:
    """The published harness report if made on the current models with this run's scored settings, else None."""
    out = opts.output
    steps = steps or {name: (_latest_meta(out / name) or {}).get("step") for name in ("pretrain", "finetune")}
    report = _read_json(out / "eval-harness" / "report.json") or {}
    models = {m.get("name"): m.get("step") for m in report.get("models", [])}
    if models != {"finetuned": steps["finetune"], "base": steps["pretrain"]}:
        return None
    cfg, done = harness_config(opts), report.get("config") or {}
    return report if all(done.get(k) == getattr(cfg, k) for k in _HARNESS_SCORED) else None


# ---------------------------------------------------------------------------- running


def run_stage(name: str, cmd: list[str], log: Path, echo=print) -> float:
    """Run ``cmd`` with its output in ``log`` (interesting lines echoed); returns seconds.

    Raises:
        StageFailed: non-zero exit.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    tail: list[str] = []
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            tail = (tail + [line.rstrip()])[-25:]
            # the deepspeed launcher prefixes rank output with "[rank0]:" on some versions
            text = re.sub(r"^\[rank\d+\]:", "", line.rstrip())
            if _ECHO.match(text):
                echo(f"    {text}")
        code = proc.wait()
    if code != 0:
        raise StageFailed(name, log, code, "\n".join(tail))
    return time.perf_counter() - t0


def verify_export(export_dir: Path, test_file: Path, limit: int = 16) -> dict[str, Any]:
    """Load the export with plain transformers and answer ``limit`` held-out prompts.

    This is what a user of the exported directory does (no pipeline code involved): the
    tokenizer's saved chat template renders the prompt, greedy decoding stops at EOS.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.eval.metrics import exact_match

    hf_logging.disable_progress_bar()  # a bar for a 1-second load only clutters the summary
    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines()[:limit] if line.strip()]
    hits, shown = 0, None
    for rec in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([list(ids)]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        answer = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        hits += exact_match(answer, rec["response"])
        shown = shown or {"question": rec["prompt"].rsplit("\n", 1)[-1], "reference": rec["response"], "answer": answer}
    return {"model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "prompts": len(rows), "exact_match": hits / max(len(rows), 1), "example": shown}


# ---------------------------------------------------------------------------- summary


def unigram_perplexity(data_dir: Path) -> dict[str, float]:
    """Perplexity of the validation tokens under the training split's unigram distribution.

    ``p(t) = (count_train(t) + 1) / (N_train + V)`` (add-one smoothing, so a token absent
    from the training split does not make it infinite); perplexity ``exp(-mean log p)``
    over the validation tokens. A model that learned nothing beyond token frequencies
    scores about this; every point below it is learned context.
    """
    import numpy as np

    from pipeline.data.shards import TokenDataset, read_manifest

    vocab = int(read_manifest(data_dir)["tokenizer"]["vocab_size"])
    counts = _count_tokens(TokenDataset(data_dir, "train", verify="none"), vocab)
    val_counts = _count_tokens(TokenDataset(data_dir, "val", verify="none"), vocab)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))
    nll = float(-(val_counts * logp).sum() / max(val_counts.sum(), 1.0))
    return {"ppl": math.exp(nll), "loss": nll, "train_tokens": int(counts.sum()), "val_tokens": int(val_counts.sum())}


def _count_tokens(ds, vocab: int):
    """Occurrences of every token id in a split, read a million tokens at a time (bounded memory)."""
    import numpy as np

    counts = np.zeros(vocab, dtype=np.float64)
    n, chunk = ds.num_tokens, 1 << 20
    for start in range(0, n, chunk):
        ids = np.asarray(ds.tokens(start, min(chunk, n - start)), dtype=np.int64)
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    return counts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last(points: list) -> float | None:
    return float(points[-1][1]) if points else None


def _median(points: list) -> float | None:
    vals = sorted(v for _, v in points)
    return float(vals[len(vals) // 2]) if vals else None


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _per_kind(out: Path) -> dict[str, dict[str, float]]:
    """Exact match per question kind and model, joining generations.jsonl with qa_test.jsonl."""
    kinds = [json.loads(line).get("kind", "?") for line in _lines(out / "qa_test.jsonl")]
    tally: dict[str, dict[str, list[int]]] = {}
    for line in _lines(out / "eval" / "generations.jsonl"):
        g = json.loads(line)
        hit = tally.setdefault(g["model"], {}).setdefault(kinds[g["index"]] if g["index"] < len(kinds) else "?", [0, 0])
        hit[0] += bool(g["exact"])
        hit[1] += 1
    return {model: {k: h / n for k, (h, n) in sorted(ks.items())} for model, ks in tally.items()}


def summarize(opts: Options, seconds: dict[str, float], export_check: dict | None) -> dict[str, Any]:
    """Everything the summary table shows, read back from the stages' published outputs."""
    from pipeline.data.shards import read_manifest
    from pipeline.eval.plots import load_scalars

    out = opts.output
    manifest = read_manifest(out / "data")
    scalars = load_scalars(out)
    pre, ft = scalars.get("pretrain/tensorboard", {}), scalars.get("finetune/tensorboard", {})
    report = _read_json(out / "eval" / "report.json") or {}
    models = {m["name"]: m["metrics"] for m in report.get("models", [])}
    pre_meta, ft_meta = _latest_meta(out / "pretrain") or {}, _latest_meta(out / "finetune") or {}
    totals = manifest["totals"]
    unigram = unigram_perplexity(out / "data")
    return {
        "output": str(out),
        "ranks": opts.ranks,
        "tiny": opts.tiny,
        "data": {"train_documents": totals["train"]["documents"], "train_tokens": totals["train"]["tokens"],
                 "val_documents": totals["val"]["documents"], "val_tokens": totals["val"]["tokens"],
                 "vocab_size": manifest["tokenizer"]["vocab_size"], "sft_train_examples": len(_lines(out / "qa_train.jsonl")),
                 "sft_test_examples": len(_lines(out / "qa_test.jsonl"))},
        "pretrain": {"steps": pre_meta["step"], "parameters": pre_meta.get("n_params"),
                     "tokens_seen": pre_meta["step"] * pre_meta["global_batch"] * pre_meta["seq_len"],
                     "first_train_loss": float(pre["train/loss"][0][1]) if pre.get("train/loss") else None,
                     "train_loss": _last(pre.get("train/loss", [])), "val_loss": _last(pre.get("eval/loss", [])),
                     "val_ppl": _last(pre.get("eval/ppl", [])), "unigram_ppl": unigram["ppl"],
                     "tokens_per_s": _median(pre.get("perf/tokens_per_s", []))},
        "finetune": {"steps": ft_meta["step"], "examples": (ft_meta.get("data") or {}).get("train", {}).get("examples"),
                     "train_loss": _last(ft.get("train/loss", [])), "val_loss": _last(ft.get("eval/loss", [])),
                     "tokens_per_s": _median(ft.get("perf/tokens_per_s", []))},
        "evaluate": {"examples": (models.get("finetuned") or {}).get("examples"),
                     "exact_match_base": (models.get("base") or {}).get("exact_match"),
                     "exact_match_finetuned": (models.get("finetuned") or {}).get("exact_match"),
                     "contains_base": (models.get("base") or {}).get("contains"),
                     "contains_finetuned": (models.get("finetuned") or {}).get("contains"),
                     "exact_match_by_kind": _per_kind(out)},
        "harness": _harness_summary(opts),
        "export": export_check,
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(sum(seconds.values()), 1)},
        "artifacts": {"data": str(out / "data"), "pretrain": str(out / "pretrain" / "checkpoints"),
                      "finetune": str(out / "finetune" / "checkpoints"), "evaluation": str(out / "eval" / "report.md"),
                      "generations": str(out / "eval" / "generations.jsonl"),
                      "harness": str(out / "eval-harness" / "report.md"), "export": str(out / "export"),
                      "report": str(out / "report" / "report.md"), "logs": str(out / "logs"),
                      "summary": str(out / "summary.md")},
        "tensorboard": f"tensorboard --logdir {out}",
    }


def _harness_summary(opts: Options) -> dict[str, Any]:
    """``{"data", "documents", "metrics": {"<task>/<metric>": {"base", "base_stderr", "finetuned",
    "finetuned_stderr"}}, "skipped"}`` from the current harness report (``skipped``: why there is none)."""
    if (report := _harness_report(opts)) is None:
        why = f"{HARNESS_SKIPPED} ({HARNESS_INSTALL})" if harness_missing() else "no report for the current models"
        return {"data": None, "documents": None, "metrics": {}, "skipped": why}
    models = {m["name"]: m["metrics"] for m in report.get("models", [])}
    metrics = {key: {f"{who}{suffix}": (models.get(who) or {}).get(key + suffix)
                     for who in ("base", "finetuned") for suffix in ("", "_stderr")}
               for key in report.get("headline", [])}
    cfg, docs = report.get("config") or {}, None  # documents per model: known for the shipped task only
    if cfg.get("data") and (ROOT / cfg["data"]).resolve() == HARNESS_TASK.resolve():  # relative: the repository's
        docs = sum(len(_lines(f)) for f in HARNESS_TASK.glob("*.jsonl"))
        docs = min(docs, cfg.get("max_batches") or docs)
    return {"data": cfg.get("data"), "documents": docs, "metrics": metrics, "skipped": None}


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def render_summary(s: dict[str, Any]) -> str:
    """The summary as Markdown (also what the console shows)."""
    d, p, f, e, x = s["data"], s["pretrain"], s["finetune"], s["evaluate"], s["export"] or {}
    h = s.get("harness") or {}
    docs = f" on {h['documents']} documents" if h.get("documents") else ""
    harness = [("harness", f"{key}{docs}{' (± standard error)' if not i else ''}: base -> fine-tuned",
                f"{_f(m['base'])} ± {_f(m['base_stderr'])} -> {_f(m['finetuned'])} ± {_f(m['finetuned_stderr'])}")
               for i, (key, m) in enumerate((h.get("metrics") or {}).items())]
    rows = [
        ("data", "documents (train / val)", f"{d['train_documents']:,} / {d['val_documents']:,}"),
        ("data", "tokens (train / val), vocabulary", f"{d['train_tokens']:,} / {d['val_tokens']:,}, {d['vocab_size']:,}"),
        ("data", "fine-tuning examples / held-out prompts", f"{d['sft_train_examples']:,} / {d['sft_test_examples']:,}"),
        ("pretrain", "steps, parameters, tokens seen", f"{p['steps']}, {_f(p['parameters'], '{:,}')}, {p['tokens_seen']:,}"),
        ("pretrain", "train loss (first -> last)", f"{_f(p['first_train_loss'])} -> {_f(p['train_loss'])}"),
        ("pretrain", "validation loss / perplexity", f"{_f(p['val_loss'])} / {_f(p['val_ppl'], '{:.2f}')}"),
        ("pretrain", "unigram-baseline perplexity (train token counts)", _f(p["unigram_ppl"], "{:.2f}")),
        ("pretrain", "throughput (median, all ranks)", _f(p["tokens_per_s"], "{:,.0f} tokens/s")),
        ("finetune", "steps, train loss, validation loss", f"{f['steps']}, {_f(f['train_loss'])}, {_f(f['val_loss'])}"),
        ("finetune", "throughput (median, all ranks)", _f(f["tokens_per_s"], "{:,.0f} tokens/s")),
        ("evaluate", f"exact match on {e['examples']} held-out prompts: base -> fine-tuned",
         f"{_f(e['exact_match_base'])} -> {_f(e['exact_match_finetuned'])}"),
        ("evaluate", "answer contained: base -> fine-tuned", f"{_f(e['contains_base'])} -> {_f(e['contains_finetuned'])}"),
        *(harness or [("harness", "lm-evaluation-harness score: base -> fine-tuned", h.get("skipped") or "n/a")]),
        ("export", "reloaded with transformers; exact match on its prompts",
         f"{x.get('model_class', 'n/a')}, {_f(x.get('exact_match'))} on {x.get('prompts', 0)}"),
    ]
    lines = ["# Quickstart summary", "", "| stage | what | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    kinds = e.get("exact_match_by_kind") or {}
    if kinds.get("finetuned"):
        lines += ["", "Exact match by question kind (base -> fine-tuned): " + ", ".join(
            f"{k} {kinds.get('base', {}).get(k, 0):.2f} -> {v:.2f}" for k, v in kinds["finetuned"].items()) + "."]
    if x.get("example"):
        ex = x["example"]
        lines += ["", f"Example from the export: {ex['question']} -> `{ex['answer']}` (reference `{ex['reference']}`)."]
    secs = s["seconds"]
    lines += ["", "Time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items() if k != "total")
              + f"; total {secs['total']:.0f} s ({s['ranks']} ranks).", "", "| artifact | where |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in s["artifacts"].items()]
    lines += ["", f"Watch every stage side by side: `{s['tensorboard']}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def run(opts: Options, echo=print) -> dict[str, Any]:
    """Run every stage in order (skipping completed ones); returns the summary.

    Raises:
        UserError: a stage's recipe is refused (:func:`check_recipes`), before any stage runs.
        StageFailed: a stage exited non-zero (the chain stops there).
    """
    out = opts.output
    check_recipes(opts, commands(opts))
    if no_harness := harness_missing():  # said before the first stage, not after minutes of training
        echo(f"quickstart: {HARNESS_SKIPPED}; install it with {HARNESS_INSTALL} to get that score")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    export_check = None
    for i, stage in enumerate(STAGES, 1):
        log = out / "logs" / f"{stage}.log"
        if is_done(opts, stage):
            echo(f"[{i}/{len(STAGES)}] {stage}: already complete, skipped")
            continue
        if stage == "harness" and no_harness:
            echo(f"[{i}/{len(STAGES)}] {stage}: skipped, lm-evaluation-harness is not installed ({HARNESS_INSTALL})")
            continue
        echo(f"[{i}/{len(STAGES)}] {stage} (log: {log})")
        t0 = time.perf_counter()
        if stage == "verify-export":
            try:
                export_check = verify_export(out / "export", out / "qa_test.jsonl")
            except Exception as e:  # noqa: BLE001 -- reported like a failed stage, with the error text in its log
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
                raise StageFailed(stage, log, 1, f"{type(e).__name__}: {e}") from e
            atomic_write_json(log.with_suffix(".json"), export_check)
            echo(f"    {export_check['model_class']} loads; exact match {export_check['exact_match']:.3f} "
                 f"on {export_check['prompts']} held-out prompts")
        else:
            run_stage(stage, commands(opts)[stage], log, echo)  # built now: its free port is fresh
        seconds[stage] = time.perf_counter() - t0
        echo(f"    done in {seconds[stage]:.0f} s")
    if export_check is None:
        export_check = _read_json(out / "logs" / "verify-export.json")
    # Each stage's time from the run that did its work (a rerun that skips it keeps that figure).
    timings = {**(_read_json(out / "logs" / "seconds.json") or {}), **seconds}
    atomic_write_json(out / "logs" / "seconds.json", timings)
    summary = summarize(opts, {k: timings[k] for k in STAGES if k in timings}, export_check)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_summary(summary))
    return summary


def _parse_set(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        stage, dot, rest = item.partition(".")
        if not dot or stage not in _OVERRIDABLE or "=" not in rest:
            raise UserError(f"--set {item!r}: expected STAGE.key=value with STAGE one of {', '.join(_OVERRIDABLE)} "
                            "(e.g. --set pretrain.train.max_steps=50)")
        out.setdefault(stage, []).append(rest)
    return out


def default_ranks() -> int:
    """The GPUs of this machine, else 2 CPU ranks (the smallest ZeRO-3 partitioning)."""
    try:
        import torch

        return torch.cuda.device_count() or 2
    except Exception:  # noqa: BLE001 -- a broken CUDA setup still runs on CPU ranks
        return 2


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/quickstart.py``: parse, run the chain, print the summary; exit code 0 or the failed stage's."""
    from pipeline.cli import report_errors

    p = argparse.ArgumentParser(prog="launch/quickstart.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/quickstart", metavar="DIR", help="run directory (default outputs/quickstart)")
    p.add_argument("--ranks", type=int, default=0, metavar="N", help="ranks of the training stages (default: GPUs, else 2)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few steps per stage (tests; learns little)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.key=value",
                   help="override a recipe key of preprocess, pretrain, finetune, evaluate or harness "
                        "(evaluate's keys for task=harness) (repeatable)")
    ns = p.parse_args(argv)

    def body() -> int:
        if ns.ranks < 0:
            raise UserError(f"--ranks must be >= 1, got {ns.ranks}")
        opts = Options(output=Path(ns.output).resolve(), ranks=ns.ranks or default_ranks(), tiny=ns.tiny,
                       overrides=_parse_set(ns.set), qa=TINY_QA if ns.tiny else (2000, 200))
        t0 = time.perf_counter()
        print(f"quickstart: {opts.ranks} ranks, run directory {opts.output}", flush=True)
        try:
            summary = run(opts, echo=lambda line: print(line, flush=True))
        except StageFailed as e:
            print(e.tail, file=sys.stderr)
            print(f"quickstart: stage '{e.stage}' FAILED with exit code {e.code}; full log: {e.log}", file=sys.stderr)
            return e.code
        print()
        print(render_summary(summary))
        print(f"quickstart: done in {time.perf_counter() - t0:.0f} s; summary in {opts.output / 'summary.md'}")
        return 0

    return report_errors(body)

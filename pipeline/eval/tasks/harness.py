"""``task=harness``: EleutherAI's lm-evaluation-harness (``lm_eval``) on the stage's models.

``data`` names the harness tasks, comma-separated: names ``lm_eval`` knows (``hellaswag``,
``arc_easy``, ``mmlu``: their data comes from the Hugging Face Hub, or its cache offline) and
directories of task YAML in the harness's own format (with their data, e.g. JSONL: relative
``data_files`` are read from the task's directory). The harness scores the model the stage
loaded (a Hugging Face directory or a pipeline checkpoint, plain or ZeRO-3) through its own
``HFLM`` wrapper, so the numbers are the harness's: ``num_fewshot``, ``max_batches`` (the
harness's ``limit``: documents per task) and ``batch_size`` are passed to it as they are.

Metrics are ``<task>/<metric>`` (e.g. ``sample_mc/acc``), each with ``<task>/<metric>_stderr``,
the harness's standard error, beside it in the report.

Every check runs before any model is loaded: the harness installed (an optional extra), each
name known, each YAML readable, each task's data loadable (a Hub task without its data offline
is named with what to do). Every task a directory's YAML files define (a ``task:`` name) runs;
a group defined there is not aggregated (name its tasks' directory, or the group by name).

Over the ranks of a process group (evaluate ``zero3=true``, or the training engine: the
training stages run the same tasks in the loop through :func:`in_loop`) scoring tasks are
dealt over the ranks with the harness's own rank hooks (:func:`_ranked_hflm`); generative tasks
run every request on every rank.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.eval.models import Loaded
from pipeline.eval.tasks.base import EvalTask

INSTALL = 'pip install -e ".[eval]"'
"""How to install the harness (the ``eval`` extra pins the versions the tests cover)."""


def _lm_eval():
    """The harness's package, or one message saying how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.tasks
    except ImportError:
        raise UserError(f"the lm-evaluation-harness (task=harness, harness.tasks) is not installed; run {INSTALL}") from None
    return lm_eval


def _read_yaml(path: Path) -> Any:
    """A task YAML as data, its ``!function`` (and any other) tags read as plain strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: loader.construct_scalar(node)
                                 if isinstance(node, yaml.ScalarNode) else None)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except UnicodeDecodeError:
        raise UserError(f"harness task file '{path}' is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"harness task file '{path}' is not valid YAML ({' '.join(str(e).split())}); fix it "
                        "(the harness's task format: https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/task_guide.md)") from None


def local_tasks(directory: Path) -> list[str]:
    """The task names the YAML files of ``directory`` define (``task:`` keys), checked for syntax."""
    names = []
    for f in sorted(directory.rglob("*.yaml")) + sorted(directory.rglob("*.yml")):
        doc = _read_yaml(f)
        if not isinstance(doc, dict):
            raise UserError(f"harness task file '{f}' holds {type(doc).__name__}, not a mapping of task keys; "
                            "each YAML file defines one task (task:, dataset_path:, output_type:, ...)")
        task = doc.get("task")
        if isinstance(task, str):
            if "include" not in doc and not doc.get("dataset_path") and not doc.get("class"):
                raise UserError(f"harness task file '{f}' (task '{task}') has no dataset_path; "
                                "name the data (e.g. dataset_path: json with dataset_kwargs.data_files)")
            names.append(task)
    if not names:
        raise UserError(f"data: the directory '{directory}' defines no harness task (no YAML file with a task: key); "
                        "point data at a directory of lm-evaluation-harness task YAML, or name a task")
    return names


class HarnessTasks:
    """The tasks of ``data``, checked before any model by building them once (their data loaded):
    ``groups`` of ``(directory or None, names, TaskManager)``."""

    def __init__(self, spec: str):
        lm_eval = _lm_eval()
        from lm_eval.tasks import TaskManager

        self.version = lm_eval.__version__
        items = [x.strip() for x in spec.split(",") if x.strip()]
        if not items:
            raise UserError("data: no harness task named; set data=TASK[,TASK...] (names lm_eval knows, or task directories)")
        dirs = [Path(x) for x in items if Path(x).is_dir()]
        names = [x for x in items if not Path(x).is_dir()]
        self.groups: list[tuple[Path | None, list[str], Any]] = []
        for d in dirs:
            local = local_tasks(d)
            self.groups.append((d.resolve(), local, TaskManager(include_path=str(d.resolve()), include_defaults=False)))
        if names:
            looks_like_path = [n for n in names if os.sep in n or n.endswith((".yaml", ".yml"))]
            if looks_like_path:
                raise UserError(f"data: '{looks_like_path[0]}' is not a directory; a local harness task is a directory "
                                "of task YAML (and its data)")
            manager = TaskManager()
            known = set(manager.all_tasks)
            for n in names:
                if n not in known:
                    close = difflib.get_close_matches(n, sorted(known), n=3)
                    raise UserError(f"data: '{n}' is not a task lm-evaluation-harness {self.version} knows"
                                    + (f" (close: {', '.join(close)})" if close else "")
                                    + "; list them with `lm_eval ls tasks`, or give a directory of task YAML")
            self.groups.append((None, names, manager))
        self.output_types: set[str] = set()
        self.default_shots = 0  # the most few-shot examples a task asks for by default
        for d, n, m in self.groups:
            leaves = _leaves(self._build(d, n, m))
            self.output_types |= {t.OUTPUT_TYPE for t in leaves}
            self.default_shots = max([self.default_shots, *(int(t.config.num_fewshot or 0) for t in leaves)])

    def split(self, num_fewshot: int) -> bool:
        """Whether the documents can be dealt over the ranks (``num_fewshot`` as the stage's key, -1:
        the tasks' defaults) with the numbers of one process:

        * scoring tasks only: the harness pads every rank to the same number of scoring requests, so
          (without its context grouping) every rank runs the same number of forward passes, which a
          ZeRO-3 model needs; generation stops at different lengths per rank;
        * zero-shot only: the harness draws each document's examples from one random stream in
          document order, so a rank holding every other document would draw other examples (measured:
          acc 0.633 on 2 ranks against 0.600 in one process with 2 shots).

        Otherwise every rank runs every request."""
        shots = self.default_shots if num_fewshot < 0 else num_fewshot
        scoring = bool(self.output_types) and self.output_types <= {"loglikelihood", "multiple_choice", "loglikelihood_rolling"}
        return scoring and shots == 0

    @staticmethod
    def _build(directory: Path | None, names: list[str], manager: Any) -> dict:
        """The harness's task objects (their data loaded now: a missing file or an offline Hub is a user error here)."""
        from lm_eval.tasks import get_task_dict

        with _cwd(directory):  # a local task's relative data_files are its directory's
            try:
                return get_task_dict(names, manager)
            except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
                where = f"the task directory '{directory}'" if directory else f"task(s) {', '.join(names)}"
                hub = "" if directory else (" (a task named without a directory reads its data from the Hugging Face Hub: "
                                            "run it once on a connected machine to fill the cache, or use a local task directory)")
                raise UserError(f"data: could not load the data of {where}: {' '.join(str(e).split())[:400]}{hub}") from None

    def task_names(self) -> list[str]:
        return [n for _, names, _ in self.groups for n in names]


def _leaves(task_dict: dict) -> list:
    """The task objects of a (possibly grouped, nested) task dict."""
    out = []
    for v in task_dict.values():
        out += _leaves(v) if isinstance(v, dict) else [v]
    return out


@contextlib.contextmanager
def _cwd(directory: Path | None):
    if directory is None:
        yield
        return
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def run_harness(model: Any, tokenizer: Any, tasks: HarnessTasks, *, num_fewshot: int, limit: int, batch_size: int,
                chat: bool = False) -> dict:
    """The harness's results for a loaded model: ``{task: {"acc,none": ..., "acc_stderr,none": ...}}``
    (the same on every rank), through ``lm_eval.simple_evaluate`` (what its command line runs: the
    same seeds and few-shot sampling, so the numbers equal ``lm_eval --model hf`` on the same model
    and tasks).

    In a process group of several ranks (a ZeRO-3 model, or the training engine) the documents are
    dealt over the ranks when :meth:`HarnessTasks.split` allows; otherwise every rank runs every
    request (the partitioned forward passes must line up) and rank 0's results count.

    Args:
        model: a transformers causal LM ready for forward passes (a ZeRO-3 engine's module too).
        num_fewshot: examples in each prompt (-1: each task's own default).
        limit: documents per task (0: all).
        chat: render every request with the tokenizer's chat template (``lm_eval
            --apply_chat_template``); a tokenizer without one gets the pipeline's builtin template,
            the one fine-tuning renders conversations with (:mod:`pipeline.data.chat`).
    """
    import logging

    import torch.distributed as tdist
    from lm_eval import simple_evaluate

    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    log = logging.getLogger("lm_eval")
    level = log.level
    # its per-task INFO lines and its warning that a model object (ours, loaded by the stage) is not a path
    log.setLevel(logging.ERROR)
    # The harness bootstraps some standard errors (perplexity, F1, BLEU) in a forked multiprocessing pool;
    # a fork of a training or ZeRO-3 process (gloo, DeepSpeed and TensorBoard threads holding locks) can
    # deadlock in the child. Its single-process path draws the same resamples (one seed per chunk).
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    # It also runs `git describe` in the working directory (a task's directory here) for its metadata, and git
    # prints "fatal: not a git repository" to the terminal where that is none; the hash is not reported here.
    import lm_eval.evaluator as harness_evaluator

    git_hash = harness_evaluator.get_git_commit_hash
    harness_evaluator.get_git_commit_hash = lambda: None
    if chat and not getattr(tokenizer, "chat_template", None):
        from pipeline.data import chat as chat_format

        tokenizer.chat_template = chat_format.chat_template(tokenizer, "auto")  # the builtin one (this object only)
    try:
        lm = _ranked_hflm(model, tokenizer, batch_size, world if tasks.split(num_fewshot) else 1)
        out: dict = {}
        for directory, names, manager in tasks.groups:
            with _cwd(directory):
                res = simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                      num_fewshot=None if num_fewshot < 0 else num_fewshot, limit=limit or None,
                                      apply_chat_template=chat,
                                      log_samples=False, verbosity="ERROR")
            out.update(res["results"] if res else {})
    finally:
        log.setLevel(level)
        harness_evaluator.get_git_commit_hash = git_hash
        if multiproc is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc
    if world > 1:  # rank 0 aggregated (split) or every rank did the same (not split): one answer everywhere
        box = [out]
        tdist.broadcast_object_list(box, src=0)
        out = box[0]
    return out


def _interleave(parts: list[dict]) -> dict:
    """``{task: {key: values}}`` of every rank merged, the values taken round-robin (rank 0's first, then
    rank 1's first, ...): the document order of the harness's dealing (rank ``r`` holds documents
    ``r, r + world, ...``). A rank without documents of a task contributes nothing."""
    merged: dict = {}
    for task in dict.fromkeys(t for p in parts for t in p):
        merged[task] = {}
        for key in dict.fromkeys(k for p in parts for k in p.get(task, {})):
            lists = [p.get(task, {}).get(key, []) for p in parts]
            merged[task][key] = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
    return merged


def _ranked_hflm(model: Any, tokenizer: Any, batch_size: int, world: int) -> Any:
    """The harness's ``HFLM`` around a loaded model; with ``world > 1`` it takes this rank's share of
    the documents and gathers over the existing process group (gloo or NCCL), not through
    ``accelerate`` (the harness's own way, which would start another group)."""
    import torch
    import torch.distributed as tdist
    from lm_eval.models.huggingface import HFLM

    class Ranked(HFLM):
        def all_gather(self, tensor):
            parts = [torch.zeros_like(tensor) for _ in range(world)]
            tdist.all_gather(parts, tensor)
            return torch.stack(parts)

        def gather_object(self, obj, dst=0):
            result = [None] * world if self.rank == dst else None
            tdist.gather_object(obj, result, dst=dst)
            if result is None:
                return None
            # The harness gathers each task's per-document metrics ({task: {(metric, filter): [values]}}) and
            # chains them rank after rank; rank r held documents r, r + world, ...: interleave them back into
            # document order, so order-dependent aggregates (the bootstrap standard errors) equal one process's.
            merged = _interleave(result)
            return [merged]

        def barrier(self):
            tdist.barrier()

    if world <= 1:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # logits_cache=False: no grouping of requests by context, so equal request counts (the harness pads
    # every rank to the longest) give every rank the same number of forward passes (ZeRO-3 lines them up)
    lm = Ranked(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, logits_cache=False)
    lm._rank, lm._world_size = tdist.get_rank(), world
    return lm


def flatten(results: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value, "<task>/<metric>_stderr": stderr}`` from the harness's results
    (a filter other than ``none`` is named in brackets: ``gsm8k/exact_match[strict-match]``)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample counts, "N/A" standard errors
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric[: -len("_stderr")] if stderr else metric
            flat[f"{task}/{base}" + (f"[{filt}]" if filt != "none" else "") + ("_stderr" if stderr else "")] = float(value)
    return flat


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run on the live model during training (train and fine-tune)."""

    tasks: str = ""
    """Harness tasks to run every `every` steps and after the last one, on the model being trained
    (no checkpoint reload): names lm_eval knows and/or directories of task YAML, comma-separated,
    as evaluate's task=harness reads them ("": none). Needs pip install -e ".[eval]"."""
    every: int = 0
    """Optimizer steps between runs (0: train.eval_every)."""
    num_fewshot: int = -1
    """Examples in each prompt (-1: each task's own default)."""
    max_batches: int = 0
    """Documents per task (the harness's limit; 0: all of them)."""
    batch_size: int = 8
    """Requests per forward pass (per rank)."""
    apply_chat_template: bool = False
    """Render every request with the run's chat template (lm_eval's --apply_chat_template; the
    builtin template for a tokenizer without one), e.g. for a chat fine-tune."""

    def check(self) -> list[tuple[str, str]]:
        p = []
        if self.every < 0:
            p.append(("every", f"must be >= 0 (0: train.eval_every), got {self.every}"))
        if self.num_fewshot < -1:
            p.append(("num_fewshot", f"must be >= 0, or -1 for each task's default; got {self.num_fewshot}"))
        if self.max_batches < 0:
            p.append(("max_batches", f"must be >= 0 (0: every document), got {self.max_batches}"))
        if self.batch_size < 1:
            p.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        return p


def in_loop(cfg: HarnessConfig, tokenizer: Any, *, sp: int = 1, head: str = "causal_lm") -> Callable[[Any], dict[str, float]] | None:
    """The training stages' in-loop harness: ``fn(engine) -> {"harness/<task>/<metric>": ..., "harness/seconds": ...}``
    run by every rank on the engine's module (eval mode, no gradients, back to training after), or
    None when ``cfg.tasks`` is empty. The tasks are checked and their data loaded here, before the
    process group (every user error first).

    Args:
        tokenizer: the tokenizer a checkpoint of the run carries (so the numbers equal evaluate's
            task=harness on that checkpoint), or its directory.
        sp: the sequence-parallel degree: the harness's requests are whole sequences, which a
            sequence-parallel model cannot run, so sp > 1 is refused.
        head: the model's head; the harness scores causal language models only.
    """
    if not cfg.tasks:
        return None
    if head != "causal_lm":
        raise UserError("harness.tasks: the harness scores causal language models, and this run trains a "
                        f"{head} head; drop harness.tasks (evaluate the classifier with task=classification)")
    if sp > 1:
        raise UserError("harness.tasks: the harness's requests are whole sequences, which a sequence-parallel model "
                        f"(parallel.sequence_parallel_size={sp}) cannot run; evaluate the run's checkpoints with "
                        "`python launch/evaluate.py task=harness model=<run> data=...` instead, or drop harness.tasks")
    tasks = HarnessTasks(cfg.tasks)
    if isinstance(tokenizer, (str, Path)):  # read once, not at every evaluation
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))

    def run(engine: Any) -> dict[str, float]:
        t = time.perf_counter()
        engine.eval()
        try:
            results = flatten(run_harness(engine.module, tokenizer, tasks, num_fewshot=cfg.num_fewshot, chat=cfg.apply_chat_template,
                                          limit=cfg.max_batches, batch_size=cfg.batch_size))
        finally:
            engine.train()
        return {**{f"harness/{k}": v for k, v in results.items()}, "harness/seconds": time.perf_counter() - t}

    return run


class Harness(EvalTask):
    name = "harness"
    headline = ()  # per run: every <task>/<metric> the harness reports (see headline_for)

    def read(self, cfg: Any) -> HarnessTasks:
        return HarnessTasks(cfg.data)

    def headline_for(self, state: HarnessTasks, metrics: dict) -> tuple[str, ...]:
        return tuple(k for k in metrics if not k.endswith("_stderr"))

    def evaluate(self, lm: Loaded, cfg: Any, state: HarnessTasks) -> tuple[dict, list[dict]]:
        from pipeline import dist

        if dist.world_size() > 1:
            dist.print0(f"harness: documents dealt over {dist.world_size()} ranks" if state.split(cfg.num_fewshot) else
                        f"harness: every rank runs every request ({dist.world_size()} ranks in step: generative or few-shot tasks)")
        results = run_harness(lm.model, lm.tokenizer, state, num_fewshot=cfg.num_fewshot, chat=cfg.apply_chat_template,
                              limit=cfg.max_batches,
                              batch_size=cfg.batch_size)
        return flatten(results), []

"""Every user-facing error path, through the real entry points (``launch/*.py``): one
``error: ...`` line naming what is wrong and how to fix it, exit code 2, no traceback, and
nothing lost -- a result already in the output directory is untouched, no ``.partial`` left.

Most cases are refused by checks that run before any process group or model exists; they
run in this process (:func:`inproc.run_entry`: the real script under ``runpy``, a tripwire
in place of the heavy work), milliseconds each. The cases in :data:`LAUNCHED` run as fresh
interpreters, four at a time while the others run: those refused only once the process group
or the engine exists, and one case for each other entry point, for what only a real process
shows (nothing printed on import or at exit, not one traceback line). Evaluate refuses every
case before a weight is read (run_entry's tripwire on its ``load`` proves it). Faults that need a running job (a killed rank, a full disk, damaged shards) are in
``test_faults.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, TINY_MODEL, write_jsonl
from inproc import run_entry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_PARALLEL = 4  # launches at once: mostly import time, so a little more than the 2 cores pays


@dataclass(frozen=True)
class Case:
    script: str
    args: tuple[str, ...]
    phrases: tuple[str, ...]
    prior: str | None = None
    """What is already in {out} before the run: run (a training run with a checkpoint),
    dataset (a preprocessed dataset), file (a directory holding an earlier result file) or None."""


T = (*TINY_MODEL, "data.datasets.0.path={data}", "train.micro_batch_size=2", "train.max_steps=2", "checkpoint.every=0",
     "deepspeed.config=ds_configs/zero1.json", "output={out}")
P = ("output={out}", "overwrite=true", "tokenizer.path={data}/tokenizer", "workers=1")
F = ("model.path={hf}", "sft.seq_len=32", "train.micro_batch_size=2", "train.max_steps=1", "output={out}",
     "deepspeed.config=ds_configs/zero1.json")
E = ("model={hf}", "output={out}", "overwrite=true")

CASES: dict[str, Case] = {
    # -- config keys, types and files (every stage shares the parser; train stands for all)
    "unknown key": Case("train.py", (*T, "train.max_step=3"), ("train.max_step: unknown key; did you mean 'max_steps'?",), "run"),
    "wrong type": Case("train.py", (*T, "train.lr=fast"), ("train.lr: expected a number, got 'fast'",), "run"),
    "not a choice": Case("train.py", (*T, "data.verify=full"), ("data.verify: got 'full'; must be one of: none, fast, thorough",), "run"),
    "bad list index": Case("train.py", (*T, "data.datasets.3.path=x"), ("'3' is not a valid index into a list of 1",), "run"),
    "every problem at once": Case("train.py", (*T, "train.max_step=3", "train.lr=-1", "checkpoint.every=-2"),
                                  ("invalid config (3 problems)", "train.lr: must be > 0", "checkpoint.every: must be >= 0"), "run"),
    "override without =": Case("train.py", (*T, "train.max_steps"), ("an override must look like key=value",), "run"),
    "missing config file": Case("train.py", ("--config", "{files}/nothere.yaml"), ("cannot read config file", "Check the --config path")),
    "config file not YAML": Case("train.py", ("--config", "{files}/bad.yaml"), ("is not valid YAML",)),
    "a name from another tool": Case("train.py", (*T, "train.learning_rate=1e-4"), ("train.learning_rate: unknown key; did you mean 'lr'?",), "run"),
    "a DeepSpeed JSON as the recipe": Case("train.py", ("--config", "{root}/ds_configs/zero3.json"),
                                           ("is a DeepSpeed config", "pass it as deepspeed.config={root}/ds_configs/zero3.json")),
    "config file not a mapping": Case("train.py", ("--config", "{files}/list.yaml"), ("must hold a mapping of keys, not list",)),
    # -- batch arithmetic, positions, tokenizer, precision
    "batch arithmetic": Case("train.py", (*T, "train.global_batch_size=6", "train.micro_batch_size=4"),
                             ("train.global_batch_size=6 is not a multiple of micro_batch_size 4", "set global_batch_size=4 or 8"), "run"),
    "sequence beyond positions": Case("train.py", (*T, "model.path={hf}", "data.seq_len=128"),
                                      ("data.seq_len=128 is beyond the model's 64 positions", "lower data.seq_len"), "run"),
    "tokenizer differs from the data's": Case("train.py", (*T, "model.path={other_tok}"), ("differs from the one",), "run"),
    "bf16 without a GPU": Case("train.py", (*T, "deepspeed.precision=bf16"), ("deepspeed.precision=bf16 but no CUDA GPU is visible",), "run"),
    "missing DeepSpeed JSON": Case("train.py", (*T, "deepspeed.config=nothere.json"), ("DeepSpeed config 'nothere.json' not found",), "run"),
    # -- missing or foreign inputs
    "missing dataset": Case("train.py", (*T, "data.datasets.0.path={files}/nowhere"),
                            ("is not a preprocessed dataset (no manifest.json)", "run launch/preprocess.py first"), "run"),
    "missing model": Case("train.py", (*T, "model.path={files}/nowhere"), ("model.path '{files}/nowhere' does not exist",), "run"),
    "model dir without config.json": Case("train.py", (*T, "model.path={files}/empty"),
                                          ("model.path '{files}/empty' is neither a Hugging Face model directory (no config.json)",), "run"),
    "model dir without weights": Case("train.py", (*T, "model.path={noweights}"),
                                      ("model.path '{noweights}' has config.json but no weights",), "run"),
    "output is a file": Case("train.py", (*T, "output={out}/report.json"), ("output '{out}/report.json' is an existing file",), "file"),
    "gpt2 sequence beyond its positions": Case("train.py", (*T, "model.model_type=gpt2", "model.max_position_embeddings=16"),
                                               ("data.seq_len=32 is beyond the model's 16 positions",
                                                "raise model.max_position_embeddings to at least 32")),
    "llama sequence beyond its positions": Case("train.py", (*T, "model.max_position_embeddings=16"),
                                                ("data.seq_len=32 is beyond the model's 16 positions",)),
    # -- missing or foreign checkpoints
    "resume from a missing path": Case("train.py", (*T, "checkpoint.resume={files}/nowhere"),
                                       ("checkpoint.resume='{files}/nowhere' does not exist",), "run"),
    "resume from a non-checkpoint": Case("train.py", (*T, "checkpoint.resume={hf}"), ("is not a checkpoint of this pipeline (no meta.json)",), "run"),
    # Refused after the engine exists (the architecture is compared then): the run's config.yaml
    # and ds_config.json are written only after that check, so they stay as they were too.
    "resume a checkpoint of another model": Case("train.py", (*T, "model.num_layers=3"),
                                                 ("cannot resume from", "the model architecture differs"), "run"),
    "resume=never over checkpoints": Case("train.py", (*T, "checkpoint.resume=never"), ("already holds checkpoints",), "run"),
    # -- bad data lines and missing inputs (preprocess, finetune, evaluate)
    "malformed JSONL line": Case("preprocess.py", ("sources.0.path={files}/bad.jsonl", *P),
                                 ("{files}/bad.jsonl:2: malformed JSON", "set bad_records=skip"), "dataset"),
    "missing text field": Case("preprocess.py", ("sources.0.path={files}/nofield.jsonl", *P),
                               ("{files}/nofield.jsonl:1: no field 'text' (fields: body)", "text_field"), "dataset"),
    "malformed CSV row": Case("preprocess.py", ("sources.0.path={files}/bad.csv", *P), ("{files}/bad.csv", "set bad_records=skip"), "dataset"),
    "empty input file": Case("preprocess.py", ("sources.0.path={files}/empty.jsonl", *P), ("every input file is empty (0 bytes)",)),
    "missing input": Case("preprocess.py", ("sources.0.path={files}/none/*.jsonl", *P), ("no input matches",), "dataset"),
    "missing tokenizer": Case("preprocess.py", ("sources.0.path={files}/nofield.jsonl", *P[:2], "tokenizer.path={files}/nowhere", "workers=1"),
                              ("{files}/nowhere",), "dataset"),
    "preprocess output from another config": Case("preprocess.py", ("sources.0.path={files}/good.jsonl", "output={out}",
                                                                    "tokenizer.path={data}/tokenizer", "val_fraction=0.5"),
                                                  ("overwrite=true",), "dataset"),
    "finetune: missing model": Case("finetune.py", (*F, "model.path={files}/nowhere", "sft.train={files}/sft_ok.jsonl"),
                                    ("model.path '{files}/nowhere' does not exist",), "file"),
    "finetune: model without weights": Case("finetune.py", (*F, "model.path={noweights}", "sft.train={files}/sft_ok.jsonl"),
                                            ("model.path '{noweights}' has config.json but no weights",), "file"),
    "finetune: bad chat line": Case("finetune.py", (*F, "sft.train={files}/sft_bad.jsonl"),
                                    ("{files}/sft_bad.jsonl:2: 'prompt' is a number, not a string", "sft.bad_records=skip"), "file"),
    "finetune: sequence beyond positions": Case("finetune.py", (*F, "sft.train={files}/sft_ok.jsonl", "sft.seq_len=128"),
                                                ("the sequence length sft.seq_len=128 is beyond the model's 64 positions", "lower sft.seq_len"), "file"),
    "finetune: no training data": Case("finetune.py", (*F,), ("sft.train: is empty",), "file"),
    "finetune: record without label": Case("finetune.py", (*F, "task=classification", "classification.max_length=32",
                                                                            "classification.train={files}/cls.jsonl"),
                                           ("{files}/cls.jsonl:2: the record has no 'label'",), "file"),
    "evaluate: missing model": Case("evaluate.py", (*E, "model={files}/nowhere", "data={data}"), ("does not exist",), "file"),
    "evaluate: sequence beyond positions": Case("evaluate.py", (*E, "data={data}", "seq_len=65"),
                                                ("seq_len=65 is beyond the 64 positions of model",), "file"),
    "evaluate: tokenizer differs from the data's": Case("evaluate.py", (*E[1:], "model={other_tok}", "data={data}"),
                                                      ("encodes text differently from the one", "tokenizer.path=MODEL_DIR"), "file"),
    "evaluate: malformed JSONL line": Case("evaluate.py", (*E, "data={files}/bad.jsonl"), ("{files}/bad.jsonl:2 is not valid JSON",), "file"),
    "evaluate: missing text field": Case("evaluate.py", (*E, "data={files}/nofield.jsonl"),
                                         ("{files}/nofield.jsonl:1 has no 'text' field (fields found: body)",), "file"),
    "export: missing checkpoint": Case("export.py", ("--checkpoint", "{files}/nowhere", "--output", "{out}", "--overwrite"),
                                       ("checkpoint '{files}/nowhere' does not exist",), "file"),
    "export: not a checkpoint": Case("export.py", ("--checkpoint", "{hf}", "--output", "{out}", "--overwrite"),
                                     ("is a Hugging Face model directory, which needs no export",), "file"),
    "plan: no nodes": Case("plan.py", ("--nodes", "0"), ("--nodes must be at least 1, got 0",)),
    "export: bad shard size": Case("export.py", ("--checkpoint", "{run}", "--output", "{out}", "--overwrite", "--max-shard-size", "lots"),
                                   ("is not a size",), "file"),
}


# Run as fresh interpreters: the refusals that come once the process group or the model exists
# (they cannot run in this process), and one case for each other entry point.
LAUNCHED = {
    "resume a checkpoint of another model",  # train: compared once the engine exists
    "finetune: bad chat line",  # finetune (its records are read before the process group)
    "evaluate: tokenizer differs from the data's",  # evaluate: its tokenizer and the shards' read, no weight
    "malformed JSONL line",  # preprocess
    "export: not a checkpoint",
    "plan: no nodes",
}


def _files(d: Path, docs: list[str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "bad.jsonl").write_text('{"text": "a fine first line"}\n{"text": "cut off\n')
    (d / "nofield.jsonl").write_text('{"body": "text under another key"}\n')
    (d / "bad.csv").write_text('text,label\n"one",a\n"two",b,extra,fields\n"three",c\n')
    write_jsonl(d / "good.jsonl", [{"text": t} for t in docs])
    write_jsonl(d / "sft_ok.jsonl", [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)])
    (d / "sft_bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    (d / "cls.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "no label here"}\n')
    (d / "bad.yaml").write_text("train: [1,\n")
    (d / "list.yaml").write_text("- 1\n")
    (d / "empty").mkdir(exist_ok=True)
    (d / "empty.jsonl").write_text("")


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def catalogue(request, tmp_path_factory, tiny_dataset: Path, tiny_hf_model: Path, tiny_tokenizer: Path):
    """Prepare every selected case and start the launched ones; yields
    ``{case: (Future or None, args, out, before, subs)}`` and the working directory under ``""``."""
    from conftest import make_docs

    base = tmp_path_factory.mktemp("catalogue")
    files = base / "files"
    _files(files, make_docs(40))
    other_tok = base / "other_tok"  # the tiny model with another tokenizer beside it
    shutil.copytree(tiny_hf_model, other_tok)
    for f in tiny_tokenizer.iterdir():
        shutil.copy2(f, other_tok / f.name)
    noweights = base / "noweights"  # config and tokenizer without the weights
    shutil.copytree(tiny_hf_model, noweights, ignore=shutil.ignore_patterns("*.safetensors"))
    run = base / "run"  # a finished one-step run: the prior result of the train/finetune cases
    r = _run("train.py", [a.format(data=tiny_dataset, out=run) for a in T if "max_steps" not in a] + ["train.max_steps=1"], base)
    assert r.returncode == 0, r.stderr[-3000:]
    report = base / "report"
    report.mkdir()
    (report / "report.json").write_text('{"models": []}\n')

    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_user_error" and hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(_PARALLEL)
    started = {}
    for name in sorted(selected):
        case = CASES[name]
        out = base / "out" / name.replace(" ", "_").replace(":", "")
        out.parent.mkdir(exist_ok=True)
        if case.prior == "run":
            shutil.copytree(run, out)
        elif case.prior == "dataset":
            shutil.copytree(tiny_dataset, out)
        elif case.prior == "file":
            shutil.copytree(report, out)
        subs = {"data": tiny_dataset, "hf": tiny_hf_model, "other_tok": other_tok, "run": run, "out": out, "files": files,
                "noweights": noweights, "root": ROOT}
        args = [a.format(**subs) for a in case.args]
        before = _tree(out)
        started[name] = (pool.submit(_run, case.script, args, base) if name in LAUNCHED else None, args, out, before, subs)
    started[""] = base
    yield started
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error(catalogue, name: str, monkeypatch, capfd):
    case = CASES[name]
    future, args, out, before, subs = catalogue[name]
    if future is not None:
        r = future.result()
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        code, stdout, stderr = run_entry(case.script, args, monkeypatch, capfd, cwd=catalogue[""])
    assert code == 2, f"exit {code}\n{stdout[-1500:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    # ours: "error: ..."; argparse's usage errors: "launch/X.py: error: ..."
    errors = [line for line in stderr.splitlines() if re.match(r"(launch/\w+\.py: )?error: ", line)]
    assert len(errors) == 1, stderr[-3000:]  # one message (it may go on over the following lines)
    for phrase in case.phrases:
        assert phrase.format(**subs) in stderr, f"{phrase!r} not in:\n{stderr[-3000:]}"
    after = _tree(out)
    lost = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not lost, f"the failed run changed or removed {lost}"
    if case.prior is None:
        assert not out.exists(), "a run refused at its config check must not write anything"
    partial = out.with_name(out.name + ".partial")
    assert not partial.exists(), f"a run refused before it started left {partial}"

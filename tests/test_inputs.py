"""One check per shared input kind, and every entry point that takes that kind gives the same
answer: a model directory (train, finetune, evaluate, plan, export), an output directory
(preprocess, train, finetune, evaluate, export) and a data path (finetune, evaluate, train,
preprocess).

The table runs each case through the real ``launch/*.py`` script *in this process*
(:func:`inproc.run_entry`), so a case costs milliseconds once the libraries are imported; a
case that gets past its input check hits a tripwire instead of training. A few cases run
through the real launchers in ``test_error_catalogue.py`` and below.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TINY_MODEL, run_deepspeed, run_script, write_jsonl
from inproc import HeavyWork, run_entry

from pipeline.errors import UserError
from pipeline.inputs import check_data_file, check_model, check_output, check_positions, max_positions


# ---------------------------------------------------------------------------- the checks alone


def test_model_kinds(tmp_path: Path, tiny_hf_model: Path):
    src = check_model(tiny_hf_model, "model.path")
    assert (src.kind, src.config_dir, src.tokenizer_dir) == ("hf", tiny_hf_model, tiny_hf_model)
    assert src.config["model_type"] == "llama"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf_model, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError, match="has config.json but no weights"):
        check_model(bare, "model.path")
    assert check_model(bare, "model.path", weights=False).kind == "hf"  # the planner reads config.json only
    with pytest.raises(UserError, match="which needs no export"):
        check_model(tiny_hf_model, "--checkpoint", hf=False)


def test_positions(tiny_hf_model: Path):
    conf = json.loads((tiny_hf_model / "config.json").read_text())
    assert max_positions(conf) == 64
    assert max_positions({"n_positions": 32}) == 32 and max_positions({}) is None
    check_positions(conf, 64, what="x", fix="y")
    with pytest.raises(UserError, match="x=65 is beyond the model's 64 positions; y"):
        check_positions(conf, 65, what="x", fix="y")


def test_output_checks(tmp_path: Path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(UserError, match="is an existing file, not a directory"):
        check_output(tmp_path / "f")
    with pytest.raises(UserError, match="which is a file"):
        check_output(tmp_path / "f" / "sub")
    with pytest.raises(UserError, match="holds model.path"):
        check_output(tmp_path, inputs=[("model.path", str(tmp_path / "model"))])
    with pytest.raises(UserError, match="is model.path"):
        check_output(tmp_path / "m", inputs=[("model.path", str(tmp_path / "m"))])
    assert check_output(tmp_path / "m" / "eval", inputs=[("model.path", str(tmp_path / "m"))]) == tmp_path / "m" / "eval"
    assert (tmp_path / "f").read_text() == "keep"


def test_data_specs_take_files_globs_directories_and_lists(tmp_path: Path):
    from pipeline.inputs import data_files

    a, b = write_jsonl(tmp_path / "d" / "a.jsonl", [{"x": 1}]), write_jsonl(tmp_path / "d" / "sub" / "b.jsonl", [{"x": 2}])
    write_jsonl(tmp_path / "d" / ".hidden" / "c.jsonl", [{"x": 3}])
    assert data_files(str(tmp_path / "d"), "k", "w") == [a, b]  # a directory: its *.jsonl, hidden ones skipped
    assert data_files(f"{tmp_path}/d/*.jsonl,{b}", "k", "w") == [a, b]
    assert data_files(f"{a},{a}", "k", "w") == [a]  # each file once
    for spec, phrase in ((f"{tmp_path}/d/*.csv", "k: no file matches"), (str(tmp_path / "none.jsonl"), "does not exist"),
                         (str(tmp_path), "is a directory without *.jsonl"), (" , ", "k is empty")):
        (tmp_path / "e").mkdir(exist_ok=True)
        with pytest.raises(UserError, match=re.escape(phrase)):
            data_files(spec if "without" not in phrase else str(tmp_path / "e"), "k", "w")


def test_data_file_checks(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    for path, phrase in ((tmp_path / "no.jsonl", "does not exist"), (tmp_path, "is a directory"),
                         (tmp_path / "empty.jsonl", "is empty")):
        with pytest.raises(UserError, match=phrase):
            check_data_file(path, "sft.train", "a JSONL file")


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Entry:
    script: str
    args: tuple[str, ...]
    key: str  # the setting the input goes in, as the message names it
    arg: str  # how the input is passed: "{key}={path}" or "--flag {path}"


T = (*TINY_MODEL, "data.datasets.0.path={data}", "train.micro_batch_size=2", "train.max_steps=1", "checkpoint.every=0",
     "deepspeed.config=ds_configs/zero1.json", "output={out}")
F = ("model.path={hf}", "sft.seq_len=32", "train.micro_batch_size=2", "train.max_steps=1", "output={out}",
     "sft.train={files}/sft_ok.jsonl", "deepspeed.config=ds_configs/zero1.json")
E = ("model={hf}", "data={data}", "output={out}", "overwrite=true")

MODEL_ENTRIES = {
    "train": Entry("train.py", T, "model.path", "model.path={path}"),
    "finetune": Entry("finetune.py", F, "model.path", "model.path={path}"),
    "finetune --inspect": Entry("finetune.py", (*F, "--inspect", "2"), "model.path", "model.path={path}"),
    "evaluate": Entry("evaluate.py", E, "model", "model={path}"),
    "evaluate compare_to": Entry("evaluate.py", E, "compare_to", "compare_to={path}"),
    "plan train": Entry("plan.py", ("data.datasets.0.path={data}", "data.seq_len=32"), "model.path", "model.path={path}"),
    "export": Entry("export.py", ("--output", "{out}"), "--checkpoint", "--checkpoint {path}"),
    "plan finetune": Entry("plan.py", ("sft.seq_len=32", "sft.train={files}/sft_ok.jsonl", "--stage", "finetune"),
                           "model.path", "model.path={path}"),
}
# What each bad model directory must be called, by every entry point ({key} and {path} filled in).
MODEL_CASES = {
    "missing": ("{key} '{path}' does not exist",),
    "a file": ("{key} '{path}' is a file",),
    "empty directory": ("{key} '{path}' is neither a Hugging Face model directory (no config.json) nor a checkpoint",),
    "config.json not JSON": ("{key} '{path}': cannot read {path}/config.json",),
    "config.json without model_type": ("has no model_type",),
    "no weights": ("{key} '{path}' has config.json but no weights",),
    "a shard missing": ("{key} '{path}' lacks weight shard(s) model-00002-of-00002.safetensors",),
    "run without a complete checkpoint": ("{key}: '{path}' is a run directory without a complete checkpoint",),
    "unfinished checkpoint": ("{key}: '{path}' is a checkpoint whose save did not finish",),
}
# The planner reads config.json only: a directory without weights is planned, not refused.
_WEIGHTLESS_OK = {"plan train", "plan finetune"}
# Export takes checkpoints only: whatever holds config.json is a Hugging Face directory to it.
_HF_CASES = ("config.json not JSON", "config.json without model_type", "no weights", "a shard missing")
_CASE_DIRS = {"unfinished checkpoint": "step-00000002.tmp"}  # a directory named as the save writes it


def _phrases(entry: str, case: str) -> tuple[str, ...]:
    if entry == "export" and case in _HF_CASES:
        return ("{key} '{path}' is a Hugging Face model directory, which needs no export",)
    return MODEL_CASES[case]

OUTPUT_ENTRIES = {
    "preprocess": Entry("preprocess.py", ("sources.0.path={files}/good.jsonl", "tokenizer.path={data}/tokenizer", "workers=1"),
                        "output", "output={path}"),
    "train": Entry("train.py", T, "output", "output={path}"),
    "finetune": Entry("finetune.py", F, "output", "output={path}"),
    "evaluate": Entry("evaluate.py", E, "output", "output={path}"),
    "export": Entry("export.py", ("--checkpoint", "{run}"), "--output", "--output {path}"),
}
OUTPUT_CASES = {
    "an existing file": ("{key} '{path}' is an existing file, not a directory",),
    "under a file": ("{key} '{path}' lies under", "which is a file"),
}

DATA_ENTRIES = {
    "finetune sft.train": Entry("finetune.py", F, "sft.train", "sft.train={path}"),
    "finetune sft.val": Entry("finetune.py", F, "sft.val", "sft.val={path}"),
    "finetune classification.train": Entry("finetune.py", (*F, "task=classification"), "classification.train",
                                           "classification.train={path}"),
    "evaluate generation data": Entry("evaluate.py", (*E, "task=generation"), "data", "data={path}"),
    "evaluate classification data": Entry("evaluate.py", (*E, "task=classification"), "data", "data={path}"),
}
DATA_CASES = {
    "missing": ("{key} '{path}' does not exist",),
    "a directory": ("{key} '{path}' is a directory",),
    "empty": ("{key} '{path}' is empty",),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dataset: Path, tiny_hf_model: Path) -> dict[str, Path]:
    """Every bad input, made once; plus the good inputs the entry points need beside them."""
    from conftest import make_docs

    base = tmp_path_factory.mktemp("inputs")
    files = base / "files"
    write_jsonl(files / "good.jsonl", [{"text": t} for t in make_docs(20)])
    write_jsonl(files / "sft_ok.jsonl", [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)])
    models = base / "models"
    models.mkdir()
    (models / "a file").write_text("not a model\n")
    (models / "empty directory").mkdir()
    for name, text in (("config.json not JSON", '{"model_type": "llama",'),
                       ("config.json without model_type", '{"hidden_size": 8}')):
        shutil.copytree(tiny_hf_model, models / name, ignore=shutil.ignore_patterns("config.json"))
        (models / name / "config.json").write_text(text)
    shutil.copytree(tiny_hf_model, models / "no weights", ignore=shutil.ignore_patterns("*.safetensors"))
    sharded = models / "a shard missing"
    shutil.copytree(tiny_hf_model, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy2(tiny_hf_model / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (models / "run without a complete checkpoint" / "checkpoints").mkdir(parents=True)
    unfinished = models / _CASE_DIRS["unfinished checkpoint"]
    unfinished.mkdir()
    (unfinished / "meta.json").write_text('{"step": 2}\n')
    data = base / "data"
    data.mkdir()
    (data / "a directory").mkdir()
    (data / "empty").write_text("")
    (base / "out").mkdir()
    (base / "out" / "a file").write_text("an earlier result\n")
    return {"base": base, "files": files, "models": models, "bad_data": data}


def _table(entries: dict[str, Entry], cases: dict[str, tuple[str, ...]], skip: set[tuple[str, str]] = frozenset()):
    return [pytest.param(e, c, id=f"{e}: {c}") for e in entries for c in cases if (e, c) not in skip]


def _check(code: int, err: str, phrases: tuple[str, ...], subs: dict) -> None:
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err[-3000:]
    for phrase in phrases:
        assert phrase.format(**subs) in err, f"{phrase.format(**subs)!r} not in:\n{err[-3000:]}"


def _args(entry: Entry, path: Path, subs: dict) -> list[str]:
    given = [a.format(**subs) for a in entry.args if not a.startswith(entry.arg.split("{")[0])]
    return [*entry.arg.format(path=path).split(" ", 1 if entry.arg.startswith("--") else 0), *given]


@pytest.mark.parametrize("entry, case", _table(MODEL_ENTRIES, MODEL_CASES,
                                                {(e, c) for e in _WEIGHTLESS_OK for c in ("no weights", "a shard missing")}))
def test_model_directory(entry, case, inputs, tiny_dataset, tiny_hf_model, tmp_path, monkeypatch, capsys):
    e = MODEL_ENTRIES[entry]
    path = inputs["models"] / _CASE_DIRS.get(case, case)
    subs = {"data": tiny_dataset, "hf": tiny_hf_model, "out": tmp_path / "out", "files": inputs["files"]}
    code, _, err = run_entry(e.script, _args(e, path, subs), monkeypatch, capsys)
    _check(code, err, _phrases(entry, case), {"key": e.key, "path": path})
    assert not (tmp_path / "out").exists(), "a refused run must not write its output"


@pytest.mark.parametrize("entry", sorted(_WEIGHTLESS_OK))
def test_planner_plans_a_model_without_weights(entry, inputs, tiny_dataset, tiny_hf_model, monkeypatch, capsys):
    e = MODEL_ENTRIES[entry]
    subs = {"data": tiny_dataset, "hf": tiny_hf_model, "out": "unused", "files": inputs["files"]}
    code, _, err = run_entry(e.script, _args(e, inputs["models"] / "no weights", subs), monkeypatch, capsys)
    assert code in (0, 1) and "error:" not in err, err[-3000:]  # 0: something fits, 1: nothing does


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset: Path) -> Path:
    """A one-step training run with a checkpoint (export's input)."""
    run = tmp_path_factory.mktemp("run") / "run"
    r = run_script("train.py", *[a.format(data=tiny_dataset, out=run) for a in T], "checkpoint.every=1", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory) -> Path:
    """A step directory laid out as a complete ZeRO-0 checkpoint (its files empty): enough for the
    path checks, which run before any weight is read (the tripwire stops a consolidation)."""
    step = tmp_path_factory.mktemp("ckpt") / "step-00000001"
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "config.json").write_text('{"model_type": "llama"}\n')
    (step / "meta.json").write_text('{"step": 1, "zero_stage": 0, "world_size": 1}\n')
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    return step


@pytest.mark.parametrize("entry, case", _table(OUTPUT_ENTRIES, OUTPUT_CASES))
def test_output_directory(entry, case, inputs, tiny_dataset, tiny_hf_model, step_dir, monkeypatch, capsys):
    e = OUTPUT_ENTRIES[entry]
    path = inputs["base"] / "out" / "a file" if case == "an existing file" else inputs["base"] / "out" / "a file" / "sub"
    subs = {"data": tiny_dataset, "hf": tiny_hf_model, "out": "unused", "files": inputs["files"], "run": step_dir}
    code, _, err = run_entry(e.script, _args(e, path, subs), monkeypatch, capsys)
    _check(code, err, OUTPUT_CASES[case], {"key": e.key, "path": path})
    assert (inputs["base"] / "out" / "a file").read_text() == "an earlier result\n"


@pytest.mark.parametrize("entry, key", [("train", "model.path"), ("finetune", "model.path"), ("evaluate", "model")])
def test_output_that_is_the_input(entry, key, tiny_dataset, tiny_hf_model, tmp_path, monkeypatch, capsys):
    """``output=`` naming the model directory (with overwrite, evaluate would replace it)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_hf_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    e = MODEL_ENTRIES[entry]
    subs = {"data": tiny_dataset, "hf": model, "out": model, "files": tmp_path}
    write_jsonl(tmp_path / "sft_ok.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(20)])
    args = [a.format(**subs) for a in e.args if not a.startswith("model")] + [e.arg.format(path=model)]
    code, _, err = run_entry(e.script, args, monkeypatch, capsys)
    _check(code, err, (f"output '{model}' is {key} '{model}': the run would write over its own input",), {})
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("entry, case", _table(DATA_ENTRIES, DATA_CASES))
def test_data_path(entry, case, inputs, tiny_dataset, tiny_hf_model, tmp_path, monkeypatch, capsys):
    e = DATA_ENTRIES[entry]
    path = inputs["bad_data"] / case
    subs = {"data": tiny_dataset, "hf": tiny_hf_model, "out": tmp_path / "out", "files": inputs["files"]}
    code, _, err = run_entry(e.script, _args(e, path, subs), monkeypatch, capsys)
    _check(code, err, DATA_CASES[case], {"key": e.key, "path": path})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, phrase", [("missing", "is not a preprocessed dataset (no manifest.json)"),
                                          ("a directory", "is not a preprocessed dataset (no manifest.json)")])
def test_train_dataset_path(path, phrase, inputs, tiny_dataset, tmp_path, monkeypatch, capsys):
    args = [a.format(data=inputs["bad_data"] / path, out=tmp_path / "out") for a in T]
    code, _, err = run_entry("train.py", args, monkeypatch, capsys)
    _check(code, err, (phrase, "run launch/preprocess.py first"), {})


# ---------------------------------------------------------------------------- sequence length vs positions


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2", "mistral"])
def test_new_model_sequence_beyond_its_positions(model_type, tiny_dataset, tmp_path, monkeypatch, capsys):
    """A new model whose model.max_position_embeddings is below data.seq_len is refused (GPT-2
    used to crash, Llama trained silently past its positions), for every documented type."""
    args = [a.format(data=tiny_dataset, out=tmp_path / "out") for a in T]
    args += [f"model.model_type={model_type}", "data.seq_len=48", "model.max_position_embeddings=32"]
    code, _, err = run_entry("train.py", args, monkeypatch, capsys)
    _check(code, err, ("data.seq_len=48 is beyond the model's 32 positions",
                       "raise model.max_position_embeddings to at least 48"), {})


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_new_model_positions_default_to_seq_len(model_type, tiny_dataset, tmp_path, monkeypatch, capsys):
    """The default (0) takes data.seq_len: the run gets past every input check (to the tripwire)."""
    args = [a.format(data=tiny_dataset, out=tmp_path / "out") for a in T] + [f"model.model_type={model_type}", "data.seq_len=48"]
    with pytest.raises(HeavyWork):
        run_entry("train.py", args, monkeypatch, capsys)


# ---------------------------------------------------------------------------- through the real launcher


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "finetune.py"])
def test_model_without_weights_two_ranks(script, inputs, tiny_dataset, tmp_path):
    """The case found from outside: two ranks under the deepspeed launcher each printed a
    transformers traceback and exited 1. Now: exit 2, the message, no traceback."""
    bare = inputs["models"] / "no weights"
    base = T if script == "train.py" else F
    subs = {"data": tiny_dataset, "hf": bare, "out": tmp_path / "out", "files": inputs["files"]}
    args = [a.format(**subs) for a in base] + ([f"model.path={bare}"] if script == "train.py" else [])
    r = run_deepspeed(script, *args, ranks=2)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"model.path '{bare}' has config.json but no weights" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_continue_training_from_a_pipeline_checkpoint(finished_run, tiny_dataset, tmp_path):
    """model.path takes a checkpoint of this pipeline in train as in finetune and evaluate: rank 0
    exports it (verified) into <output>/init_model and training starts from those weights."""
    out = tmp_path / "continued"
    args = [a.format(data=tiny_dataset, out=out) for a in T if not a.startswith("model.")]
    r = run_script("train.py", *args, f"model.path={finished_run}", "checkpoint.every=1", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    made = json.loads((out / "init_model" / "export_meta.json").read_text())
    assert made["source_checkpoint"] == str((finished_run / "checkpoints" / "step-00000001").resolve())
    assert made["max_abs_logit_diff"] <= made["tolerance"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    # Both runs see the same first batch and seed: equal first losses would mean a fresh
    # initialisation, not the checkpoint's weights (one step at warmup lr changed them).
    fresh_loss = json.loads((finished_run / "losses.json").read_text())["losses"][0]
    cont_loss = json.loads((out / "losses.json").read_text())["losses"][0]
    assert cont_loss != fresh_loss

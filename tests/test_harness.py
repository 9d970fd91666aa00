"""evaluate task=harness: lm-evaluation-harness tasks on the stage's models (pipeline/eval/tasks/harness.py).

The numbers are the harness's own: on a local task directory (a multiple-choice task and a
loglikelihood task whose perplexity is a continuous number) the stage equals
the harness's own evaluation with its ``hf`` model (what ``lm_eval --model hf`` runs; called in
this process) on the same model directory to 1e-6, for a Hugging Face directory, and for a ZeRO-3
pipeline checkpoint both in one process and partitioned over 2 ranks (against its export). Bad
input exits 2 with one message before any model is loaded.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import run_ranks, run_script, tb_scalars, write_jsonl, z3_run_args
from inproc import run_entry

pytest.importorskip("lm_eval", reason="the eval extra (pip install -e '.[eval]'); the test extra installs it")

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two harness tasks in the harness's YAML format, their data beside them (relative data_files)."""
    import random

    d = tmp_path_factory.mktemp("harness") / "tasks"
    (d / "data").mkdir(parents=True)
    rng = random.Random(0)
    mc, ll = [], []
    for _ in range(24):
        w = rng.choice(WORDS)
        opts = [w, rng.choice([x for x in WORDS if x != w])]
        rng.shuffle(opts)
        mc.append({"passage": f"the {w} is here .", "question": "what is here ?", "choices": opts, "answer": opts.index(w)})
        ll.append({"context": f"the {w} and the", "target": f" {rng.choice(WORDS)}"})
    write_jsonl(d / "data" / "mc.jsonl", mc)
    write_jsonl(d / "data" / "ll.jsonl", ll)
    (d / "sample_mc.yaml").write_text("""task: sample_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{passage}} {{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""")
    (d / "sample_ll.yaml").write_text("""task: sample_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/ll.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""")
    return d


def _lm_eval(model: Path, tasks: Path, limit: int = 0, names: tuple[str, ...] = ("sample_mc", "sample_ll"), **kwargs) -> dict:
    """lm-evaluation-harness's own evaluation of ``model`` with its ``hf`` model (fp32, CPU, batch 4),
    as ``lm_eval --model hf --include_path TASKS --batch_size 4 --device cpu`` runs it, from the task
    directory as the stage reads it; returns simple_evaluate's dict. Called in this process rather
    than through the CLI: the CLI's interpreter and its index of the harness's ~10k built-in task
    files cost 10-20 s a call, and only the local tasks are read. ``kwargs``: ``apply_chat_template``
    (with few-shot examples as multi-turn, the CLI's default then), ``num_fewshot``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tasks)
        return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=list(names), batch_size=4,
                                       device="cpu", limit=limit or None,
                                       fewshot_as_multiturn=bool(kwargs.get("apply_chat_template")),
                                       task_manager=TaskManager(include_path=str(tasks), include_defaults=False), **kwargs)


def _harness_metrics(model: Path, tasks: Path, limit: int = 0, **kwargs) -> dict[str, float]:
    """The flattened metrics of :func:`_lm_eval` (what the stage's report holds)."""
    from pipeline.eval.tasks.harness import flatten

    return flatten(_lm_eval(model, tasks, limit, **kwargs)["results"])


def _stage(args: list[str]) -> dict:
    """The evaluate stage in this process (no process group without zero3); its report.json."""
    from pipeline.stages.evaluate import main

    assert main(["task=harness", "batch_size=4", *args]) == 0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output="))
    return json.loads((Path(out) / "report.json").read_text())


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k, v in a.items():
        assert abs(v - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, v, b[k])


@pytest.mark.slow
@pytest.mark.integration
def test_the_stage_equals_lm_eval_on_a_hugging_face_directory_and_compares_two_models(
        task_dir: Path, tiny_hf_model: Path, tmp_path: Path, capfd):
    import torch
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"  # a second model: the same one with perturbed weights
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    for f in tiny_hf_model.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())

    report = _stage([f"model={tiny_hf_model}", f"compare_to={other}", f"data={task_dir}", f"output={tmp_path / 'eval'}"])
    said = capfd.readouterr()
    assert "not a git repository" not in said.out + said.err  # the harness's git call in a task directory, silenced
    cli = _harness_metrics(tiny_hf_model, task_dir)
    first, second = (m["metrics"] for m in report["models"])
    _same(first, cli)
    assert {"sample_mc/acc", "sample_mc/acc_stderr", "sample_ll/perplexity", "sample_ll/acc"} <= first.keys()
    assert sorted(report["headline"]) == sorted(k for k in first if not k.endswith("_stderr"))
    assert report["difference"]["sample_ll/perplexity"] == pytest.approx(first["sample_ll/perplexity"] - second["sample_ll/perplexity"])
    assert first["sample_ll/perplexity"] != second["sample_ll/perplexity"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert f"| sample_mc/acc | {first['sample_mc/acc']:.4f} ± {first['sample_mc/acc_stderr']:.4f} |" in md
    tb = list((tmp_path / "eval" / "tensorboard").iterdir())
    assert sorted(p.name for p in tb) == sorted(m["name"] for m in report["models"])


@pytest.mark.slow
@pytest.mark.integration
def test_with_the_chat_template_the_stage_equals_lm_eval_and_a_model_without_one_gets_the_builtin(
        task_dir: Path, tiny_hf_model: Path, tmp_path: Path):
    """apply_chat_template=true is lm_eval's --apply_chat_template; a tokenizer without a template is scored
    in the pipeline's builtin one (what fine-tuning saves), so base and chat fine-tune compare in one format."""
    import shutil

    from transformers import AutoTokenizer

    from pipeline.data.chat import BUILTIN_TEMPLATE

    chat = tmp_path / "chat"
    shutil.copytree(tiny_hf_model, chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = BUILTIN_TEMPLATE
    tok.save_pretrained(chat)
    templated = _stage([f"model={chat}", f"data={task_dir}", f"output={tmp_path / 'a'}", "max_batches=8",
                        "apply_chat_template=true"])["models"][0]["metrics"]
    _same(templated, _harness_metrics(chat, task_dir, 8, apply_chat_template=True))
    fallback = _stage([f"model={tiny_hf_model}", f"data={task_dir}", f"output={tmp_path / 'b'}", "max_batches=8",
                       "apply_chat_template=true"])["models"][0]["metrics"]
    _same(fallback, templated)
    plain = _stage([f"model={chat}", f"data={task_dir}", f"output={tmp_path / 'c'}", "max_batches=8"])["models"][0]["metrics"]
    assert plain["sample_ll/perplexity"] != templated["sample_ll/perplexity"]  # the template changed the requests


@pytest.mark.slow
@pytest.mark.integration
def test_a_zero3_pipeline_checkpoint_equals_lm_eval_on_its_export_in_one_process_and_on_two_ranks(
        task_dir: Path, z3_run: Path, tmp_path: Path):
    from pipeline.stages.export import main as export

    ckpt = z3_run / "checkpoints"
    assert export(["--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")]) == 0
    cli = _harness_metrics(tmp_path / "hf", task_dir, limit=12)
    one = _stage([f"model={ckpt}", f"data={task_dir}", f"output={tmp_path / 'one'}", "max_batches=12"])
    _same(one["models"][0]["metrics"], cli)
    r = run_ranks("evaluate.py", "task=harness", "batch_size=4", "zero3=true", f"model={ckpt}", f"data={task_dir}",
                      f"output={tmp_path / 'two'}", "max_batches=12")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "harness: documents dealt over 2 ranks" in r.stdout + r.stderr
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["world_size"] == 2
    _same(two["models"][0]["metrics"], cli)


@pytest.mark.slow
@pytest.mark.integration
def test_few_shot_equals_lm_eval_in_one_process_and_on_two_ranks(task_dir: Path, tiny_hf_model: Path, tmp_path: Path):
    """num_fewshot=2: the harness draws each document's examples from one stream in document order, so the ranks
    of a ZeRO-3 launch run every request (dealt, a rank would draw other examples) and equal one process."""
    cli = _harness_metrics(tiny_hf_model, task_dir, 10, num_fewshot=2)
    one = _stage([f"model={tiny_hf_model}", f"data={task_dir}", f"output={tmp_path / 'one'}", "max_batches=10",
                  "num_fewshot=2"])["models"][0]["metrics"]
    _same(one, cli)
    assert one != _stage([f"model={tiny_hf_model}", f"data={task_dir}", f"output={tmp_path / 'zero'}",
                          "max_batches=10"])["models"][0]["metrics"]  # the shots change the requests
    r = run_ranks("evaluate.py", "task=harness", "batch_size=4", "zero3=true", f"model={tiny_hf_model}",
                      f"data={task_dir}", f"output={tmp_path / 'two'}", "max_batches=10", "num_fewshot=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "harness: every rank runs every request" in r.stdout + r.stderr
    _same(json.loads((tmp_path / "two" / "report.json").read_text())["models"][0]["metrics"], cli)


@pytest.mark.slow
@pytest.mark.integration
def test_a_generative_task_equals_lm_eval_and_runs_in_step_on_two_ranks(tiny_hf_model: Path, tmp_path: Path):
    """generate_until (greedy, stop at a newline): the harness's own generations become the targets, so the stage
    scores 1.0 only if it generates exactly what the CLI did, in one process and on 2 ZeRO-3 ranks (where every
    rank generates every request: the partitioned passes line up)."""
    d = tmp_path / "gen"
    task = """task: sample_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: "{{a}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 6, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""
    write_jsonl(d / "gen.jsonl", [{"q": f"the {w} is", "a": w} for w in WORDS])
    (d / "gen.yaml").write_text(task)
    samples = _lm_eval(tiny_hf_model, d, names=("sample_gen",), log_samples=True)["samples"]["sample_gen"]
    made = {s["doc"]["q"]: s["filtered_resps"][0] for s in samples}
    assert len(made) == len(WORDS) and len(set(made.values())) > 1  # the random model says different things
    theirs = tmp_path / "theirs"  # the same task, the harness's generations as targets
    write_jsonl(theirs / "gen.jsonl", [{"q": q, "a": a} for q, a in made.items()])
    (theirs / "gen.yaml").write_text(task)
    one = _stage([f"model={tiny_hf_model}", f"data={theirs}", f"output={tmp_path / 'one'}"])["models"][0]["metrics"]
    assert one["sample_gen/exact_match"] == 1.0
    r = run_ranks("evaluate.py", "task=harness", "batch_size=4", "zero3=true", f"model={tiny_hf_model}",
                      f"data={theirs}", f"output={tmp_path / 'two'}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "harness: every rank runs every request" in r.stdout + r.stderr
    assert json.loads((tmp_path / "two" / "report.json").read_text())["models"][0]["metrics"]["sample_gen/exact_match"] == 1.0


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    return {tag: dict(points) for tag, points in tb_scalars(log_dir).items()}


@pytest.mark.slow
@pytest.mark.integration
def test_in_loop_harness_on_the_live_engine_equals_the_stage_on_the_checkpoint_of_that_step(
        task_dir: Path, tiny_dataset: Path, tmp_path: Path):
    """ZeRO-3 + offload on 2 ranks, harness.every=2: the scores logged at step 2 (TensorBoard, float32) are
    evaluate's task=harness on the step-2 checkpoint; the console says them with their cost."""
    out = tmp_path / "run"
    r = run_ranks("train.py", *z3_run_args(out, tiny_dataset), f"harness.tasks={task_dir}", "harness.every=2",
                      "harness.max_batches=8", "harness.batch_size=4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "eval step 2 | harness/sample_ll/perplexity" in r.stdout + r.stderr
    assert "harness/seconds" in r.stdout + r.stderr
    logged = _scalars(out / "tensorboard")
    assert set(logged["harness/sample_mc/acc"]) == {2, 4}  # every 2 steps and after the last
    report = _stage([f"model={out / 'checkpoints' / 'step-00000002'}", f"data={task_dir}", "max_batches=8",
                     f"output={tmp_path / 'eval'}"])
    metrics = report["models"][0]["metrics"]
    assert {"sample_mc/acc", "sample_ll/perplexity"} <= metrics.keys()
    for k, v in metrics.items():
        assert logged[f"harness/{k}"][2] == pytest.approx(v, rel=1e-6), k
    assert logged["harness/sample_ll/perplexity"][4] != logged["harness/sample_ll/perplexity"][2]  # it trained between


@pytest.mark.slow
@pytest.mark.integration
def test_in_loop_harness_during_sft_equals_the_stage_on_the_final_checkpoint(task_dir: Path, tiny_hf_model: Path,
                                                                               tmp_path: Path):
    """Fine-tuning (one rank): the harness after the last step scores what evaluate scores on the last checkpoint
    (the tokenizer the run saves, with its chat template)."""
    from pipeline.data.sample import generate_qa

    data = write_jsonl(tmp_path / "qa.jsonl", list(generate_qa(120)))
    out = tmp_path / "ft"
    r = run_script("finetune.py", f"output={out}", f"model.path={tiny_hf_model}", "task=sft", f"sft.train={data}",
                   "sft.seq_len=64", "train.micro_batch_size=4", "train.max_steps=3", "train.eval_every=0",
                   "checkpoint.every=0", f"harness.tasks={task_dir}", "harness.max_batches=8", "harness.batch_size=4",
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    logged = _scalars(out / "tensorboard")
    assert set(logged["harness/sample_mc/acc"]) == {3}  # every=0 and eval_every=0: after the last step only
    report = _stage([f"model={out}", f"data={task_dir}", "max_batches=8", f"output={tmp_path / 'eval'}"])
    assert report["models"][0]["step"] == 3
    for k, v in report["models"][0]["metrics"].items():
        assert logged[f"harness/{k}"][3] == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("script, extra, says", [
    ("finetune.py", ["task=classification", "classification.train=x.jsonl", "classification.max_length=32"],
     "harness.tasks: the harness scores causal language models"),
    ("train.py", ["parallel.sequence_parallel_size=2"], "harness.tasks: the harness's requests are whole sequences"),
    ("train.py", ["harness.every=-1"], "harness.every"),
], ids=["finetune-classification", "sequence-parallel", "negative-every"])
def test_in_loop_harness_refusals_come_before_any_work(script, extra, says, task_dir: Path, tiny_dataset: Path,
                                                       tiny_hf_model: Path, tmp_path: Path, monkeypatch, capsys):
    from conftest import TINY_MODEL

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():  # rank 0 of a 2-rank launch (the SP case needs the world)
        monkeypatch.setenv(k, v)
    if script == "train.py":
        common = [f"data.datasets.0.path={tiny_dataset}", *TINY_MODEL]
    else:
        common = [f"model.path={tiny_hf_model}"]
        extra = [e.replace("x.jsonl", str(write_jsonl(tmp_path / "cls.jsonl", [{"text": "a b", "label": "x"}] * 8)))
                 for e in extra]
    code, _, err = run_entry(script, [f"output={tmp_path / 'run'}", *common, f"harness.tasks={task_dir}", *extra],
                             monkeypatch, capsys)
    assert code == 2 and says in err, err


def test_per_document_metrics_of_the_ranks_go_back_into_document_order():
    from pipeline.eval.tasks.harness import _interleave

    ranks = [{"t": {("acc", "none"): [0, 2, 4]}, "u": {("ppl", "none"): [10]}},
             {"t": {("acc", "none"): [1, 3]}, "u": {}}]
    assert _interleave(ranks) == {"t": {("acc", "none"): [0, 1, 2, 3, 4]}, "u": {("ppl", "none"): [10]}}


def _bad_yaml(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "broken.yaml").write_text("task: broken\ndataset_path: json\n  doc_to_text: [unclosed\n")
    return d


def _missing_data(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "t.yaml").write_text("task: nodata\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: missing.jsonl\n"
                              "test_split: test\noutput_type: multiple_choice\ndoc_to_text: x\ndoc_to_choice: [a, b]\n"
                              "doc_to_target: 0\n")
    return d


def _empty(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "notes.yaml").write_text("just: notes\n")
    return d


_INDEXES = pytest.mark.slow  # lm_eval's TaskManager indexes its ~10k task files (10-20 s a case)


@pytest.mark.parametrize("make, says", [
    pytest.param(lambda d: "hellaswagg", "'hellaswagg' is not a task lm-evaluation-harness 0.4", marks=_INDEXES),
    pytest.param(lambda d: "hellaswag", "reads its data from the Hugging Face Hub", marks=_INDEXES),
    (_bad_yaml, "broken.yaml' is not valid YAML"),
    (_missing_data, "could not load the data of the task directory"),
    (_empty, "defines no harness task (no YAML file with a task: key)"),
    (lambda d: str(d / "no_such_dir" / "task.yaml"), "is not a directory; a local harness task is a directory"),
], ids=["unknown-name", "hub-task-offline", "malformed-yaml", "missing-data", "no-task", "yaml-file-not-dir"])
def test_bad_harness_input_exits_2_before_any_model_is_loaded(make, says, tiny_hf_model: Path, tmp_path: Path,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = make(tmp_path / "tasks")
    code, _, err = run_entry("evaluate.py", ["task=harness", f"model={tiny_hf_model}", f"data={data}",
                                             f"output={tmp_path / 'eval'}"], monkeypatch, capsys)
    assert code == 2, err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "eval.partial").exists()


def test_without_the_harness_installed_the_stage_says_how_to_install_it(tiny_hf_model: Path, task_dir: Path, tmp_path: Path,
                                                                       monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, _, err = run_entry("evaluate.py", ["task=harness", f"model={tiny_hf_model}", f"data={task_dir}",
                                             f"output={tmp_path / 'eval'}"], monkeypatch, capsys)
    assert code == 2 and 'is not installed; run pip install -e ".[eval]"' in err, err


def test_the_harness_names_in_the_config_are_lm_evals(tmp_path: Path, monkeypatch, capsys):
    """``limit`` (the harness's name) points at max_batches; num_fewshot below -1 is refused."""
    code, _, err = run_entry("evaluate.py", ["task=harness", "model=m", "data=d", "limit=5"], monkeypatch, capsys)
    assert code == 2 and "max_batches" in err, err
    code, _, err = run_entry("evaluate.py", ["task=harness", "model=m", "data=d", "num_fewshot=-2"], monkeypatch, capsys)
    assert code == 2 and "num_fewshot" in err, err


def test_the_shipped_sample_task_is_the_generators_and_the_harness_reads_it(tmp_path: Path):
    """examples/harness/sample_reading: the held-out reading task of the built-in sample as multiple choice."""
    from conftest import ROOT

    from pipeline.data.sample import write_harness_task
    from pipeline.eval.tasks.harness import HarnessTasks

    shipped = ROOT / "examples" / "harness" / "sample_reading"
    made = write_harness_task(tmp_path / "made")
    for name in ("sample_reading.yaml", "sample_reading.jsonl"):
        assert (made / name).read_bytes() == (shipped / name).read_bytes(), f"regenerate: python -m pipeline.data.sample --harness-task {shipped}"
    rows = [json.loads(line) for line in (shipped / "sample_reading.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["choices"]) == 4 and r["choices"][r["answer"]] in r["prompt"] for r in rows)
    words = [set(re.findall(r"[a-z]+", r["prompt"].split("Question:")[0].lower())) for r in rows]
    assert all(sum(c in w for c in r["choices"]) == 1 for r, w in zip(rows, words))  # only the answer is in the passage
    assert HarnessTasks(str(shipped)).task_names() == ["sample_reading"]

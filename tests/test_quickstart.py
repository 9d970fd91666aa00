"""The main job end to end: launch/quickstart.py --tiny, its summary, artifacts, monitoring and resume.

The quickstart's own process runs in this one (``pipeline.stages.quickstart.main``, what
launch/quickstart.py calls): its stages are still their own processes, as for a user, but
each call saves an interpreter and the torch/transformers imports of the export check.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parent.parent


def _quickstart(*args: str) -> subprocess.CompletedProcess:
    """``launch/quickstart.py ARGS`` in this process: its exit code, stdout and stderr."""
    import torch  # noqa: F401  (imported before OMP_NUM_THREADS=1 below, so this process keeps its threads)

    from pipeline.stages.quickstart import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("OMP_NUM_THREADS", "1")  # the stages' processes, as a 2-rank run on 2 cores wants
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(ROOT)
        code = main(list(args))
    return subprocess.CompletedProcess(["launch/quickstart.py", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    r = _quickstart("--tiny", "--output", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_summary_numbers_are_present_and_sane(run):
    out, r = run
    s = json.loads((out / "summary.json").read_text())
    d, p, f, e = s["data"], s["pretrain"], s["finetune"], s["evaluate"]
    assert d["train_tokens"] > 10_000 and d["val_tokens"] > 0 and d["vocab_size"] == 512
    assert d["sft_train_examples"] == 240 and d["sft_test_examples"] == 16 == e["examples"]
    assert p["steps"] == 40 and f["steps"] == 12 and s["ranks"] == 2
    assert p["train_loss"] < p["first_train_loss"]
    # learned something beyond token frequencies, even in 40 tiny steps
    assert 1.0 < p["val_ppl"] < p["unigram_ppl"] < 512
    assert p["tokens_per_s"] > 0 and f["tokens_per_s"] > 0
    assert 0.0 <= e["exact_match_base"] <= e["exact_match_finetuned"] <= 1.0
    assert s["export"]["model_class"] == "LlamaForCausalLM" and s["export"]["prompts"] == 16
    assert s["tensorboard"] == f"tensorboard --logdir {out}"
    for stage in ("preprocess", "pretrain", "finetune", "evaluate", "harness", "export", "report"):
        assert s["seconds"][stage] > 0
    md = (out / "summary.md").read_text()
    assert md in r.stdout  # the console shows the same table
    assert "unigram-baseline perplexity" in md and f"tensorboard --logdir {out}" in md


def test_summary_shows_the_harness_score_from_its_report(run):
    # the harness stage scored base and fine-tuned on the shipped task (resolved from the repository,
    # not the working directory); the summary carries its numbers, standard errors included
    out, r = run
    report = json.loads((out / "eval-harness" / "report.json").read_text())
    assert report["config"]["data"] == str(ROOT / "examples" / "harness" / "sample_reading")
    assert report["config"]["apply_chat_template"] is True  # the format the fine-tune learned the task in
    assert report["config"]["max_batches"] == 200
    models = {m["name"]: m for m in report["models"]}
    assert {n: m["step"] for n, m in models.items()} == {"finetuned": 12, "base": 40}
    h = json.loads((out / "summary.json").read_text())["harness"]
    assert h["skipped"] is None and h["documents"] == 200 and h["data"] == report["config"]["data"]
    assert list(h["metrics"]) == ["sample_reading/acc", "sample_reading/acc_norm"]
    md = (out / "summary.md").read_text()
    for key, m in h["metrics"].items():
        for who in ("base", "finetuned"):
            assert m[who] == models[who]["metrics"][key] and 0.0 <= m[who] <= 1.0
            assert m[f"{who}_stderr"] == models[who]["metrics"][f"{key}_stderr"] and 0.0 < m[f"{who}_stderr"] < 0.1
        line = f"{m['base']:.3f} ± {m['base_stderr']:.3f} -> {m['finetuned']:.3f} ± {m['finetuned_stderr']:.3f}"
        assert re.search(rf"^\| harness \| {re.escape(key)} on 200 documents.*: base -> fine-tuned \| {re.escape(line)} \|$",
                         md, re.MULTILINE), (line, md)
    assert "finetuned: sample_reading/acc " in r.stdout and "base: sample_reading/acc " in r.stdout
    assert f"`{out / 'eval-harness' / 'report.md'}`" in md


def test_export_loads_with_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tok = AutoTokenizer.from_pretrained(out / "export")
    assert model.config.vocab_size >= 512 and "<|assistant|>" in tok.chat_template


def test_event_files_of_every_stage_load_with_tensorboard(run):
    from pipeline.eval.plots import load_scalars

    out, _ = run
    s = load_scalars(out)
    pre, ft = s["pretrain/tensorboard"], s["finetune/tensorboard"]
    # pretrain: 40 steps, a point every 5 steps; validation at 20 and 40
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "mem/rss"):
        assert [step for step, _ in pre[tag]] == list(range(5, 41, 5)), tag
    assert [step for step, _ in pre["eval/loss"]] == [20, 40] and len(pre["eval/ppl"]) == 2
    # finetune: 12 steps, a point every 3; validation at 6 and 12
    assert [step for step, _ in ft["train/loss"]] == [3, 6, 9, 12] and [step for step, _ in ft["eval/loss"]] == [6, 12]
    # evaluate: one point per model at its checkpoint's step
    assert s["eval/tensorboard/base"]["eval/exact_match"][0][0] == 40
    assert s["eval/tensorboard/finetuned"]["eval/exact_match"][0][0] == 12
    for name, step in (("base", 40), ("finetuned", 12)):
        for tag in ("eval/sample_reading/acc", "eval/sample_reading/acc_norm"):
            assert [p for p, _ in s[f"eval-harness/tensorboard/{name}"][tag]] == [step], (name, tag)


def test_report_and_logs(run):
    out, _ = run
    for name in ("loss.png", "lr.png", "throughput.png", "eval_ppl.png", "eval_exact_match.png"):
        assert (out / "report" / name).read_bytes().startswith(b"\x89PNG"), name
    assert "![Throughput](throughput.png)" in (out / "report" / "report.md").read_text()
    # progress bars stay quiet off a terminal: no bar text (rate units, "%|") in the logs
    for stage in ("preprocess", "evaluate", "export", "verify-export"):
        log = (out / "logs" / f"{stage}.log").read_text() if (out / "logs" / f"{stage}.log").exists() else ""
        assert not re.search(r"(doc|batch|tensor|it)/s\]|\d%\|", log), (stage, log[-500:])


def test_rerun_skips_completed_stages(run):
    out, _ = run
    before = {d: (out / d / "report.json").stat().st_mtime_ns for d in ("eval", "eval-harness")}
    r = _quickstart("--tiny", "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("pretrain", "finetune", "evaluate", "harness", "export"):
        assert f"{stage}: already complete, skipped" in r.stdout
    assert "is already complete for this config" in (out / "logs" / "preprocess.log").read_text()
    assert {d: (out / d / "report.json").stat().st_mtime_ns for d in before} == before
    s = json.loads((out / "summary.json").read_text())
    assert s["pretrain"]["steps"] == 40 and s["harness"]["metrics"]["sample_reading/acc"]["finetuned"] is not None
    # the published harness scores count only for the settings that made them: other ones are redone
    from pipeline.stages.quickstart import Options, is_done

    opts = Options(output=out, ranks=2, tiny=True)
    assert is_done(opts, "harness")
    assert not is_done(Options(output=out, ranks=2, tiny=True, overrides={"harness": ["max_batches=50"]}), "harness")


def test_without_lm_eval_the_harness_stage_is_skipped_and_said_up_front(run, monkeypatch):
    # a `pip install -e .` machine (no eval extra): the quickstart names the install command before the
    # first stage, runs every other stage, and the summary says why there is no harness score
    out, _ = run
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # importlib.util.find_spec("lm_eval") is None, import fails
    kept, log = out / "eval-harness.kept", out / "logs" / "harness.log"
    (out / "eval-harness").rename(kept)
    logged = log.stat().st_mtime_ns
    try:
        r = _quickstart("--tiny", "--output", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        note = r.stdout.index('lm-evaluation-harness is not installed, so the harness stage')
        assert 'install it with pip install -e ".[eval]"' in r.stdout
        assert note < r.stdout.index("[1/9] preprocess")
        assert '[6/9] harness: skipped, lm-evaluation-harness is not installed (pip install -e ".[eval]")' in r.stdout
        assert not (out / "eval-harness").exists() and log.stat().st_mtime_ns == logged  # the stage did not run
        h = json.loads((out / "summary.json").read_text())["harness"]
        assert h["metrics"] == {} and 'pip install -e ".[eval]"' in h["skipped"]
        assert re.search(r"^\| harness \| .* \| lm-evaluation-harness is not installed.*pip install -e \"\.\[eval\]\"\) \|$",
                         (out / "summary.md").read_text(), re.MULTILINE)
        # asking for the stage's settings without the harness is refused before anything runs
        bad = _quickstart("--tiny", "--output", str(out), "--set", "harness.max_batches=10")
        assert bad.returncode == 2 and "--set harness.*: the harness stage needs lm-evaluation-harness" in bad.stderr
        assert "[1/9]" not in bad.stdout
    finally:
        kept.rename(out / "eval-harness")


def test_more_steps_train_on_then_evaluate_and_export_again(run):
    out, _ = run
    r = _quickstart("--tiny", "--output", str(out), "--set", "finetune.train.max_steps=14")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrain: already complete, skipped" in r.stdout and "resumed from" in r.stdout
    for stage in ("finetune", "evaluate", "harness", "export"):
        assert f"{stage}: already complete" not in r.stdout
    assert json.loads((out / "export" / "export_meta.json").read_text())["step"] == 14
    for d in ("eval", "eval-harness"):
        models = {m["name"]: m["step"] for m in json.loads((out / d / "report.json").read_text())["models"]}
        assert models == {"finetuned": 14, "base": 40}, d
    assert json.loads((out / "summary.json").read_text())["finetune"]["steps"] == 14


def test_a_failing_stage_stops_the_chain_with_its_name_log_and_code(tmp_path: Path):
    # The first stage fails (its input is missing, exit 2), so nothing after it runs. The chain treats
    # every stage alike (pipeline.stages.quickstart.run_stage); a rank's exit code 2 through the
    # deepspeed launcher: test_launch_hygiene.py::test_port_held_by_another_job_is_one_message_from_rank_zero.
    out = tmp_path / "run"
    missing = tmp_path / "nowhere" / "*.jsonl"
    r = _quickstart("--tiny", "--output", str(out), "--set", f"preprocess.sources.0.path={missing}")
    assert r.returncode == 2
    log = out / "logs" / "preprocess.log"
    assert f"stage 'preprocess' FAILED with exit code 2; full log: {log}" in r.stderr
    assert "no input matches" in log.read_text() and "no input matches" in r.stderr
    assert not (out / "logs" / "sample-qa.log").exists() and not (out / "logs" / "pretrain.log").exists()
    assert not (out / "summary.json").exists()
    bad = _quickstart("--output", str(out), "--set", "nostage.x=1")
    assert bad.returncode == 2 and "expected STAGE.key=value" in bad.stderr


def test_every_recipe_is_checked_before_the_first_stage(tmp_path: Path):
    # a wrong value for the first stage and a misspelt key for a late one: refused before anything runs
    out = tmp_path / "run"
    for item, phrases in (("preprocess.val_fraction=2", ("the preprocess stage would refuse", "val_fraction: must be in [0, 1)")),
                          ("finetune.train.max_step=5", ("the finetune stage would refuse", "configs/sample/finetune.yaml",
                                                         "train.max_step: unknown key; did you mean 'max_steps'?")),
                          ("harness.num_fewshots=0", ("the harness stage would refuse", "task=harness",
                                                      "num_fewshots: unknown key; did you mean 'num_fewshot'?")),
                          ("harness.data=nowhere/task", ("the harness stage would refuse", "'nowhere/task' is not a directory"))):
        r = _quickstart("--tiny", "--output", str(out), "--set", item)
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        for phrase in phrases:
            assert phrase in r.stderr, r.stderr[-2000:]
        assert not out.exists(), "nothing is written before the recipes are accepted"

"""The training stage end to end on CPU ranks: resume, ZeRO equivalence, accumulation, signals, errors.

A launch costs 5-12 s of imports before its first step, so runs that several tests only read
are made once per module (the fixtures below), and refusals that come before the process
group run in this process (:func:`inproc.run_entry`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import ROOT, TINY_MODEL, free_port, run_ranks, run_script
from inproc import run_entry

pytestmark = pytest.mark.integration
ENV = {"OMP_NUM_THREADS": "1"}


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2", "train.warmup_steps=2",
            "train.eval_batches=2", "train.eval_every=0", "monitor.log_every=1", "checkpoint.every=0", "train.lr=3e-3", *extra]


def _losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())["losses"]


def _selected(request, test: str) -> list[pytest.Item]:
    """The items of ``test`` in this session (a fixture makes only the runs they read)."""
    return [item for item in request.session.items if getattr(item, "originalname", "") == test]


def _side_by_side(runs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """``python launch/train.py`` with each of ``runs`` (name -> arguments), two at a time: a
    one-rank launch is mostly single-threaded (imports, then steps at OMP_NUM_THREADS=1), so
    two cores run two at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        started = {name: pool.submit(run_script, "train.py", *args, env=ENV, timeout=600) for name, args in runs.items()}
    return {name: f.result() for name, f in started.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset: Path) -> Path:
    """12 uninterrupted steps on 2 ranks (the default ZeRO-3 offload config), a checkpoint every
    4 steps, all kept: what the exact-resume and the preemption tests resume against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_ranks("train.py", *_args(out, tiny_dataset, "train.max_steps=12", "checkpoint.every=4", "checkpoint.keep_last=0"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_exact_resume_two_ranks_zero3_offload(tmp_path: Path, tiny_dataset: Path, reference: Path):
    ckpt = reference / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000012"
    meta = json.loads((ckpt / "step-00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2 and meta["zero_stage"] == 3 and meta["consumed_samples"] == 32
    assert sorted(p.name for p in (ckpt / "step-00000008" / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert (ckpt / "step-00000008" / "hf" / "tokenizer" / "tokenizer.json").exists()
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000008", "step-00000012"]  # keep_last=0
    b = run_ranks("train.py", *_args(tmp_path / "b", tiny_dataset, "train.max_steps=12", f"checkpoint.resume={ckpt / 'step-00000008'}"))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    assert "resumed from" in b.stdout
    full, resumed = _losses(reference), _losses(tmp_path / "b")
    assert len(full) == 12 and len(resumed) == 4
    assert resumed == pytest.approx(full[8:], abs=1e-6)
    assert full[-1] < full[0]


@pytest.fixture(scope="module")
def one_rank_from_hf(request, tmp_path_factory, tiny_dataset: Path, tiny_hf_model: Path) -> dict[str, Path]:
    """5 steps on one rank without ZeRO (zero1) from the tiny Hugging Face model, global batch 4:
    ``accum`` as 2 accumulated micro-batches of 2, and (for the accumulation test) ``big`` as
    one micro-batch of 4."""
    base = tmp_path_factory.mktemp("one_rank")
    common = [f"model.path={tiny_hf_model}", "train.max_steps=5", "deepspeed.config=ds_configs/zero1.json"]
    runs = {"accum": _args(base / "accum", tiny_dataset, *common, "train.global_batch_size=4")}
    if _selected(request, "test_accumulation_equals_larger_micro_batch"):
        runs["big"] = _args(base / "big", tiny_dataset, *common, "train.micro_batch_size=4")
    for name, r in _side_by_side(runs).items():
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return {name: base / name for name in runs}


@pytest.mark.slow
def test_zero3_two_ranks_matches_one_rank_without_zero_from_hf_checkpoint(tmp_path: Path, tiny_dataset: Path, tiny_hf_model: Path,
                                                                          one_rank_from_hf: dict[str, Path]):
    common = [f"model.path={tiny_hf_model}", "train.max_steps=5", "train.global_batch_size=4"]
    z3 = run_ranks("train.py", *_args(tmp_path / "z3", tiny_dataset, *common))
    assert z3.returncode == 0, z3.stdout[-3000:] + z3.stderr[-3000:]
    assert _losses(tmp_path / "z3") == pytest.approx(_losses(one_rank_from_hf["accum"]), abs=2e-4)
    assert abs(_losses(tmp_path / "z3")[0] - 6.238) < 0.1  # ln(512) for a freshly initialised model


@pytest.mark.slow
def test_accumulation_equals_larger_micro_batch(one_rank_from_hf: dict[str, Path]):
    """2 accumulated micro-batches of 2 give the losses of one micro-batch of 4."""
    accum, big = one_rank_from_hf["accum"], one_rank_from_hf["big"]
    assert json.loads((accum / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    assert json.loads((big / "ds_config.json").read_text())["gradient_accumulation_steps"] == 1
    assert _losses(accum) == pytest.approx(_losses(big), abs=1e-5)


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    procs = psutil.Process(launcher.pid).children(recursive=True)
    return sorted(p.pid for p in procs if any("train.py" in c for c in p.cmdline()) and any("local_rank" in c for c in p.cmdline()))


def _launch(out: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PIPELINE_TEST_STEP_DELAY": "0.3"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"), *_args(out, data, *extra)]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True), log


def _wait_for(log: Path, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"'{text}' did not appear in {log}:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_resumes_exactly(tmp_path: Path, tiny_dataset: Path, reference: Path):
    proc, log = _launch(tmp_path / "run", tiny_dataset, "train.max_steps=12")
    _wait_for(log, "step 3 |")
    ranks = _rank_pids(proc)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGUSR1)  # only one rank gets the signal
    code = proc.wait(timeout=180)
    text = log.read_text()
    assert "stop requested" in text and code != 0
    assert "exits with return code = 75" in text or code == 75
    saved = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    stopped_at = int(saved.split("-")[1])
    assert 3 <= stopped_at < 12
    again = run_ranks("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=12"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(_losses(reference)[stopped_at:], abs=1e-6)


# A SIGKILLed rank fails the job within 120 s, with no rank left behind:
# test_faults.py::test_sigkilled_rank_fails_the_job_keeps_the_checkpoint_and_the_rerun_resumes
# (the same 2-rank launch, which then checks the checkpoint it kept and resumes from it).


ARCHITECTURES = ("gpt2", "qwen2", "mistral")


@pytest.fixture(scope="module")
def architectures(request, tmp_path_factory, tiny_dataset: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """2 steps of each selected architecture on one rank."""
    chosen = sorted(item.callspec.params["model_type"] for item in _selected(request, "test_other_architectures_train"))
    base = tmp_path_factory.mktemp("architectures")
    runs = _side_by_side({t: _args(base / t, tiny_dataset, "train.max_steps=2", f"model.model_type={t}") for t in chosen})
    return {t: (base / t, r) for t, r in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_other_architectures_train(architectures, model_type: str):
    run, r = architectures[model_type]
    assert r.returncode == 0, r.stderr[-3000:]
    conf = json.loads((run / "checkpoints" / "step-00000002" / "hf" / "config.json").read_text())
    assert conf["model_type"] == model_type and conf["vocab_size"] == 512
    assert len(_losses(run)) == 2


SHORT = ("train.max_steps=4", "monitor.log_every=2", "train.eval_every=2")


@pytest.fixture(scope="module")
def short_run(request, tmp_path_factory, tiny_dataset: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """4 steps on one rank (the default ZeRO-3 offload config), logged and evaluated every 2:
    ``plain``, and (for the activation checkpointing test) ``checkpointed`` with activation
    checkpointing on."""
    base = tmp_path_factory.mktemp("short")
    runs = {"plain": _args(base / "plain", tiny_dataset, *SHORT)}
    if _selected(request, "test_activation_checkpointing_gives_the_same_losses"):
        runs["checkpointed"] = _args(base / "checkpointed", tiny_dataset, *SHORT, "model.activation_checkpointing=true")
    done = _side_by_side(runs)
    assert done["plain"].returncode == 0, done["plain"].stderr[-3000:]
    return {name: (base / name, r) for name, r in done.items()}


@pytest.mark.slow
def test_tensorboard_scalars_and_resolved_configs(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, r = short_run["plain"]
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/data_wait_frac", "mem/rss"):
        assert tag in tags and len(ea.Scalars(tag)) == 2, tag
    assert [e.step for e in ea.Scalars("eval/loss")] == [2, 4]
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert "step 4 | loss" in r.stdout and "MFU" in r.stdout and "tok/s" in r.stdout


def test_print_config_shows_resolved_deepspeed_json(tmp_path: Path, tiny_dataset: Path, monkeypatch, capsys):
    code, out, err = run_entry("train.py", ["--print-config", *_args(tmp_path / "run", tiny_dataset), "train.grad_accum=3"],
                               monkeypatch, capsys)
    assert code == 0, err
    assert "DeepSpeed config for 1 rank(s)" in out and '"gradient_accumulation_steps": 3' in out
    assert '"train_batch_size": 6' in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.global_batch_size=6", "train.micro_batch_size=4"], "global_batch_size"),
        (["data.datasets.0.path=nowhere"], "not a preprocessed dataset"),
        (["data.seq_len=128", "model.path=HF"], "beyond the model's 64 positions"),
        (["model.path=OTHER_TOK"], "differs from the one"),
        (["model.hidden_size=60", "model.num_heads=7"], "not divisible by num_heads"),
        (["deepspeed.precision=bf16"], "bf16"),
    ],
)
def test_user_errors_exit_2_before_training(tmp_path: Path, tiny_dataset: Path, tiny_hf_model: Path, tiny_tokenizer: Path, extra, message,
                                            monkeypatch, capsys):
    import shutil

    if any("OTHER_TOK" in e for e in extra):
        other = tmp_path / "other"
        shutil.copytree(tiny_hf_model, other)
        for f in tiny_tokenizer.iterdir():
            shutil.copy2(f, other / f.name)
        extra = [e.replace("OTHER_TOK", str(other)) for e in extra]
    extra = [e.replace("=HF", f"={tiny_hf_model}") for e in extra]
    code, _, err = run_entry("train.py", [*_args(tmp_path / "run", tiny_dataset), *extra], monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_checks(tmp_path: Path, tiny_dataset: Path, short_run, monkeypatch, capsys):
    """On a finished run: resume=never is refused, the same max_steps is nothing to do, and a
    save that died half-way (step-N.tmp) is never loaded. (A checkpoint of another architecture
    is refused in test_error_catalogue.py, "resume a checkpoint of another model".)"""
    import shutil

    done, torn = tmp_path / "done", tmp_path / "torn"
    for run in (done, torn):
        shutil.copytree(short_run["plain"][0], run)
    code, _, err = run_entry("train.py", _args(done, tiny_dataset, *SHORT, "checkpoint.resume=never"), monkeypatch, capsys)
    assert code == 2 and "resume=never" in err and "Traceback" not in err
    (torn / "checkpoints" / "step-00000006.tmp").mkdir()  # a save that died half-way is never loaded
    r = _side_by_side({"done": _args(done, tiny_dataset, *SHORT), "torn": _args(torn, tiny_dataset, *SHORT[1:], "train.max_steps=5")})
    assert r["done"].returncode == 0 and "nothing to do" in r["done"].stdout, r["done"].stderr[-2000:]
    assert r["torn"].returncode == 0, r["torn"].stderr[-2000:]
    assert (torn / "checkpoints" / "latest").read_text() == "step-00000005"
    assert not (torn / "checkpoints" / "step-00000006.tmp").exists()


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(short_run):
    (on, r), (off, _) = short_run["checkpointed"], short_run["plain"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert yaml.safe_load((on / "config.yaml").read_text())["model"]["activation_checkpointing"] is True
    assert _losses(on) == pytest.approx(_losses(off), abs=1e-5)


@pytest.mark.slow
def test_torchrun_launch(tmp_path: Path, tiny_dataset: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), str(ROOT / "launch" / "train.py"),
           *_args(tmp_path / "run", tiny_dataset, "train.max_steps=2")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "train: 2 rank(s)" in r.stdout
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "meta.json").read_text())["world_size"] == 2

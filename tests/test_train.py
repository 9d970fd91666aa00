"""The training stage end to end on CPU ranks: resume, ZeRO equivalence, accumulation, signals, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY_MODEL, free_port, run_deepspeed, run_script

pytestmark = pytest.mark.integration


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2", "train.warmup_steps=2",
            "train.eval_batches=2", "train.eval_every=0", "monitor.log_every=1", "checkpoint.every=0", "train.lr=3e-3", *extra]


def _losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())["losses"]


@pytest.mark.slow
def test_exact_resume_two_ranks_zero3_offload(tmp_path: Path, tiny_dataset: Path):
    a = run_deepspeed("train.py", *_args(tmp_path / "a", tiny_dataset, "train.max_steps=8", "checkpoint.every=4", "checkpoint.keep_last=0"))
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    ckpt = tmp_path / "a" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000008"
    meta = json.loads((ckpt / "step-00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["zero_stage"] == 3 and meta["consumed_samples"] == 16
    assert sorted(p.name for p in (ckpt / "step-00000004" / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert (ckpt / "step-00000004" / "hf" / "tokenizer" / "tokenizer.json").exists()
    b = run_deepspeed("train.py", *_args(tmp_path / "b", tiny_dataset, "train.max_steps=8", f"checkpoint.resume={ckpt / 'step-00000004'}"))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    assert "resumed from" in b.stdout
    full, resumed = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(full) == 8 and len(resumed) == 4
    assert resumed == pytest.approx(full[4:], abs=1e-6)
    assert full[-1] < full[0]


@pytest.mark.slow
def test_zero3_two_ranks_matches_one_rank_without_zero_from_hf_checkpoint(tmp_path: Path, tiny_dataset: Path, tiny_hf_model: Path):
    common = [f"model.path={tiny_hf_model}", "train.max_steps=5", "train.global_batch_size=4"]
    z3 = run_deepspeed("train.py", *_args(tmp_path / "z3", tiny_dataset, *common))
    assert z3.returncode == 0, z3.stdout[-3000:] + z3.stderr[-3000:]
    plain = run_script("train.py", *_args(tmp_path / "plain", tiny_dataset, *common, "deepspeed.config=ds_configs/zero1.json"),
                       env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert _losses(tmp_path / "z3") == pytest.approx(_losses(tmp_path / "plain"), abs=2e-4)
    assert abs(_losses(tmp_path / "z3")[0] - 6.238) < 0.1  # ln(512) for a freshly initialised model


@pytest.mark.slow
def test_accumulation_equals_larger_micro_batch(tmp_path: Path, tiny_dataset: Path):
    env = {"OMP_NUM_THREADS": "1"}
    one = run_script("train.py", *_args(tmp_path / "acc", tiny_dataset, "train.max_steps=4", "train.grad_accum=2",
                                          "deepspeed.config=ds_configs/zero1.json"), env=env)
    two = run_script("train.py", *_args(tmp_path / "big", tiny_dataset, "train.max_steps=4", "train.micro_batch_size=4",
                                          "deepspeed.config=ds_configs/zero1.json"), env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert _losses(tmp_path / "acc") == pytest.approx(_losses(tmp_path / "big"), abs=1e-5)


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
def test_preemption_signal_checkpoints_and_resumes_exactly(tmp_path: Path, tiny_dataset: Path):
    ref = run_deepspeed("train.py", *_args(tmp_path / "ref", tiny_dataset, "train.max_steps=12"))
    assert ref.returncode == 0, ref.stdout[-3000:]
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
    again = run_deepspeed("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=12"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(_losses(tmp_path / "ref")[stopped_at:], abs=1e-6)


@pytest.mark.slow
def test_dead_rank_makes_the_job_fail_fast(tmp_path: Path, tiny_dataset: Path):
    proc, log = _launch(tmp_path / "run", tiny_dataset, "train.max_steps=200", "dist.timeout_s=60")
    _wait_for(log, "step 2 |")
    ranks = _rank_pids(proc)
    os.kill(ranks[1], signal.SIGKILL)
    t = time.time()
    code = proc.wait(timeout=120)
    assert code != 0 and time.time() - t < 120
    time.sleep(1)
    assert not [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gpt2", "qwen2", "mistral"])
def test_other_architectures_train(tmp_path: Path, tiny_dataset: Path, model_type: str):
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=2", f"model.model_type={model_type}"),
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    conf = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "hf" / "config.json").read_text())
    assert conf["model_type"] == model_type and conf["vocab_size"] == 512
    assert len(_losses(tmp_path / "run")) == 2


@pytest.mark.slow
def test_tensorboard_scalars_and_resolved_configs(tmp_path: Path, tiny_dataset: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=4", "monitor.log_every=2", "train.eval_every=2"),
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/data_wait_frac", "mem/rss"):
        assert tag in tags and len(ea.Scalars(tag)) == 2, tag
    assert [e.step for e in ea.Scalars("eval/loss")] == [2, 4]
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert "step 4 | loss" in r.stdout and "MFU" in r.stdout and "tok/s" in r.stdout


def test_print_config_shows_resolved_deepspeed_json(tmp_path: Path, tiny_dataset: Path):
    r = run_script("train.py", "--print-config", *_args(tmp_path / "run", tiny_dataset), "train.grad_accum=3")
    assert r.returncode == 0, r.stderr
    assert "DeepSpeed config for 1 rank(s)" in r.stdout and '"gradient_accumulation_steps": 3' in r.stdout
    assert '"train_batch_size": 6' in r.stdout
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
def test_user_errors_exit_2_before_training(tmp_path: Path, tiny_dataset: Path, tiny_hf_model: Path, tiny_tokenizer: Path, extra, message):
    import shutil

    if any("OTHER_TOK" in e for e in extra):
        other = tmp_path / "other"
        shutil.copytree(tiny_hf_model, other)
        for f in tiny_tokenizer.iterdir():
            shutil.copy2(f, other / f.name)
        extra = [e.replace("OTHER_TOK", str(other)) for e in extra]
    extra = [e.replace("=HF", f"={tiny_hf_model}") for e in extra]
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset), *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_checks(tmp_path: Path, tiny_dataset: Path):
    env = {"OMP_NUM_THREADS": "1"}
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=2"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=2", "checkpoint.resume=never"), env=env)
    assert r.returncode == 2 and "resume=never" in r.stderr
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=4", "model.num_layers=3"), env=env)
    assert r.returncode == 2 and "architecture differs" in r.stderr and "Traceback" not in r.stderr
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=2"), env=env)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    (tmp_path / "run" / "checkpoints" / "step-00000004.tmp").mkdir()  # a save that died half-way is never loaded
    r = run_script("train.py", *_args(tmp_path / "run", tiny_dataset, "train.max_steps=3"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003"
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004.tmp").exists()


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(tmp_path: Path, tiny_dataset: Path):
    env = {"OMP_NUM_THREADS": "1"}
    off = run_script("train.py", *_args(tmp_path / "off", tiny_dataset, "train.max_steps=3"), env=env)
    on = run_script("train.py", *_args(tmp_path / "on", tiny_dataset, "train.max_steps=3", "model.activation_checkpointing=true"), env=env)
    assert off.returncode == 0 and on.returncode == 0, off.stderr[-2000:] + on.stderr[-2000:]
    assert _losses(tmp_path / "on") == pytest.approx(_losses(tmp_path / "off"), abs=1e-5)


@pytest.mark.slow
def test_torchrun_launch(tmp_path: Path, tiny_dataset: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), str(ROOT / "launch" / "train.py"),
           *_args(tmp_path / "run", tiny_dataset, "train.max_steps=2")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "train: 2 rank(s)" in r.stdout
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "meta.json").read_text())["world_size"] == 2

"""Resuming a training run with a different number of ranks: refused with the conversion command,
or continued from a DeepSpeed universal checkpoint with the loss of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_MODEL, run_ranks, run_script, tree_hashes, z3_run_args
from inproc import run_entry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {"OMP_NUM_THREADS": "1"}
STEP2 = "step-00000002"


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    # global batch 4 = micro 2 x 2 ranks x accum 1 = micro 2 x 1 rank x accum 2: both layouts read the
    # same global samples per step (pipeline.data.sampler.rank_indices), so the losses are comparable
    return [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.warmup_steps=2", "train.eval_batches=0", "train.lr=3e-3",
            "monitor.log_every=1", "checkpoint.every=2", "checkpoint.keep_last=0", "train.max_steps=4", *extra]


# The 2-rank run these tests resume from is conftest's shared z3_run: 4 steps on 2 CPU ranks, ZeRO-3 +
# offload (the default config), global batch 4, checkpoints at steps 2 and 4 (z3_run_args).


def test_other_world_size_is_refused_with_the_conversion_command(tmp_path: Path, z3_run: Path, tiny_dataset: Path,
                                                                 monkeypatch, capsys):
    step = z3_run / "checkpoints" / STEP2
    before = tree_hashes(z3_run / "checkpoints")
    # launch/train.py in this process (one rank): refused before the process group
    code, _, err = run_entry("train.py", z3_run_args(tmp_path / "run1", tiny_dataset, f"checkpoint.resume={step}"),
                                  monkeypatch, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert (f"cannot resume from {step}: it was written by 2 data-parallel rank(s) and this run has 1" in err)
    assert f"`python launch/convert_checkpoint.py --checkpoint {step}`" in err
    assert f"checkpoint.resume={step}-universal" in err
    assert tree_hashes(z3_run / "checkpoints") == before and not (tmp_path / "run1" / "checkpoints").exists()


def test_universal_checkpoint_resumes_on_one_rank_with_the_same_losses(tmp_path: Path, z3_run: Path, tiny_dataset: Path,
                                                                        monkeypatch, capsys):
    run2 = tmp_path / "run2"  # the conversion writes beside the step: into a copy of the shared run
    shutil.copytree(z3_run, run2)
    step = run2 / "checkpoints" / STEP2
    before = tree_hashes(run2 / "checkpoints")
    # launch/convert_checkpoint.py in this process (DeepSpeed's converter with one worker forks nothing)
    code, out, err = run_entry("convert_checkpoint.py", ["--checkpoint", str(step)], monkeypatch, capsys)
    assert code == 0, out[-2000:] + err[-3000:]
    universal = step.with_name(STEP2 + "-universal")
    assert json.loads((universal / "meta.json").read_text())["universal"] is True
    assert (universal / "zero").is_dir() and (universal / "hf" / "config.json").is_file()
    assert not list(step.parent.glob("*.tmp-*")) and not list(step.parent.glob(".*"))
    assert {k: v for k, v in tree_hashes(run2 / "checkpoints").items() if not k.startswith(universal.name)} == before

    code, _, err = run_entry("export.py", ["--checkpoint", str(universal), "--output", str(tmp_path / "hf")], monkeypatch, capsys)
    assert code == 2 and "is a DeepSpeed universal checkpoint" in err, err[-2000:]

    r = run_script("train.py", *z3_run_args(tmp_path / "run1", tiny_dataset, f"checkpoint.resume={universal}"), env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((tmp_path / "run1" / "losses.json").read_text())
    reference = json.loads((run2 / "losses.json").read_text())
    assert resumed["start_step"] == 2 and len(resumed["losses"]) == 2
    # the same samples per step and the same states: only the reduction order differs (an all-reduce
    # of 2 ranks vs accumulation on 1), measured bit-identical here; 1e-5 leaves room for that order
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)


def test_zero2_one_rank_checkpoint_resumes_on_two_ranks(tmp_path: Path, tiny_dataset: Path, monkeypatch, capsys):
    """The other direction and the other partitioning (ZeRO-2: only optimizer state partitioned)."""
    zero2 = "deepspeed.config=ds_configs/zero2.json"
    r = run_script("train.py", *_args(tmp_path / "run1", tiny_dataset, zero2), env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    step = tmp_path / "run1" / "checkpoints" / STEP2
    code, out, err = run_entry("convert_checkpoint.py", ["--checkpoint", str(step), "--output", str(tmp_path / "universal")],
                               monkeypatch, capsys)
    assert code == 0, out[-2000:] + err[-3000:]
    r = run_ranks("train.py", *_args(tmp_path / "run2", tiny_dataset, zero2, f"checkpoint.resume={tmp_path / 'universal'}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((tmp_path / "run2" / "losses.json").read_text())
    reference = json.loads((tmp_path / "run1" / "losses.json").read_text())
    assert resumed["start_step"] == 2 and resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)
    meta = json.loads((tmp_path / "run2" / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert (meta["world_size"], meta["consumed_samples"]) == (2, 16)  # 4 steps x global batch 4, across both launches

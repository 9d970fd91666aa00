"""Resuming a training run with a different number of ranks: refused with the conversion command,
or continued from a DeepSpeed universal checkpoint with the loss of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_MODEL, run_deepspeed, run_script
from pipeline.io import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {"OMP_NUM_THREADS": "1"}
STEP2 = "step-00000002"


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    # global batch 4 = micro 2 x 2 ranks x accum 1 = micro 2 x 1 rank x accum 2: both layouts read the
    # same global samples per step (pipeline.data.sampler.rank_indices), so the losses are comparable
    return [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.warmup_steps=2", "train.eval_batches=0", "train.lr=3e-3",
            "monitor.log_every=1", "checkpoint.every=2", "checkpoint.keep_last=0", "train.max_steps=4", *extra]


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_dataset: Path) -> Path:
    """4 steps on 2 CPU ranks, ZeRO-3 + offload (the default config), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ws") / "run2"
    r = run_deepspeed("train.py", *_args(out, tiny_dataset))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_other_world_size_is_refused_with_the_conversion_command(tmp_path: Path, two_rank_run: Path, tiny_dataset: Path):
    step = two_rank_run / "checkpoints" / STEP2
    before = _hashes(two_rank_run / "checkpoints")
    r = run_script("train.py", *_args(tmp_path / "run1", tiny_dataset, f"checkpoint.resume={step}"), env=ENV)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (f"cannot resume from {step}: it was written by 2 data-parallel rank(s) and this run has 1" in r.stderr)
    assert f"`python launch/convert_checkpoint.py --checkpoint {step}`" in r.stderr
    assert f"checkpoint.resume={step}-universal" in r.stderr
    assert _hashes(two_rank_run / "checkpoints") == before and not (tmp_path / "run1" / "checkpoints").exists()


def test_universal_checkpoint_resumes_on_one_rank_with_the_same_losses(tmp_path: Path, two_rank_run: Path,
                                                                        tiny_dataset: Path):
    step = two_rank_run / "checkpoints" / STEP2
    before = _hashes(two_rank_run / "checkpoints")
    r = run_script("convert_checkpoint.py", "--checkpoint", str(step), env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    universal = step.with_name(STEP2 + "-universal")
    assert json.loads((universal / "meta.json").read_text())["universal"] is True
    assert (universal / "zero").is_dir() and (universal / "hf" / "config.json").is_file()
    assert not list(step.parent.glob("*.tmp-*")) and not list(step.parent.glob(".*"))
    assert {k: v for k, v in _hashes(two_rank_run / "checkpoints").items() if not k.startswith(universal.name)} == before

    r = run_script("export.py", "--checkpoint", str(universal), "--output", str(tmp_path / "hf"), env=ENV)
    assert r.returncode == 2 and "is a DeepSpeed universal checkpoint" in r.stderr, r.stderr[-2000:]

    r = run_script("train.py", *_args(tmp_path / "run1", tiny_dataset, f"checkpoint.resume={universal}"), env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((tmp_path / "run1" / "losses.json").read_text())
    reference = json.loads((two_rank_run / "losses.json").read_text())
    assert resumed["start_step"] == 2 and len(resumed["losses"]) == 2
    # the same samples per step and the same states: only the reduction order differs (an all-reduce
    # of 2 ranks vs accumulation on 1), measured bit-identical here; 1e-5 leaves room for that order
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)


def test_zero2_one_rank_checkpoint_resumes_on_two_ranks(tmp_path: Path, tiny_dataset: Path):
    """The other direction and the other partitioning (ZeRO-2: only optimizer state partitioned)."""
    zero2 = "deepspeed.config=ds_configs/zero2.json"
    r = run_script("train.py", *_args(tmp_path / "run1", tiny_dataset, zero2), env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    step = tmp_path / "run1" / "checkpoints" / STEP2
    r = run_script("convert_checkpoint.py", "--checkpoint", str(step), "--output", str(tmp_path / "universal"), env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = run_deepspeed("train.py", *_args(tmp_path / "run2", tiny_dataset, zero2, f"checkpoint.resume={tmp_path / 'universal'}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((tmp_path / "run2" / "losses.json").read_text())
    reference = json.loads((tmp_path / "run1" / "losses.json").read_text())
    assert resumed["start_step"] == 2 and resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)
    meta = json.loads((tmp_path / "run2" / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert (meta["world_size"], meta["consumed_samples"]) == (2, 16)  # 4 steps x global batch 4, across both launches

"""A training launch resolved once (pipeline.training.resolve): the stage, --print-config and the
planner read one ResolvedRun; `auto` keeps the config of the checkpoint it resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from pipeline.errors import UserError

BIG = ["model.hidden_size=4096", "model.num_layers=32", "model.num_heads=32", "model.num_kv_heads=8",
       "model.intermediate_size=14336", "data.seq_len=4096", "train.micro_batch_size=1"]


def _resolve(data: Path, out: Path, *overrides: str, refuse: bool = True):
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.stages.train import TrainConfig
    from pipeline.training.model import hf_config
    from pipeline.training.resolve import resolve_run

    cfg = load_config(TrainConfig, None, [f"data.datasets.0.path={data}", f"output={out}", *overrides])
    tok = read_manifest(data)["tokenizer"]
    conf = hf_config(cfg.model, tok["vocab_size"], cfg.data.seq_len, tok)
    return cfg, resolve_run(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm", refuse=refuse)


def _fake_checkpoint(out: Path, meta: dict) -> Path:
    step = out / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 2, **meta}))
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    return step


def test_auto_is_resolved_without_touching_the_recipe(tmp_path: Path, tiny_dataset: Path):
    cfg, r = _resolve(tiny_dataset, tmp_path / "run", *TINY_MODEL, "deepspeed.config=auto", "train.micro_batch_size=2",
                      "train.grad_accum=3")
    assert cfg.deepspeed.config == "auto"  # the recipe is not rewritten; the choice lives in the ResolvedRun
    assert r.config == "ds_configs/zero0.json" and r.ds["zero_optimization"]["stage"] == 0
    assert (r.world, r.micro, r.accum, r.precision) == (1, 2, 3, "fp32")
    assert r.ds["train_batch_size"] == 6 and "auto" not in json.dumps(r.ds)
    assert r.estimate is not None and r.estimate.fits and r.resume_from is None
    assert r.notes == [n for n in r.notes if n.startswith("deepspeed.config=auto: ds_configs/zero0.json (the fastest")]
    assert len(r.notes) == 1


def test_auto_keeps_the_config_of_the_checkpoint_it_resumes(tmp_path: Path, tiny_dataset: Path):
    """A requeued job must not switch ZeRO stage under its own checkpoint because the node it lands
    on has another amount of free memory: `auto` takes the config recorded in meta.json."""
    out = tmp_path / "run"
    step = _fake_checkpoint(out, {"deepspeed_config": "ds_configs/zero2.json", "zero_stage": 2})
    _, r = _resolve(tiny_dataset, out, *TINY_MODEL, "deepspeed.config=auto")
    assert r.resume_from == step
    assert r.config == "ds_configs/zero2.json" and r.ds["zero_optimization"]["stage"] == 2
    assert r.notes == ["deepspeed.config=auto: ds_configs/zero2.json (the config of the checkpoint being resumed)"]
    # an explicit config is the user's: used as given (the resume check compares ZeRO stages later)
    _, r = _resolve(tiny_dataset, out, *TINY_MODEL, "deepspeed.config=ds_configs/zero1.json")
    assert r.config == "ds_configs/zero1.json" and r.resume_from == step and not r.notes


def test_auto_refuses_when_the_resumed_config_no_longer_fits(tmp_path: Path, tiny_dataset: Path):
    out = tmp_path / "run"
    step = _fake_checkpoint(out, {"deepspeed_config": "ds_configs/zero0.json", "zero_stage": 0})
    with pytest.raises(UserError) as e:
        _resolve(tiny_dataset, out, *BIG, "deepspeed.config=auto")
    msg = str(e.value)
    assert f"the run being resumed ({step}) was trained with ds_configs/zero0.json, which no longer fits" in msg
    assert f"python launch/convert_checkpoint.py --checkpoint {step}" in msg


def test_a_config_that_cannot_fit_is_refused_by_the_stage_and_shown_by_print_config(tmp_path: Path, tiny_dataset: Path):
    with pytest.raises(UserError, match=r"ds_configs/zero0.json will not fit: needs .* GiB CPU RAM per node"):
        _resolve(tiny_dataset, tmp_path / "run", *BIG, "deepspeed.config=ds_configs/zero0.json")
    _, r = _resolve(tiny_dataset, tmp_path / "run", *BIG, "deepspeed.config=ds_configs/zero0.json", refuse=False)
    assert not r.estimate.fits and "(does not fit: needs " in r.describe()
    # memory_check=false: no estimate at all, nothing refused
    _, r = _resolve(tiny_dataset, tmp_path / "run", *BIG, "deepspeed.config=ds_configs/zero0.json",
                    "deepspeed.memory_check=false")
    assert r.estimate is None and r.target is None and "# memory:" not in r.describe()


def test_the_planner_and_the_stage_fill_a_config_the_same_way(tmp_path: Path, tiny_dataset: Path):
    """One resolver: the planner's estimate for the stage's own config is made from the same JSON."""
    from pipeline.training.plan import estimate_config

    _, r = _resolve(tiny_dataset, tmp_path / "run", *TINY_MODEL, "deepspeed.config=ds_configs/zero3_offload.json")
    again = estimate_config(r.recipe, "ds_configs/zero3_offload.json", r.target, r.micro, r.recipe.checkpointing)
    assert (again.device_total, again.cpu_node, again.buffers) == (r.estimate.device_total, r.estimate.cpu_node,
                                                                  r.estimate.buffers)

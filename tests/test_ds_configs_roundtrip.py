"""Every shipped DeepSpeed config, and what ``deepspeed.config=auto`` picks, round-trips: a short
training run's checkpoint exports with verified logits, evaluates from the checkpoint itself (the
same perplexity as its export) and is what a fine-tune starts from. The default config's case reads
conftest's shared 2-rank run (z3_run) instead of training its own.

A fine-tune reads a checkpoint in one place, ``pipeline.stages.export.init_model_dir`` (rank 0
exports it into ``<output>/init_model``); the rest of its start does not depend on the ZeRO layout.
So every case checks that step in this process, and one case (:data:`FINETUNED`) also launches
``launch/finetune.py`` from its checkpoint, for the stage as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY_MODEL, Z3_STEPS, model_logits, run_ranks, run_script, validation_loss, write_jsonl, z3_run_args

from pipeline.stages.export import consolidate, export, init_model_dir, resolve_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {"OMP_NUM_THREADS": "1"}
CONFIGS = {  # case -> (deepspeed.config, ranks, the ZeRO stage its checkpoint must record)
    # A model this small fits on every rank: the planner picks ds_configs/zero0.json (asserted), so this
    # case is zero0.json's round-trip too. One rank: nothing is partitioned, one rank writes the same
    # files as two. (auto on 2 ranks: test_plan.py::test_auto_picks_the_fastest_config_that_fits_and_trains)
    "auto": ("auto", 1, 0),
    # Each ZeRO stage's partitioned checkpoint, written by 2 ranks, is read by a case of that stage: zero1,
    # zero2, zero3_offload and zero3_offload_nvme. The two configs that differ from one of those only in
    # where the training keeps its states (zero2 + optimizer offload, zero3 without offload) train on
    # one rank: the same files from one rank, the layout a single-GPU user exports.
    "zero1": ("ds_configs/zero1.json", 2, 1),
    "zero2": ("ds_configs/zero2.json", 2, 2),
    "zero2_offload": ("ds_configs/zero2_offload.json", 1, 2),
    "zero3": ("ds_configs/zero3.json", 1, 3),
    "zero3_offload": ("ds_configs/zero3_offload.json", 2, 3),
    "zero3_offload_nvme": ("ds_configs/zero3_offload_nvme.json", 2, 3),
}
SHARED = "zero3_offload"  # the config of conftest's z3_run (Z3_STEPS steps on 2 ranks): that case reads it
FINETUNED = "zero2"  # the case whose checkpoint (2 ranks, partitioned) launch/finetune.py also starts from, on one rank


def _nvme_unavailable(directory: Path) -> str | None:
    """Why ZeRO-3 NVMe offload cannot run here (None: it can). It needs DeepSpeed's async_io op,
    which links libaio, and a directory that takes O_DIRECT I/O (not tmpfs)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if builder is None or not builder.is_compatible():
        return ("DeepSpeed's async_io op (ZeRO NVMe offload) cannot be built: libaio's headers and library are missing "
                "(Debian: apt-get install libaio-dev)")
    probe = directory / "o_direct_probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
    except OSError as e:
        return f"{directory} does not take O_DIRECT I/O ({e}), which DeepSpeed's NVMe offload uses"
    finally:
        probe.unlink(missing_ok=True)
    return None


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    from pipeline.data.sample import generate_qa

    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", list(generate_qa(40)))


def _train(run: Path, data: Path, config: str, ranks: int, *extra: str):
    args = [f"output={run}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2", "train.warmup_steps=1",
            "train.eval_batches=2", "train.eval_every=0", "checkpoint.every=0", "train.max_steps=2", "train.lr=3e-3",
            f"deepspeed.config={config}", *extra]
    return run_ranks("train.py", *args, ranks=ranks, env=ENV) if ranks > 1 else run_script("train.py", *args, env=ENV)


def _start_finetune(ft: Path, run: Path, data: Path, config: str, log: Path) -> subprocess.Popen:
    """``python launch/finetune.py``: one SFT step from the checkpoint of ``run`` (on one rank: reading
    the checkpoint is what is tested), started in the background (output to ``log``) while this
    process checks the same checkpoint."""
    args = [f"output={ft}", f"model.path={run}", "task=sft", f"sft.train={data}", "sft.seq_len=32", "sft.val_fraction=0",
            "train.micro_batch_size=2", "train.max_steps=1", "train.warmup_steps=0", "train.eval_every=0",
            "train.eval_batches=0", "checkpoint.every=0", f"deepspeed.config={config}"]
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(ROOT / "launch" / "finetune.py"), *args], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **ENV})


def _checkpoint_model(step: Path):
    """The checkpoint's own weights in a model built from hf/config.json (strict load_state_dict),
    not through pipeline.stages.export's loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(step / "hf"))
    model.load_state_dict(consolidate(step), strict=True)
    return model.eval()


@pytest.mark.parametrize("case", list(CONFIGS))
def test_checkpoint_exports_evaluates_and_finetunes(case: str, tmp_path: Path, tiny_dataset: Path, sft_data: Path, request):
    config, ranks, stage = CONFIGS[case]
    if case == SHARED:
        run, steps = request.getfixturevalue("z3_run"), Z3_STEPS  # read only: everything below writes to tmp_path
        assert f"deepspeed.config={config}" in z3_run_args(run, tiny_dataset)
    else:
        extra = []
        if case == "zero3_offload_nvme":
            nvme = Path(tempfile.mkdtemp(prefix="nvme-", dir=tmp_path))
            if reason := _nvme_unavailable(nvme):
                pytest.skip(f"{reason}; on a machine with libaio and a local NVMe disk this test runs the NVMe path")
            extra = [f"deepspeed.nvme_path={nvme}"]
        run, steps = tmp_path / "run", 2
        r = _train(run, tiny_dataset, config, ranks, *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if case == "auto":
        assert json.loads((resolve_checkpoint(run) / "meta.json").read_text())["deepspeed_config"] == "ds_configs/zero0.json"
    if case != FINETUNED:
        _checks(run, steps, stage, ranks, tmp_path, tiny_dataset)
        return
    # fine-tune one step from the checkpoint, in a process of its own while this one checks the same checkpoint
    ft, log = tmp_path / "ft", tmp_path / "ft.log"
    finetune = _start_finetune(ft, run, sft_data, "ds_configs/zero0.json", log)
    try:
        step = _checks(run, steps, stage, ranks, tmp_path, tiny_dataset)
        code = finetune.wait(timeout=600)
    finally:
        if finetune.poll() is None:
            finetune.kill()
            finetune.wait()
    assert code == 0, log.read_text()[-6000:]
    assert json.loads((ft / "checkpoints" / "step-00000001" / "meta.json").read_text())["step"] == 1
    assert json.loads((ft / "init_model" / "export_meta.json").read_text())["source_checkpoint"] == str(step.resolve())


def _checks(run: Path, steps: int, stage: int, ranks: int, tmp_path: Path, data: Path) -> Path:
    """The checkpoint of ``run`` (``steps`` steps, ZeRO ``stage`` on ``ranks``) exports, evaluates
    from itself as its export does, and is read as a fine-tune's start; returns its step directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_config
    from pipeline.inputs import check_model
    from pipeline.stages.evaluate import EvalConfig
    from pipeline.stages.evaluate import run as evaluate

    step = resolve_checkpoint(run)
    meta = json.loads((step / "meta.json").read_text())
    assert (meta["step"], meta["zero_stage"], meta["world_size"]) == (steps, stage, ranks)

    # export: verified against the checkpoint by the stage itself, then checked here with plain transformers
    summary = export(run, tmp_path / "export", log=lambda *_: None)
    assert (summary["zero_stage"], summary["world_size"], summary["dtype"]) == (stage, ranks, "fp32")
    assert summary["max_abs_logit_diff"] <= summary["tolerance"] == 1e-4
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    reference = model_logits(_checkpoint_model(step))
    assert (model_logits(exported) - reference).abs().max() <= 1e-5
    # a fine-tune's start from this checkpoint (model.path=<run>): what rank 0 of launch/finetune.py makes of it
    init = init_model_dir(check_model(run, "model.path"), tmp_path / "ft_start", rank=0)
    assert init == tmp_path / "ft_start" / "init_model"
    assert json.loads((init / "export_meta.json").read_text())["source_checkpoint"] == str(step.resolve())
    assert (model_logits(AutoModelForCausalLM.from_pretrained(init).eval()) - reference).abs().max() <= 1e-5
    # ... and the checkpoint holds what was trained: the run's last validation loss, recomputed
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = events.Scalars("eval/loss")[-1]
    assert logged.step == steps and validation_loss(exported, data) == pytest.approx(logged.value, abs=1e-5)

    # evaluate the checkpoint directly, and its export beside it: the same numbers. (Evaluate's ZeRO-3
    # mode on 2 ranks, rank 0 consolidating a checkpoint for both: test_evaluate.py::test_zero3_two_ranks_equals_single_process.)
    report = evaluate(load_config(EvalConfig, None, [f"output={tmp_path / 'eval'}", f"model={run}", f"compare_to={tmp_path / 'export'}",
                                                     f"data={data}", "max_batches=2", "batch_size=4"]))
    ckpt, exp = (m["metrics"] for m in report["models"])
    assert report["models"][0]["checkpoint"] == str(step) and report["models"][0]["step"] == steps
    assert ckpt["tokens"] == exp["tokens"] > 0 and ckpt["ppl"] == pytest.approx(exp["ppl"], rel=1e-6)
    return step

"""Sequence parallelism (DeepSpeed Ulysses / ALST): parallel.sequence_parallel_size.

SP=2 on 2 ranks against 1 rank without SP on the same sequences, for pre-training under every
ZeRO stage and for masked SFT: the losses must agree to 1e-5 over 8 steps. The runs use AdamW
with eps 1.0 and no clipping, which makes the update proportional to the gradient's scale:
with the default eps and clipping a gradient off by a constant factor gives the same losses
(pipeline.training.sequence_parallel.grad_divisor says why that matters here).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, run_ranks, run_script, write_jsonl

from pipeline.errors import UserError
from pipeline.training.sequence_parallel import (
    ShardedBatches,
    document_attention,
    document_spans,
    dp_coords,
    fill,
    grad_divisor,
    shard,
)

SCALE_SENSITIVE = ["train.eps=1.0", "train.grad_clip=0"]
STEPS = 8


# ---------------------------------------------------------------------------- pieces


def test_shard_slices_inputs_targets_and_global_positions():
    batch = torch.arange(2 * 9).reshape(2, 9)  # (B, T+1): inputs [:, :-1], targets [:, 1:]
    a, b = shard(batch, 0, 2), shard(batch, 1, 2)
    assert a["input_ids"].tolist() == [[0, 1, 2, 3], [9, 10, 11, 12]]
    assert a["labels"].tolist() == [[1, 2, 3, 4], [10, 11, 12, 13]]
    assert b["input_ids"].tolist() == [[4, 5, 6, 7], [13, 14, 15, 16]]
    assert b["labels"].tolist() == [[5, 6, 7, 8], [14, 15, 16, 17]]
    assert a["position_ids"].tolist() == [[0, 1, 2, 3]] * 2 and b["position_ids"].tolist() == [[4, 5, 6, 7]] * 2
    # an SFT batch: labels already aligned, its own positions kept, the (dropped) mask removed
    sft = {"input_ids": batch[:, :8], "labels": batch[:, 1:], "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2),
           "attention_mask": torch.ones(2, 8)}
    s = shard(sft, 1, 2)
    assert set(s) == {"input_ids", "labels", "position_ids"} and s["position_ids"].tolist() == [[1, 2, 3, 4]] * 2


def test_a_short_validation_batch_is_filled_with_rows_without_targets():
    # Ulysses attention runs only the registered micro-batch size; the last validation batch may be short
    batch = torch.arange(9).reshape(1, 9)
    f = fill(batch, 3)
    assert f["input_ids"].shape == (3, 8) and f["input_ids"][0].tolist() == list(range(8))
    assert f["labels"][0].tolist() == list(range(1, 9)) and (f["labels"][1:] == -100).all()
    assert f["position_ids"].tolist() == [list(range(8))] * 3
    sft = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([[-100, 5, 6, -100]] * 2),
           "position_ids": torch.tensor([[0, 1, 0, 1]] * 2), "attention_mask": torch.zeros(2, 1, 4, 4)}
    f = fill(sft, 3)
    assert set(f) == {"input_ids", "labels", "position_ids"} and f["position_ids"][:2].tolist() == [[0, 1, 0, 1]] * 2
    assert int((f["labels"] != -100).sum()) == 4  # the target count (the loss's normaliser) unchanged
    assert fill(sft, 2) is sft
    (got, real), = list(ShardedBatches([(batch, False)], 1, 2, micro=2))
    assert real is False and got["input_ids"].shape == (2, 4) and got["labels"][1].tolist() == [-100] * 4


def test_packed_documents_attend_only_within_themselves():
    """What the Ulysses wrapper hands sdpa after the all-to-all (no mask, the full sequence's position
    ids) gives, per document, what one rank's block-diagonal mask gives (pipeline.data.sft.collate)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.data.sft import collate

    T = 24
    rows = [[([1] * 5, [1] * 5), ([1] * 9, [1] * 9), ([1] * 3, [1] * 3)],  # three documents, then 7 pads
            [([1], [1]), ([1], [1]), ([1] * 12, [1] * 12), ([1], [1])]]  # one-token documents, one before the pads
    batch = collate(rows, T, pad_id=0)
    pos = batch["position_ids"]
    light = collate(rows, T, pad_id=0, mask=False)  # what sequence-parallel ranks load: no T x T mask
    assert "attention_mask" not in light and torch.equal(light["position_ids"], pos)
    assert torch.equal(light["input_ids"], batch["input_ids"]) and torch.equal(light["labels"], batch["labels"])
    assert document_spans(pos) == [[(0, 5), (5, 14), (14, 17), (17, 24)], [(0, 1), (1, 2), (2, 14), (14, 24)]]
    assert document_spans(torch.arange(T).expand(2, T)) is None  # one document per row: sdpa's own call
    real = torch.zeros(2, T, dtype=torch.bool)
    real[0, :17], real[1, :15] = True, True
    module = type("Attn", (), {"num_key_value_groups": 2, "is_causal": True, "training": True})()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    want, _ = sdpa_attention_forward(module, q, k, v, batch["attention_mask"], scaling=0.35)
    got, _ = document_attention(sdpa_attention_forward)(module, q, k, v, None, scaling=0.35, position_ids=pos)
    causal, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.35, position_ids=pos)
    assert got.shape == want.shape == (2, T, 4, 8)
    assert torch.allclose(got[real], want[real], atol=1e-6)
    assert not torch.allclose(causal[real], want[real], atol=1e-2)  # plain causal: documents see each other


def test_groups_and_the_gradient_divisor_of_each_zero_stage():
    assert [dp_coords(r, 4, 2) for r in range(4)] == [(0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1)]
    assert [grad_divisor(4, 2, z) for z in range(4)] == [2, 2, 2, 4]
    assert [grad_divisor(4, 1, z) for z in range(4)] == [4, 4, 4, 4]


def _train_cfg(data: Path, *overrides: str):
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.stages.train import TrainConfig
    from pipeline.training.model import hf_config

    cfg = load_config(TrainConfig, None, [f"data.datasets.0.path={data}", *TINY_MODEL, *overrides])
    tok = read_manifest(data)["tokenizer"]
    return cfg, hf_config(cfg.model, tok["vocab_size"], cfg.data.seq_len, tok)


@pytest.mark.parametrize("overrides, phrase", [
    (["model.num_heads=3", "model.hidden_size=48"], "the model's 3 attention heads are not divisible by it"),
    (["model.num_kv_heads=3", "model.num_heads=6", "model.hidden_size=48", "parallel.sequence_parallel_size=4"],
     "the model's 3 key/value heads neither divide nor are divisible by it"),
    (["data.seq_len=33"], "data.seq_len=33 is not divisible by it"),
    (["model.attn_implementation=eager"], "model.attn_implementation=eager is not supported"),
    ([], "the launch has 1 rank(s), not a multiple of it"),
    (["model.model_type=gpt2"], "gpt2 takes no position ids"),
], ids=["heads", "kv heads", "seq_len", "eager", "world", "gpt2"])
def test_bad_configs_are_refused_before_any_heavy_work(overrides, phrase, tiny_dataset: Path, tmp_path: Path):
    from pipeline.training.resolve import resolve_run

    cfg, conf = _train_cfg(tiny_dataset, f"output={tmp_path / 'run'}", "parallel.sequence_parallel_size=2", *overrides)
    with pytest.raises(UserError) as e:
        resolve_run(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm")
    assert str(e.value).startswith(f"parallel.sequence_parallel_size={cfg.parallel.sequence_parallel_size}: ")
    assert phrase in str(e.value)


def test_the_resolved_json_counts_data_parallel_groups(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    """World 4 = dp 2 x sp 2: batch arithmetic over the 2 groups, sequence_parallel_size in the JSON."""
    from pipeline.training.resolve import resolve_run

    for k, v in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    cfg, conf = _train_cfg(tiny_dataset, f"output={tmp_path / 'run'}", "parallel.sequence_parallel_size=2",
                           "train.micro_batch_size=2", "train.grad_accum=3", "deepspeed.config=ds_configs/zero3.json",
                           "deepspeed.memory_check=false")
    r = resolve_run(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm")
    assert (r.sp, r.dp_world, r.dp_rank, r.sp_rank) == (2, 2, 0, 1)
    assert r.ds["sequence_parallel_size"] == 2 and r.ds["train_batch_size"] == 2 * 3 * 2


def test_which_attention_keeps_packed_documents_apart():
    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.training.tasks.sft import SFTTask

    def refused(sp: int, attn: str) -> list[str]:
        cfg = FinetuneConfig(task="sft")
        cfg.sft.train, cfg.sft.packing = "x.jsonl", True
        cfg.parallel.sequence_parallel_size, cfg.model.attn_implementation = sp, attn
        return [k for k, _ in SFTTask(cfg).check()]

    # one rank: the 4-D block-diagonal mask (sdpa, eager); sequence parallelism: sdpa per document, flash by positions
    assert {a: refused(1, a) for a in ("sdpa", "eager", "flash_attention_2")} == {
        "sdpa": [], "eager": [], "flash_attention_2": ["model.attn_implementation"]}
    assert {a: refused(2, a) for a in ("sdpa", "flash_attention_2", "flex_attention")} == {
        "sdpa": [], "flash_attention_2": [], "flex_attention": ["sft.packing"]}


def test_packing_with_flex_attention_and_classification_are_refused_with_sequence_parallelism(tmp_path: Path,
                                                                                             tiny_hf_model: Path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "response": "a"}] * 4)
    common = [f"output={tmp_path / 'out'}", f"model.path={tiny_hf_model}", "parallel.sequence_parallel_size=2"]
    r = run_script("finetune.py", *common, f"sft.train={data}", "sft.packing=true", "model.attn_implementation=flex_attention")
    assert r.returncode == 2 and "sft.packing: packed rows under parallel.sequence_parallel_size=2 need" in r.stderr
    assert "model.attn_implementation=sdpa or flash_attention_2" in r.stderr
    assert "set sft.packing=false" in r.stderr and "Traceback" not in r.stderr
    r = run_script("finetune.py", *common, "task=classification", f"classification.train={data}")
    assert r.returncode == 2 and "task=classification cannot train with sequence parallelism" in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- equality with one rank


def _losses(run: Path) -> list[float]:
    return json.loads((run / "losses.json").read_text())["losses"]


def _pretrain(out: Path, data: Path, config: str, sp: int, *extra: str, ranks: int | None = None):
    args = [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "data.seq_len=64", "train.micro_batch_size=2",
            f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_batches=2", "train.eval_every=4",
            "checkpoint.every=0", f"deepspeed.config={config}", "deepspeed.memory_check=false",
            f"parallel.sequence_parallel_size={sp}", *SCALE_SENSITIVE, *extra]
    env = {"OMP_NUM_THREADS": "1"}
    ranks = ranks or sp
    r = run_ranks("train.py", *args, ranks=ranks, env=env) if ranks > 1 else run_script("train.py", *args, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_dataset):
    """Losses of 1 rank without SP: ZeRO-0 (also ZeRO-1/2: the same initial weights) and ZeRO-3
    (the model is built under zero.Init, which draws other initial weights)."""
    base = tmp_path_factory.mktemp("sp-base")
    return {z: _losses(base / f"z{z}") if _pretrain(base / f"z{z}", tiny_dataset, f"ds_configs/zero{z}.json", 1) else None
            for z in (0, 3)}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_pretraining_sp2_on_two_ranks_equals_one_rank(stage: int, one_rank, tiny_dataset: Path, tmp_path: Path):
    # with ALST's memory savers (pipeline/training/tiling.py: 32 tokens per rank in tiles of 8): ZeRO-1 the
    # tiled MLP, ZeRO-2 activation checkpointing (the layers recomputed in the backward, all-to-alls included)
    # and the tiled head + loss, ZeRO-3 all three; ZeRO-0 plain
    tiles = ["model.tile_tokens=8"]
    extra = {1: ["model.tiled_mlp=true", *tiles],
             2: ["model.activation_checkpointing=true", "model.tiled_logits=true", *tiles],
             3: ["checkpoint.every=4", "model.activation_checkpointing=true", "model.tiled_mlp=true", "model.tiled_logits=true",
                 *tiles]}.get(stage, [])
    r = _pretrain(tmp_path / "sp", tiny_dataset, f"ds_configs/zero{stage}.json", 2, *extra)
    assert "train: 2 rank(s) (data-parallel 1 x sequence-parallel 2)" in r.stdout
    sp, base = _losses(tmp_path / "sp"), one_rank[3 if stage == 3 else 0]
    assert len(sp) == len(base) == STEPS
    assert max(abs(a - b) for a, b in zip(sp, base)) < 1e-5, (sp, base)
    ds = json.loads((tmp_path / "sp" / "ds_config.json").read_text())
    assert ds["sequence_parallel_size"] == 2 and ds["train_batch_size"] == 2  # micro 2 x accum 1 x dp 1
    step = tmp_path / "sp" / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((step / "meta.json").read_text())["sequence_parallel_size"] == 2
    if stage == 3:  # exact resume under SP: from step 4 into another run directory
        mid = tmp_path / "sp" / "checkpoints" / "step-00000004"
        r = _pretrain(tmp_path / "resumed", tiny_dataset, "ds_configs/zero3.json", 2, f"checkpoint.resume={mid}", *extra[1:])
        assert f"resumed from {mid} at step 4" in r.stdout
        resumed = _losses(tmp_path / "resumed")
        assert len(resumed) == STEPS - 4 and max(abs(a - b) for a, b in zip(resumed, sp[4:])) <= 1e-6, (resumed, sp[4:])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("packing", [False, True])
def test_masked_sft_sp2_on_two_ranks_equals_one_rank(packing: bool, tmp_path: Path, tiny_hf_model: Path):
    from pipeline.data.sample import generate_qa

    qa = list(generate_qa(80))
    if packing:  # short prompts: two examples of ~32 tokens per 64-token row, the second on the second rank's half
        qa = [{"prompt": f"q{i}", "response": x["response"]} for i, x in enumerate(qa)]
    data = write_jsonl(tmp_path / "qa.jsonl", qa)

    def finetune(out: Path, sp: int, *savers: str):
        args = [f"output={out}", f"model.path={tiny_hf_model}", f"sft.train={data}", "sft.seq_len=64",
                f"sft.packing={str(packing).lower()}", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                "train.warmup_steps=2", "train.lr=3e-3", "train.eval_batches=2", "train.eval_every=4", "checkpoint.every=0",
                "deepspeed.config=ds_configs/zero3.json", "deepspeed.memory_check=false",
                f"parallel.sequence_parallel_size={sp}", *SCALE_SENSITIVE, *savers]
        env = {"OMP_NUM_THREADS": "1"}
        r = run_ranks("finetune.py", *args, env=env) if sp > 1 else run_script("finetune.py", *args, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return _losses(out), r

    # unpacked: SP with the tiled MLP and the tiled head + loss (masked prompts across tiles of 8 of the 32
    # tokens per rank). packed: several examples per row, documents across the two ranks' halves, kept apart
    # by sdpa per document (one rank: the block-diagonal mask), recomputed under activation checkpointing
    base, r = finetune(tmp_path / "one", 1)
    savers = (["model.activation_checkpointing=true"] if packing else
              ["model.tiled_mlp=true", "model.tiled_logits=true", "model.tile_tokens=8"])
    sp, _ = finetune(tmp_path / "sp", 2, *savers)
    if packing:
        examples, rows = (int(x) for x in re.search(r"sft: (\d+) train / \d+ val examples in (\d+) rows", r.stdout).groups())
        assert examples > 1.5 * rows, r.stdout  # rows hold several documents
    assert len(sp) == len(base) == STEPS
    assert max(abs(a - b) for a, b in zip(sp, base)) < 1e-5, (sp, base)


def test_the_planner_sizes_activations_by_the_tokens_one_rank_holds(tiny_dataset: Path, tmp_path: Path):
    from pipeline.training.plan import GiB, Target, activation_bytes, estimate_config
    from pipeline.training.resolve import recipe_from

    target = Target(gpus_per_node=2, nodes=1, gpu_memory=0, cpu_memory=64 * GiB)
    rows = {}
    for sp in (1, 2):
        cfg, conf = _train_cfg(tiny_dataset, f"output={tmp_path / 'run'}", "data.seq_len=512", f"parallel.sequence_parallel_size={sp}")
        r = recipe_from(cfg, conf, seq_len=512, head="causal_lm", precision="fp32")
        assert (r.sp, r.local_seq) == (sp, 512 // sp)
        rows[sp] = estimate_config(r, "ds_configs/zero3.json", target, r.micro_batch, False)
    assert rows[2].activations == activation_bytes(r.facts, r.micro_batch, 256, "fp32", False)
    plain = dataclasses.replace(r.facts, sp=1)  # the same model without the Ulysses all-to-all's extra h per layer
    assert rows[2].activations < rows[1].activations == activation_bytes(plain, r.micro_batch, 512, "fp32", False)


@pytest.mark.slow
@pytest.mark.integration
def test_a_checkpoint_resumes_with_another_data_x_sequence_split(tiny_dataset: Path, tmp_path: Path):
    """SP=2 x dp=1 to step 8, then SP=1 x dp=2 on the same 2 ranks (global batch 4 both ways): ZeRO-3
    partitions over all ranks either way and the sampler counts global samples, so steps 9-10
    equal those of the SP run itself."""
    batch = ["train.global_batch_size=4", "train.max_steps=10"]
    _pretrain(tmp_path / "sp", tiny_dataset, "ds_configs/zero3.json", 2, *batch, "checkpoint.every=8")
    mid = tmp_path / "sp" / "checkpoints" / "step-00000008"
    r = _pretrain(tmp_path / "dp", tiny_dataset, "ds_configs/zero3.json", 1, *batch, f"checkpoint.resume={mid}", ranks=2)
    assert f"resumed from {mid} at step 8" in r.stdout and "sequence-parallel" not in r.stdout
    assert json.loads((tmp_path / "sp" / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    assert json.loads((tmp_path / "dp" / "ds_config.json").read_text())["gradient_accumulation_steps"] == 1
    full, resumed = _losses(tmp_path / "sp"), _losses(tmp_path / "dp")
    assert len(resumed) == 2 and max(abs(a - b) for a, b in zip(resumed, full[8:])) < 1e-5, (resumed, full[8:])

"""Preference tuning (task=dpo): the loss equals TRL's, the masks, the stage on 1 and 2 ranks,
exact resume, the stored reference, learning on the sample's preference pairs, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_ranks, run_script, write_jsonl
from inproc import run_entry
from pipeline.data.preference import PreferenceDataConfig, collate, normalize_pair, prepare
from pipeline.errors import UserError
from pipeline.training.tasks.dpo import DPOConfig, DPOLoss, evaluate_pairs, sequence_logps

ENV = {"OMP_NUM_THREADS": "1"}
PAD = 3


def _llama(positions: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=positions, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


def _model(seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_llama(), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama (256 positions) in Hugging Face format with the sample tokenizer beside it."""
    out = tmp_path_factory.mktemp("dpo") / "model"
    _model(0).save_pretrained(out)
    for f in Path(tiny_tokenizer).iterdir():
        shutil.copy2(f, out / f.name)
    return out


def _pairs(path: Path, n: int = 40) -> Path:
    return write_jsonl(path, [{"prompt": f"What color is the flag of town {i}?", "chosen": f"The flag is {'red' if i % 2 else 'blue'}.",
                               "rejected": f"green {i}"} for i in range(n)])


# ---------------------------------------------------------------------------- the numbers: TRL as the reference
def _trl_trainer(model, ref, tok, loss_type: list[str], weights: list[float] | None, rows: list[dict]):
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    # bf16=False: TRL's config turns bf16 on by default, and Accelerate then autocasts CPU forwards
    args = TRLConfig(output_dir=str(Path(tok.name_or_path).parent / "trl"), beta=0.1, loss_type=loss_type, loss_weights=weights,
                     report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)


@pytest.mark.parametrize("loss, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_loss_and_rewards_equal_trl_dpo_trainer(tmp_path, tok, loss, sft_weight):
    """On one batch of the same pairs, model and reference, our loss, rewards, reward accuracy and
    log-probs equal TRL DPOTrainer's (its ``_compute_loss`` on our token ids, with the completion
    mask of our trained tokens): sigmoid, IPO, and sigmoid + SFT term (TRL's ["sigmoid", "sft"])."""
    rows = [json.loads(x) for x in _pairs(tmp_path / "p.jsonl", 6).read_text().splitlines()]
    cfg = DPOConfig(train=str(tmp_path / "p.jsonl"), val_fraction=0.0, seq_len=64, beta=0.1, loss=loss, sft_weight=sft_weight)
    data = prepare(cfg, tok)
    policy, ref = _model(0), _model(1)
    plain = collate(data.train[:4], pad_id=PAD)
    with torch.no_grad():
        ref_rows = sequence_logps(ref, plain)[0].double()
    table = np.zeros((len(data.train), 2))
    table[:4] = torch.stack([ref_rows[:4], ref_rows[4:]], 1).numpy()
    batch = collate(data.train[:4], pad_id=PAD, reference=table)
    ours = DPOLoss(cfg)
    chosen_tokens = float((batch["labels"][:4] != -100).sum())
    ours.window_totals([4.0, 0.0, chosen_tokens] if sft_weight else [4.0, 0.0])
    with torch.no_grad():
        total, n = ours.loss(policy, batch)
    sums, count = ours.step_sums()

    tok.chat_template = data.template
    trl = _trl_trainer(policy, ref, tok, [loss] + (["sft"] if sft_weight else []), [1.0, sft_weight] if sft_weight else None, rows)
    trained = (batch["labels"] != -100).long()  # labels[t] is token t+1: TRL's mask is on the tokens themselves
    completion = torch.cat([torch.zeros_like(trained[:, :1]), trained[:, :-1]], 1)
    with torch.no_grad():
        expected = trl._compute_loss(policy, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                              "completion_mask": completion}, False)
    m = trl._metrics["eval"]
    assert float(total) / int(n) == pytest.approx(float(expected), abs=1e-5)
    assert sums["reward_chosen"] / count == pytest.approx(m["rewards/chosen"][-1], abs=1e-5)
    assert sums["reward_rejected"] / count == pytest.approx(m["rewards/rejected"][-1], abs=1e-5)
    assert sums["reward_margin"] / count == pytest.approx(m["rewards/margins"][-1], abs=1e-5)
    assert sums["reward_accuracy"] / count == pytest.approx(m["rewards/accuracies"][-1], abs=1e-9)
    assert sums["logps_chosen"] / count == pytest.approx(m["logps/chosen"][-1], rel=1e-6)
    assert sums["logps_rejected"] / count == pytest.approx(m["logps/rejected"][-1], rel=1e-6)


def test_label_smoothing_is_conservative_dpo(tmp_path, tok):
    """label_smoothing ε: -(1-ε) log σ(βΔ) - ε log σ(-βΔ) per pair (cDPO; TRL 1.13's sigmoid has no ε)."""
    _pairs(tmp_path / "p.jsonl", 4)
    cfg = DPOConfig(train=str(tmp_path / "p.jsonl"), val_fraction=0.0, seq_len=64, label_smoothing=0.2, beta=0.5)
    data = prepare(cfg, tok)
    policy, ref = _model(0), _model(1)
    batch = collate(data.train, pad_id=PAD)
    with torch.no_grad():
        pi, r = sequence_logps(policy, batch)[0].double(), sequence_logps(ref, batch)[0].double()
        total, n = DPOLoss(cfg, reference=ref).loss(policy, batch)
    delta = (pi[:4] - r[:4]) - (pi[4:] - r[4:])
    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = sum(-0.8 * log_sigmoid(0.5 * d) - 0.2 * log_sigmoid(-0.5 * d) for d in delta.tolist())
    assert int(n) == 4 and float(total) == pytest.approx(expected, rel=1e-5)


def test_tokens_are_trls_except_the_separator_after_the_end_of_turn(tmp_path, tok):
    """TRL tokenizes prompt and prompt+answer with the chat template; our rows are the same ids,
    cut after the answer's end-of-turn token: TRL also scores the template's separator after it,
    which SFT never trains (pipeline.data.sft), so we do not either."""
    rows = [json.loads(x) for x in _pairs(tmp_path / "p.jsonl", 4).read_text().splitlines()]
    data = prepare(PreferenceDataConfig(train=str(tmp_path / "p.jsonl"), val_fraction=0.0, seq_len=64), tok)
    tok.chat_template = data.template
    trl = _trl_trainer(_model(0), _model(1), tok, ["sigmoid"], None, rows)
    for ours, theirs in zip(data.train, trl.train_dataset):
        p = len(theirs["prompt_ids"])
        for (ids, mask), answer in ((ours.chosen, theirs["chosen_ids"]), (ours.rejected, theirs["rejected_ids"])):
            assert ids[:p] == theirs["prompt_ids"] and not any(mask[:p])  # the prompt: same ids, no log-prob
            assert all(mask[p:]) and answer[:len(ids) - p] == ids[p:]
            assert ids[-1] == tok.eos_token_id and tok.decode(answer[len(ids) - p:]).strip() == ""


# ---------------------------------------------------------------------------- records and masks
def test_record_shapes_normalise_to_one_pair():
    user = [{"role": "user", "content": "Q?"}]
    one = normalize_pair({"prompt": "Q?", "chosen": "A", "rejected": "B"}, "f:1")
    assert one.prompt == user and one.chosen == [{"role": "assistant", "content": "A"}]
    shapes = [
        {"messages": user, "chosen": "A", "rejected": "B"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "A"}], "rejected": {"role": "assistant", "content": "B"}},
        {"prompt": "Q?", "chosen": user + [{"role": "assistant", "content": "A"}], "rejected": user + [{"role": "assistant", "content": "B"}]},
        {"chosen": user + [{"role": "assistant", "content": "A"}], "rejected": user + [{"role": "assistant", "content": "B"}]},
    ]
    for rec in shapes:
        p = normalize_pair(rec, "f:1")
        assert (p.prompt, p.chosen, p.rejected) == (one.prompt, one.chosen, one.rejected), rec
    sys = normalize_pair({"prompt": "Q?", "system": "Be brief.", "chosen": "A", "rejected": "B"}, "f:1")
    assert sys.prompt[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "Q", "chosen": "A"}, "f:3: no 'rejected'"),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": 5, "chosen": "A", "rejected": "B"}, "'prompt' is a number"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"}], "chosen": "A", "rejected": "B"},
     "the prompt ends with an assistant message"),
    ({"chosen": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user", "content": "R"}]}, "share no leading message"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"}, "'chosen' starts with a user message"),
])
def test_bad_records_are_named_with_file_and_line(record, problem):
    with pytest.raises(UserError, match="expected") as e:
        normalize_pair(record, "f:3")
    assert problem in str(e.value)


def test_only_the_answers_carry_log_probs_not_the_prompt_nor_its_assistant_turns(tmp_path, tok):
    """A multi-turn prompt with an earlier assistant reply: only the final answer's tokens (and its
    EOS) have labels; --inspect marks exactly those."""
    from pipeline.data.preference import inspect

    prompt = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Earlier reply"},
              {"role": "user", "content": "Another one?"}]
    write_jsonl(tmp_path / "p.jsonl", [{"messages": prompt, "chosen": "Blue it is", "rejected": "No"}])
    data = prepare(PreferenceDataConfig(train=str(tmp_path / "p.jsonl"), val_fraction=0.0, seq_len=128), tok)
    batch = collate(data.train, pad_id=PAD)
    for row, answer in ((0, "Blue it is"), (1, "No")):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert tok.decode(kept).replace(" ", "") == f"{answer}</s>".replace(" ", "")  # the answer and its EOS, nothing else
    text = inspect(tok, data.train, 1, color=False)
    assert "[[Earlier" not in text and "Earlier reply" in text and "it is</s>]]" in text and "No</s>]]" in text
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()


def test_evaluate_pairs_counts_only_real_batches(tmp_path, tok):
    from pipeline.data.preference import PairBatches

    _pairs(tmp_path / "p.jsonl", 5)
    cfg = DPOConfig(train=str(tmp_path / "p.jsonl"), val_fraction=0.0, seq_len=64)
    data = prepare(cfg, tok)
    policy, ref = _model(0), _model(1)
    loss = DPOLoss(cfg, reference=ref)
    one = evaluate_pairs(policy, loss, PairBatches(data.train, 0, 1, 2, pad_id=PAD))
    # rank 1 of 2 holds 1 real batch and one repeated (not real) pass: its metrics alone are its real pairs'
    with torch.no_grad():
        pi = sequence_logps(policy, collate(data.train, pad_id=PAD))[0]
        r = sequence_logps(ref, collate(data.train, pad_id=PAD))[0]
    assert one["logps_chosen"] == pytest.approx(float(pi[:5].mean()), rel=1e-6)
    assert one["reward_margin"] == pytest.approx(float(0.1 * ((pi[:5] - r[:5]) - (pi[5:] - r[5:])).mean()), rel=1e-5)
    assert policy.training  # handed back in training mode


def test_stored_reference_is_reused_only_for_the_same_model_and_pairs(tmp_path, tok, model_dir, capsys):
    """setup() computes the starting model's log-probs once and stores them; a second launch reads
    them back; rewritten weights or other pairs make it compute them again."""
    import os
    from types import SimpleNamespace

    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.training.tasks import TASKS

    def task(n: int):
        t = TASKS["dpo"](FinetuneConfig(task="dpo", dpo=DPOConfig(train=str(_pairs(tmp_path / f"p{n}.jsonl", n)), seq_len=64)))
        t.prepare(tok)
        return t

    run = SimpleNamespace(out=tmp_path / "run", rank=0, dp_rank=0, dp_world=1, micro=3)
    model = _model(0)
    first = task(10)
    first.setup(run, model, model_dir)
    assert "reference log-probs: 10 + 0 pairs in" in capsys.readouterr().out
    with torch.no_grad():
        rows = sequence_logps(model, collate(first.data.train, pad_id=PAD))[0].double()
    assert np.allclose(first.tables["train"], torch.stack([rows[:10], rows[10:]], 1).numpy(), atol=1e-5)
    task(10).setup(run, _model(5), model_dir)  # other weights in memory, same model directory: read back
    assert "read from" in capsys.readouterr().out
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    task(10).setup(run, model, model_dir)
    assert "reference log-probs: 10 + 0 pairs in" in capsys.readouterr().out
    task(11).setup(run, model, model_dir)
    assert "reference log-probs: 11 + 0 pairs in" in capsys.readouterr().out
    train = task(11).loaders(SimpleNamespace(dp_rank=0, dp_world=1, micro=2, accum=1, consumed_samples=None), 0)[0]
    assert "reference" not in next(iter(train))  # tables only after setup


# ---------------------------------------------------------------------------- the stage
def _stage(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    # global batch 4 = micro 2 x accum 2 on 1 rank = micro 2 x 2 ranks: the same pairs per step
    return [f"output={out}", "task=dpo", f"model.path={model}", f"dpo.train={data}", "dpo.val_fraction=0.2", "dpo.seq_len=64",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=8", "train.lr=1e-3", "train.warmup_steps=0",
            "train.eval_every=4", "train.eval_batches=4", "monitor.log_every=1", "checkpoint.every=4", "checkpoint.keep_last=0",
            "dpo.sft_weight=0.3", "deepspeed.config=ds_configs/zero3_offload.json", *extra]


def _losses(run: Path) -> dict:
    return json.loads((run / "losses.json").read_text())


def _evals(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("eval step")]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_resume_is_exact_and_the_reference_is_stored(tmp_path: Path, model_dir: Path):
    """ZeRO-3 + offload: 1 rank (accumulation 2) vs 2 ranks with a frozen reference model
    (reference=model) vs stored reference log-probs: the same losses and eval metrics. A resume
    from step 4 into a new run recomputes the reference before the checkpoint loads (same numbers);
    a relaunch of the same run reads the stored one back."""
    data = _pairs(tmp_path / "pairs.jsonl")
    one = run_script("finetune.py", *_stage(tmp_path / "one", model_dir, data), env=ENV)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    n_train, n_val = map(int, re.search(r"dpo: (\d+) train / (\d+) val pairs", one.stdout).groups())
    assert n_train + n_val == 40 and n_val > 0  # val_fraction 0.2 by a hash of each pair
    assert f"reference log-probs: {n_train} + {n_val} pairs in" in one.stdout
    meta = json.loads((tmp_path / "one" / "reference" / "meta.json").read_text())
    with np.load(tmp_path / "one" / "reference" / "logps.npz") as z:
        assert z["train"].shape == (n_train, 2) and z["val"].shape == (n_val, 2) and (z["train"] < 0).all()
    assert meta["pairs"] == {"train": n_train, "val": n_val}
    step = tmp_path / "one" / "checkpoints" / "step-00000008"
    ck = json.loads((step / "meta.json").read_text())
    assert ck["task"] == "dpo" and ck["dpo"]["sft_weight"] == 0.3 and ck["eos_token_ids"]
    assert all("| reward_accuracy " in x for x in one.stdout.splitlines() if x.startswith("step "))

    two = run_ranks("finetune.py", *_stage(tmp_path / "two", model_dir, data, "dpo.reference=model"), env=ENV)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert not (tmp_path / "two" / "reference").exists()  # a frozen model instead of stored log-probs
    assert _losses(tmp_path / "two")["losses"] == pytest.approx(_losses(tmp_path / "one")["losses"], abs=1e-5)
    assert _evals(two.stdout) == _evals(one.stdout) and len(_evals(one.stdout)) == 2

    resumed = run_script("finetune.py", *_stage(tmp_path / "resumed", model_dir, data,
                                                 f"checkpoint.resume={tmp_path / 'one' / 'checkpoints' / 'step-00000004'}"), env=ENV)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"reference log-probs: {n_train} + {n_val} pairs in" in resumed.stdout  # computed with the starting weights, then loaded
    r = _losses(tmp_path / "resumed")
    assert r["start_step"] == 4 and r["losses"] == pytest.approx(_losses(tmp_path / "one")["losses"][4:], abs=1e-6)

    shutil.rmtree(step)
    (tmp_path / "one" / "checkpoints" / "latest").write_text("step-00000004")
    again = run_script("finetune.py", *_stage(tmp_path / "one", model_dir, data), env=ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reference log-probs: read from" in again.stdout
    assert _losses(tmp_path / "one")["losses"] == pytest.approx(r["losses"], abs=1e-6)


@pytest.mark.slow
def test_dpo_learns_the_chosen_style_on_held_out_prompts(tmp_path: Path, model_dir: Path, tok):
    """The sample's preference pairs whose rejected answer is the bare word (the fine-tuned sample
    model's style) and whose chosen one is the sentence "The answer is <word>.": held-out preference
    accuracy (log π(chosen) > log π(rejected)) rises from the starting model's to >= 0.9, and greedy
    generation on a held-out prompt follows the chosen style."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data import chat
    from pipeline.data.sample import generate_preference
    from pipeline.stages.export import export

    train = write_jsonl(tmp_path / "train.jsonl", [r for r in generate_preference(600, split="train", train_size=600)
                                                   if r["rejects"] == "style"])
    test = write_jsonl(tmp_path / "test.jsonl", [r for r in generate_preference(80, split="test", train_size=600)
                                                 if r["rejects"] == "style"])
    r = run_script("finetune.py", f"output={tmp_path / 'run'}", "task=dpo", f"model.path={model_dir}", f"dpo.train={train}",
                   f"dpo.val={test}", "dpo.seq_len=128", "dpo.sft_weight=1.0", "train.micro_batch_size=8", "train.max_steps=40",
                   "train.lr=5e-3", "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=5", "monitor.log_every=10",
                   "checkpoint.every=0", "deepspeed.config=ds_configs/zero2.json", env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    export(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    data = prepare(PreferenceDataConfig(train=str(test), val_fraction=0.0, seq_len=128), tok)

    def accuracy(model) -> float:
        with torch.no_grad():
            logps = sequence_logps(model.eval(), collate(data.train, pad_id=PAD))[0]
        n = len(data.train)
        return float((logps[:n] > logps[n:]).double().mean())

    before = accuracy(AutoModelForCausalLM.from_pretrained(model_dir))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    after = accuracy(tuned)
    assert before < 0.5 and after >= 0.9, (before, after)
    trained_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = json.loads(test.read_text().splitlines()[0])["prompt"]
    ids = chat.render_prompt(trained_tok, [{"role": "user", "content": prompt}], trained_tok.chat_template)
    out = tuned.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert trained_tok.decode(out[0, len(ids):], skip_special_tokens=True).startswith("The answer is")


@pytest.mark.parametrize("extra, message", [
    (["dpo.beta=0"], "dpo.beta: must be > 0"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: applies to loss=sigmoid only"),
    (["model.tiled_logits=true"], "model.tiled_logits: task=dpo computes each row's log-probability"),
    (["parallel.sequence_parallel_size=2"], "task=dpo cannot train with sequence parallelism"),
    (["dpo.train=BAD"], "bad.jsonl:2: no 'rejected'"),
    (["dpo.train=/nowhere/pairs.jsonl"], "dpo.train '/nowhere/pairs.jsonl' does not exist"),
])
def test_user_errors_exit_2_before_any_work(tmp_path: Path, model_dir: Path, extra, message, monkeypatch, capsys):
    good = _pairs(tmp_path / "good.jsonl", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    argv = [f"output={tmp_path / 'run'}", "task=dpo", f"model.path={model_dir}", f"dpo.train={good}", "dpo.seq_len=64",
            *[e.replace("BAD", str(bad)) for e in extra]]
    code, _, err = run_entry("finetune.py", argv, monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()

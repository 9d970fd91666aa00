"""Benchmark of the fine-tune stage's DPO task against TRL's ``DPOTrainer`` (issue 15).

    python bench/dpo.py [--workdir bench/.work/dpo] [--repeats 2] [--steps 12] [--warmup 3] [--pairs 256]
                        [--only a,b,t,tp[,tg]] [--quick] [--quiet-wait 0] [--retries 1] [--timeout 420]
                        [--no-warmup-run] [--report]

Goal of the issue: tokens/s of the stage with a frozen reference model >= 1.0 x TRL's default,
and with precomputed reference log-probs (the stage's default) >= 1.3 x TRL's default.

Setup, the same for every contender: a Llama (hidden 256, 4 layers, 4 heads, MLP 688, vocabulary
8192; random weights saved once as a Hugging Face directory, with a 2048-piece SentencePiece
tokenizer trained on the built-in sample -- the 6144 further embedding rows are never read, as in
any padded vocabulary -- and the stage's built-in chat template saved in the tokenizer, so both
render the same text), the same pairs (``--pairs`` reading-task prompts of
:func:`pipeline.data.sample.generate_reading`; chosen: the passage's sentence with the answer,
then "So the answer is <word>."; rejected: the same with another word of the same kind), 2 CPU
ranks (gloo, ``OMP_NUM_THREADS=1`` each, ``deepspeed --num_gpus 2``), micro-batch 4 pairs (8 rows
per forward), no accumulation, sigmoid loss with beta 0.1, max length 256 (nothing is cut), fp32,
and ``ds_configs/zero3_offload.json`` (ZeRO-3, optimizer and parameters offloaded) as the stage
resolves it (:func:`pipeline.training.ds_config.resolve_for_recipe`), written out and given to TRL as
``DPOConfig(deepspeed=<that dict>)``; every stage run checks that its own ``ds_config.json`` is
the same dict. TRL runs with ``bf16=False`` (``DPOConfig`` defaults bf16 on, and accelerate then
autocasts the CPU forwards to bf16) and gets the optimizer values written in the JSON.

* (a) ``stage-model``: ``launch/finetune.py task=dpo dpo.reference=model``: a frozen ZeRO-3
  reference engine runs beside the trained model on every micro-batch.
* (b) ``stage-precompute``: the same with ``dpo.reference=precompute`` (the default): the
  reference log-probs of every pair are computed in one pass before step 1.
* (t) ``trl``: ``DPOTrainer(model=<dir>)`` with its defaults: the reference model loaded from the
  same directory and wrapped by TRL's ``prepare_deepspeed`` (ZeRO-3), ``precompute_ref_log_probs=False``.
* (tp) ``trl-precompute``: (t) with ``precompute_ref_log_probs=True`` (reported beside (b) for fairness).
* (tg) (t) with ``DPOConfig``'s own default ``gradient_checkpointing=True`` (optional, ``--only``): TRL
  out of the box recomputes every layer's forward in the backward. (t) and (tp) turn it off, as the
  stage's ``model.activation_checkpointing`` defaults off, so that all do the same arithmetic.

Data order: every contender trains on the very same pairs per rank and step. The benchmark
builds the stage's own loader (:class:`pipeline.data.preference.PairLoader`, the stage's seed) to
learn which pairs rank ``r`` reads at step ``t``, and writes them for TRL in that order (then the
pairs never reached, so both reference passes cover the same pairs); TRL's sequential sampler and
accelerate's batch sharding then deal global micro-batch ``2t + r`` to rank ``r``.

Tokens are counted the same way for all: the real (unpadded) tokens of the chosen and rejected
rows of the pairs of each measured step, as the stage encodes them (prompt, answer, end-of-turn
token) -- the count the stage's console ``tok/s`` uses. TRL's own count (``num_tokens``: its
attention-mask sum) is recorded too: its rows are longer by the template's separator after the
end-of-turn token (the stage drops tokens after the last trained one; see docs/benchmarks.md).

Timing, as in ``bench/train.py``: the benchmark timestamps every stdout line when it arrives; the
stage prints ``step N | ...`` every step (``monitor.log_every=1``), TRL's rank 0 prints ``BENCH step N``
from a callback at every step end. Throughput = tokens of steps ``warmup+1 .. warmup+steps`` /
(arrival of the last step - arrival of step ``warmup``): the first steps and the one-off reference
pass (before step 1) are excluded. The one-off pass is reported on its own: the stage prints its
duration; for TRL the worker times ``DPOTrainer._precompute_ref_logps`` (which also builds TRL's
DeepSpeed inference engine for the pass).

The contenders run interleaved (the order rotates every repetition), so load from other
processes hits all of them alike; the report gives medians and ratios of medians (and the median
of the ratios of runs of the same repetition). Every run records the 1-minute load average at
its start and end and the cores other processes kept busy during it (``others``).

Results: a Markdown table on stdout and ``<workdir>/<quick|full>/results.json``; logs under ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import launch, log, machine, median, run_env, wait_quiet
WORKER = ROOT / "bench" / "_dpo_trl.py"
CONTENDERS = ("a", "b", "t", "tp", "tg")
STAGES = ("a", "b")
LABEL = {"a": "(a) stage, dpo.reference=model", "b": "(b) stage, dpo.reference=precompute",
         "t": "(t) TRL DPOTrainer (reference model)", "tp": "(tp) TRL DPOTrainer, precompute_ref_log_probs=True",
         "tg": "(tg) (t) with DPOConfig's default gradient_checkpointing=True"}
RATIOS = (("a", "t"), ("b", "t"), ("b", "tp"), ("tp", "t"), ("b", "a"), ("a", "tg"), ("b", "tg"), ("t", "tg"))
GOALS = {"a/t": 1.0, "b/t": 1.3}
RANKS = 2
STEP_LINE = re.compile(r"(?:^|\s)step (\d+) \| loss ([-\d.naninf]+) ")
REF_LINE = re.compile(r"reference log-probs: (\d+) \+ (\d+) pairs in ([\d.]+) s")

FULL = {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 688, "vocab": 8192, "tok_vocab": 2048, "seq_len": 256,
        "micro": 4, "pairs": 256}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 172, "vocab": 8192, "tok_vocab": 2048, "seq_len": 256,
         "micro": 4, "pairs": 64}
BETA = 0.1


def _env() -> dict:
    return run_env(ROOT, TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")


# ---------------------------------------------------------------------------- setup


def make_pairs(n: int, seed: int = 1234) -> list[dict]:
    """``n`` preference pairs from the sample's reading task (see the module docstring)."""
    from pipeline.data import sample

    rng = random.Random(seed + 15)
    out = []
    for rec in sample.generate_reading(n, seed):
        word, kind = rec["response"], rec["kind"]
        passage = rec["prompt"].split("\n")[0].removeprefix("Passage: ")
        sentence = next((s.strip() for s in re.split(r"(?<=\.)\s+", passage) if re.search(rf"\b{re.escape(word)}\b", s)),
                        passage)
        other = rng.choice([v for v in sample._VALUES[kind] if v != word])
        wrong = re.sub(rf"\b{re.escape(word)}\b", other, sentence)
        answer = "Reading the passage again: {p} The sentence that answers the question: {s} So the answer is {w}."
        out.append({"prompt": rec["prompt"], "chosen": answer.format(p=passage, s=sentence, w=word),
                    "rejected": answer.format(p=re.sub(rf"\b{re.escape(word)}\b", other, passage), s=wrong, w=other)})
    return out


def stage_overrides(m: dict, model_dir: Path, pairs: Path, output: Path, max_steps: int, reference: str) -> list[str]:
    return [
        "task=dpo", f"model.path={model_dir}", f"dpo.train={pairs}", "dpo.val_fraction=0", f"dpo.seq_len={m['seq_len']}",
        f"dpo.beta={BETA}", "dpo.loss=sigmoid", f"dpo.reference={reference}", f"output={output}",
        f"train.micro_batch_size={m['micro']}", "train.grad_accum=1", f"train.max_steps={max_steps}",
        "train.eval_every=0", "checkpoint.every=0", "monitor.log_every=1",
        "deepspeed.config=ds_configs/zero3_offload.json", "deepspeed.precision=fp32",
    ]


def prepare(workdir: Path, m: dict, max_steps: int) -> dict:
    """Tokenizer, model directory, pairs, the stage's resolved DeepSpeed JSON, TRL's ordered pairs and spec."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from pipeline.config import load_config
    from pipeline.data import chat
    from pipeline.data.preference import PairLoader
    from pipeline.data.preference import prepare as prepare_pairs
    from pipeline.data.sample import generate
    from pipeline.data.tokenizer import TokenizerConfig
    from pipeline.data.tokenizer_train import train_sentencepiece
    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.training.ds_config import resolve_for_recipe

    tok_dir = workdir.parent / f"tokenizer-{m['tok_vocab']}"
    if not (tok_dir / "tokenizer.json").exists():
        log(f"training a {m['tok_vocab']}-piece SentencePiece tokenizer on the built-in sample")
        train_sentencepiece(iter(generate(3000, seed=7)), TokenizerConfig(vocab_size=m["tok_vocab"], sample_chars=10**6),
                            tok_dir, threads=1)
    model_dir = workdir / "model"
    if not (model_dir / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
        tok.chat_template = chat.BUILTIN_TEMPLATE  # the stage's template, so TRL renders the same text
        conf = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
                           num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["heads"],
                           max_position_embeddings=2 * m["seq_len"], bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    pairs_path = workdir / f"pairs-{m['pairs']}.jsonl"
    if not pairs_path.exists():
        pairs_path.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(m["pairs"])))
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]

    cfg = load_config(FinetuneConfig, None, stage_overrides(m, model_dir, pairs_path, workdir / "unused", max_steps, "precompute"))
    ds = resolve_for_recipe(cfg, cfg.deepspeed.config, world=RANKS, precision="fp32", hidden=m["hidden"])
    (workdir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    # the stage's encoding and data order: which pairs each rank reads at each step, and their tokens
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_pairs(cfg.dpo, tok, "dpo")
    if len(data.train) != len(rows):
        raise SystemExit(f"the stage kept {len(data.train)} of {len(rows)} pairs ({data.stats}); the TRL order would differ")
    loaders = [PairLoader(data.train, r, RANKS, m["micro"], 1, cfg.train.seed, pad_id=tok.pad_token_id) for r in range(RANKS)]
    order, step_tokens = [], []
    for step in range(max_steps):
        n = 0
        for ld in loaders:
            idx = ld.indices(step, 0)
            order += idx
            n += sum(len(data.train[i].chosen[0]) + len(data.train[i].rejected[0]) for i in idx)
        step_tokens.append(n)
    seen = set(order)
    order_all = order + [i for i in range(len(rows)) if i not in seen]  # the rest: same reference pass as the stage
    conv = [{"prompt": [{"role": "user", "content": rows[i]["prompt"]}], "chosen": [{"role": "assistant", "content": rows[i]["chosen"]}],
             "rejected": [{"role": "assistant", "content": rows[i]["rejected"]}]} for i in order_all]  # TRL's conversational form
    (workdir / "pairs_trl_order.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
    spec = {"model_dir": str(model_dir), "pairs_ordered": str(workdir / "pairs_trl_order.jsonl"),
            "ds_config": str(workdir / "ds_config.json"), "micro_batch": m["micro"], "max_steps": max_steps,
            "seed": cfg.train.seed, "warmup_steps": cfg.train.warmup_steps,
            "min_lr_ratio": cfg.train.min_lr_ratio, "beta": BETA, "max_length": m["seq_len"], "workdir": str(workdir / "trl-output")}
    (workdir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    lens = [len(e.chosen[0]) for e in data.train] + [len(e.rejected[0]) for e in data.train]
    return {"model_dir": model_dir, "pairs": pairs_path, "ds": ds, "step_tokens": step_tokens, "order": order, "order_all": order_all,
            "row_tokens": {"min": min(lens), "median": statistics.median(lens), "max": max(lens)},
            "data_stats": data.stats["train"], "train_lr": cfg.train.lr}


# ---------------------------------------------------------------------------- one run


def step_of(c: str, text: str) -> int | None:
    if c in STAGES:
        mt = STEP_LINE.search(text)
        return int(mt.group(1)) if mt else None
    i = text.find("BENCH step ")
    return int(text[i:].split()[2]) if i >= 0 else None


def _dump_stacks(pid: int) -> list[str]:
    """``py-spy dump`` of every Python process under ``pid`` (a hung run's stacks for the log), if py-spy is there."""
    import psutil

    out = []
    if shutil.which("py-spy") is None:
        return ["(py-spy not installed: no stacks)"]
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for k in kids:
        try:
            if "--local_rank" not in " ".join(k.cmdline()):
                continue
            r = subprocess.run(["py-spy", "dump", "-p", str(k.pid)], capture_output=True, text=True, timeout=60, check=False)
            out += [f"--- py-spy dump {k.pid}: {' '.join(k.cmdline())[:200]}"] + (r.stdout + r.stderr).splitlines()
        except (psutil.Error, subprocess.SubprocessError, OSError) as e:
            out.append(f"--- py-spy dump {k.pid} failed: {e}")
    return out



def command(c: str, workdir: Path, m: dict, prep: dict, max_steps: int, out: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from pipeline.rendezvous import free_port

    head = ["deepspeed", "--num_gpus", str(RANKS), "--master_port", str(free_port())]
    if c in STAGES:
        return [*head, str(ROOT / "launch" / "finetune.py"),
                *stage_overrides(m, prep["model_dir"], prep["pairs"], out, max_steps, "model" if c == "a" else "precompute")]
    spec = workdir / "spec.json"
    if json.loads(spec.read_text())["max_steps"] != max_steps:  # the warm-up run
        spec = workdir / f"spec-{max_steps}.json"
        spec.write_text(json.dumps(json.loads((workdir / "spec.json").read_text()) | {"max_steps": max_steps}))
    return [*head, str(WORKER), "--spec", str(spec), *(["--precompute"] if c == "tp" else []),
            *(["--gradient-checkpointing"] if c == "tg" else [])]


def run_one(c: str, workdir: Path, m: dict, prep: dict, max_steps: int, warmup: int, tag: str, ns) -> dict:
    quiet = wait_quiet(ns.quiet_wait) if ns.quiet_wait > 0 else {}
    out = workdir / "runs" / f"{c}-{tag}"
    shutil.rmtree(out, ignore_errors=True)  # the stage would resume from an old checkpoint
    shutil.rmtree(workdir / "trl-output", ignore_errors=True)
    cmd = command(c, workdir, m, prep, max_steps, out)
    log(f"{LABEL[c]} [{tag}] ...")
    load_start = os.getloadavg()[0]
    r = launch(cmd, workdir / "logs" / f"{c}-{tag}.log", ns.timeout, cwd=ROOT, env=_env(), step_fn=lambda text: step_of(c, text),
               cpu_at=(warmup, max_steps), on_timeout=_dump_stacks)
    t0 = r["t_launch"]
    steps: dict[int, dict] = {}
    marks: dict[str, float] = {}
    info: dict = {}
    ref_pass = None
    for ts, text in r.pop("lines"):
        if c in STAGES:
            mt = STEP_LINE.search(text)
            if mt:
                steps[int(mt.group(1))] = {"arrival": ts, "loss": float(mt.group(2))}
            mr = REF_LINE.search(text)
            if mr:
                ref_pass = {"pairs": int(mr.group(1)) + int(mr.group(2)), "s": float(mr.group(3))}
            continue
        if "BENCH " not in text:
            continue
        parts = text[text.index("BENCH "):].split()
        if parts[1] == "step" and len(parts) >= 5:
            steps[int(parts[2])] = {"arrival": ts, "printed": float(parts[3]), "trl_tokens": int(parts[4])}
        elif parts[1] == "mark" and len(parts) >= 4:
            marks[parts[2]] = float(parts[3]) - t0
        elif parts[1] == "info":
            info.update(json.loads(text[text.index("BENCH "):].split(" ", 2)[2]))
    wall = r["wall_s"]
    cpu = {k: u["cpu_s"] for k, u in r["usage_snap"].items()}
    res = {"contender": c, "tag": tag, "rc": r["rc"], "wall_s": wall, "loadavg_1min_start": load_start,
           "loadavg_1min_end": os.getloadavg()[0], "quiet": quiet, "steps_seen": len(steps), "marks_s": marks,
           "info": info, "losses": [steps[s].get("loss") for s in sorted(steps)], "reference_pass": ref_pass}
    ok = r["rc"] == 0 and all(s in steps for s in range(1, max_steps + 1))
    res["ok"] = ok
    if not ok:
        log(f"  FAILED (rc {r['rc']}, {len(steps)}/{max_steps} steps); see {workdir / 'logs' / f'{c}-{tag}.log'}")
        return res
    span = steps[max_steps]["arrival"] - steps[warmup]["arrival"]
    tokens = sum(prep["step_tokens"][warmup:max_steps])
    res.update(tokens_per_s=tokens / span, pairs_per_s=(max_steps - warmup) * m["micro"] * RANKS / span,
               first_step_s=steps[1]["arrival"] - t0,
               step_s=[steps[s]["arrival"] - steps[s - 1]["arrival"] for s in range(warmup + 1, max_steps + 1)])
    if warmup in cpu and max_steps in cpu:  # CPU seconds of the run's processes per measured step, and others' load
        res["cpu_s_per_step"] = (cpu[max_steps] - cpu[warmup]) / (max_steps - warmup)
    # others' busy cores over the whole run: the machine's busy time less the run's own (its waited-for process tree)
    res["others_cores"] = max(0.0, (r["busy_s"] - r["cpu_s"]) / wall) if wall > 0 else 0.0
    if c in STAGES:
        ds_path = out / "ds_config.json"
        res["ds_config_identical"] = ds_path.exists() and json.loads(ds_path.read_text()) == prep["ds"]
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    else:
        res["trl_tokens_per_s"] = (steps[max_steps]["trl_tokens"] - steps[warmup]["trl_tokens"]) / span
        res["trl_tokens_over_stage"] = (steps[max_steps]["trl_tokens"] - steps[warmup]["trl_tokens"]) / tokens
        res["trainer_init_s"] = info.get("trainer_init_s")
        if info.get("precompute_s") is not None:
            res["reference_pass"] = {"pairs": len(prep["order_all"]), "s": info["precompute_s"]}
    log(f"  {res['tokens_per_s']:,.0f} tok/s, first step after {res['first_step_s']:.1f} s, "
        f"load {load_start:.2f}, others {res['others_cores']:.2f} cores")
    return res


# ---------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict:
    s: dict = {}
    for c in CONTENDERS:
        ok = [r for r in runs if r["contender"] == c and r.get("ok")]
        if not ok:
            continue
        tok = [r["tokens_per_s"] for r in ok]
        s[c] = {"runs": len(ok), "tokens_per_s": median(tok), "tokens_per_s_min": min(tok), "tokens_per_s_max": max(tok),
                "step_s_median": median([x for r in ok for x in r["step_s"]]),
                "cpu_s_per_step": median([r.get("cpu_s_per_step") for r in ok]),
                "first_step_s": median([r["first_step_s"] for r in ok]),
                "reference_pass_s": median([(r.get("reference_pass") or {}).get("s") for r in ok]),
                "trainer_init_s": median([r.get("trainer_init_s") for r in ok]),
                "trl_tokens_over_stage": median([r.get("trl_tokens_over_stage") for r in ok]),
                "loadavg": median([(r["loadavg_1min_start"] + r["loadavg_1min_end"]) / 2 for r in ok]),
                "others_cores": median([r.get("others_cores") for r in ok]),
                "ds_config_identical": all(r.get("ds_config_identical", True) for r in ok),
                "loss_step1": median([r["losses"][0] for r in ok if r["losses"] and r["losses"][0] is not None])}
    ratios: dict = {}
    for num, den in RATIOS:
        if num in s and den in s:
            paired = [x["tokens_per_s"] / y["tokens_per_s"] for x in runs for y in runs
                      if x["contender"] == num and y["contender"] == den and x.get("ok") and y.get("ok") and x["tag"] == y["tag"]]
            cn, cd = s[num]["cpu_s_per_step"], s[den]["cpu_s_per_step"]
            ratios[f"{num}/{den}"] = {"of_medians": s[num]["tokens_per_s"] / s[den]["tokens_per_s"],
                                      "paired_median": median(paired), "paired_min": min(paired) if paired else None,
                                      "paired_max": max(paired) if paired else None,
                                      # the same pairs per step: the inverse ratio of CPU seconds per step, which other
                                      # processes' load moves far less than wall time
                                      "cpu_per_step": cd / cn if cn and cd else None}
    goals = {f"{k} >= {v}": ratios[k]["of_medians"] >= v for k, v in GOALS.items() if k in ratios}
    return {"contenders": s, "ratios": ratios, "goals": goals}


def _f(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


def markdown(summary: dict, meta: dict, runs: list[dict]) -> str:
    s, ratios = summary["contenders"], summary["ratios"]
    base = s.get("t", {}).get("tokens_per_s")  # TRL with the same settings as the stage
    rows = [("| contender | tokens/s (median; min-max) | vs (t) | median step, s | CPU s per step (both ranks) "
             "| one-off reference pass, s | first step after, s | load avg (1 min) | others' cores |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in meta["contenders"]:
        if c not in s:
            rows.append(f"| {LABEL[c]} | failed (see results.json) | | | | | | | |")
            continue
        x = s[c]
        ref_cell = "-" if c in ("a", "t", "tg") else _f(x["reference_pass_s"], ".1f")
        rows.append(f"| {LABEL[c]} | {x['tokens_per_s']:,.0f} ({x['tokens_per_s_min']:,.0f}-{x['tokens_per_s_max']:,.0f}) "
                    f"| {_f(x['tokens_per_s'] / base) if base else '-'} | {_f(x['step_s_median'])} | {_f(x['cpu_s_per_step'])} "
                    f"| {ref_cell} | {x['first_step_s']:.1f} | {_f(x['loadavg'], '.2f')} | {_f(x['others_cores'], '.2f')} |")
    out = ["\n".join(rows), ""]
    rr = ["| ratio (tokens/s) | of medians | median of paired runs (min-max) | of CPU s per step (inverse) |",
          "|---|---:|---:|---:|"]
    for k, v in ratios.items():
        rr.append(f"| {k} | {v['of_medians']:.3f} | {_f(v['paired_median'])} ({_f(v['paired_min'])}-{_f(v['paired_max'])}) "
                  f"| {_f(v.get('cpu_per_step'))} |")
    out += ["\n".join(rr), ""]
    rl = ["| run | contender | tokens/s | 1-min load at start / end | others' cores | loss at step 1 |",
          "|---|---|---:|---|---:|---:|"]
    for r in runs:
        tok = f"{r['tokens_per_s']:,.0f}" if r.get("ok") else "failed"
        l1 = r["losses"][0] if r.get("losses") and r["losses"][0] is not None else None
        rl.append(f"| {r['tag']} | {LABEL[r['contender']]} | {tok} | {r['loadavg_1min_start']:.2f} / {r['loadavg_1min_end']:.2f} "
                  f"| {_f(r.get('others_cores'), '.2f')} | {_f(l1, '.4f')} |")
    out += ["Runs in order:", "", "\n".join(rl), ""]
    out += ["| goal | met |", "|---|---|"] + [f"| {k} | {'yes' if v else '**no**'} |" for k, v in summary["goals"].items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/dpo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".work" / "dpo"), help="cache, runs, logs and results")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (medians are reported)")
    p.add_argument("--steps", type=int, default=12, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before the measured ones")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs (default 256; 64 with --quick)")
    p.add_argument("--only", default="a,b,t,tp", help="contenders, comma-separated (default a,b,t,tp; also tg)")
    p.add_argument("--timeout", type=float, default=420, help="seconds before a run is killed (its ranks' stacks are dumped first)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 64 pairs, 4 steps (2 + 2 measured), 1 repetition")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each run, wait up to this many seconds for other processes to use < 0.25 cores (default 0)")
    p.add_argument("--retries", type=int, default=1, help="reruns of a failed run (default 1)")
    p.add_argument("--no-warmup-run", action="store_true", help="skip the untimed first run (page cache, op builds)")
    p.add_argument("--report", action="store_true", help="only print the report of the last results.json again")
    ns = p.parse_args(argv)
    m = dict(QUICK if ns.quick else FULL)
    if ns.pairs:
        m["pairs"] = ns.pairs
    if ns.quick:
        ns.repeats, ns.steps, ns.warmup = 1, 2, 2
    contenders = [c for c in ns.only.split(",") if c]
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad:
        p.error(f"unknown contenders {bad}; choose from {','.join(CONTENDERS)}")
    workdir = Path(ns.workdir).resolve() / ("quick" if ns.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    if ns.report:
        res = json.loads((workdir / "results.json").read_text())
        res["summary"] = summarize(res["runs"])
        print(markdown(res["summary"], res["meta"], res["runs"]))
        return 0
    max_steps = ns.warmup + ns.steps
    if max_steps * m["micro"] * RANKS > m["pairs"]:
        p.error(f"{max_steps} steps x {m['micro'] * RANKS} pairs need at least that many pairs (--pairs)")
    prep = prepare(workdir, m, max_steps)
    t_start = time.time()
    if not ns.quick and not ns.no_warmup_run:  # page cache, DeepSpeed's op loads, bytecode; not measured
        run_one("b", workdir, m, prep, 2, 1, "warmup", ns)
    runs: list[dict] = []
    failed: list[dict] = []
    for rep in range(ns.repeats):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            for attempt in range(ns.retries + 1):  # a run killed from outside (another session's cleanup) is rerun
                res = run_one(c, workdir, m, prep, max_steps, ns.warmup, f"r{rep + 1}", ns)
                res["attempt"] = attempt
                if res["ok"]:
                    break
                failed.append(res)
            runs.append(res)
    summary = summarize(runs)
    meta = {
        "command": "python bench/dpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(("torch", "deepspeed", "transformers", "accelerate", "trl", "datasets")), "contenders": contenders, "model": {k: m[k] for k in ("hidden", "layers", "heads", "intermediate", "vocab")},
        "tokenizer_vocab": m["tok_vocab"], "pairs": m["pairs"], "seq_len": m["seq_len"], "micro_batch_pairs": m["micro"],
        "ranks": RANKS, "beta": BETA, "steps": {"warmup": ns.warmup, "measured": ns.steps}, "repeats": ns.repeats,
        "step_tokens": prep["step_tokens"], "row_tokens": prep["row_tokens"], "data_stats": prep["data_stats"],
        "ds_config": prep["ds"], "elapsed_s": time.time() - t_start, "loadavg_end": os.getloadavg(),
    }
    (workdir / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    print(markdown(summary, meta, runs))
    log(f"results: {workdir / 'results.json'}; logs: {workdir / 'logs'}")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

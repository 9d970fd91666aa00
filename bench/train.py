"""Benchmark of the training stage against a bare DeepSpeed loop, the HF Trainer and plain DDP.

    python bench/train.py [--workdir bench/.work/train] [--repeats 3] [--steps 30] [--warmup 5] [--quick]
                          [--only abcdg] [--quiet-wait 240] [--bench-wait 2400] [--max-others 0.6] [--retries 2]
                          [--nice 0] [--report] [--ds-config ds_configs/zero3_offload.json] [--model 256,4,4]

On one model (a tiny Llama: 4 layers, hidden 256, 4 heads, seq 256), one preprocessed dataset
(made by ``launch/preprocess.py`` from the built-in sample), one DeepSpeed JSON
(``ds_configs/zero3_offload.json`` resolved by :func:`pipeline.training.ds_config.resolve_for_recipe`, so every
contender gets the very same dict), fp32, AdamW (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay
0.1, clip 1.0), micro-batch 4, no accumulation, two CPU ranks with ``OMP_NUM_THREADS=1`` each:

* (a) ``ds``: a bare loop -- ``HfDeepSpeedConfig`` + ``from_config`` (ZeRO-3 ``zero.Init``),
  ``deepspeed.initialize``, then ``forward / engine.backward / engine.step`` -- launched with
  ``deepspeed --num_gpus 2``. The limit for any DeepSpeed pipeline.
* (b) ``stage``: ``launch/train.py`` through ``deepspeed --num_gpus 2`` with ``monitor.log_every=1``.
* (c) ``hf``: ``transformers.Trainer`` with ``TrainingArguments(deepspeed=<the same dict>)``,
  launched with ``deepspeed --num_gpus 2`` (accelerate's state built on gloo first).
* (d) ``ddp``: ``torchrun --nproc-per-node 2``, gloo, ``DistributedDataParallel`` and
  ``torch.optim.AdamW``; no DeepSpeed. The compute floor.
* (e) ``auto``: ``launch/train.py`` with ``deepspeed.config=auto`` (the memory planner picks the
  fastest config that fits: for this model ``ds_configs/zero0.json``), otherwise as (b).
* (f) ``ds0``: the bare loop of (a) with ``ds_configs/zero0.json`` (what (e) resolves to) instead of
  ZeRO-3 + offload: DeepSpeed's own cost without partitioning, beside DDP.
* (g) ``dsdef``: the bare loop of (a) with the resolved JSON less the three ZeRO-3 keys the
  pipeline fills from the hidden size (``reduce_bucket_size``, ``stage3_prefetch_bucket_size``,
  ``stage3_param_persistence_threshold``), so DeepSpeed uses its own defaults for them (5e8, 5e7,
  1e5 in 0.19.8): what a user who writes a plain DeepSpeed loop gets without the pipeline (issue 16).
* (h) ``dshf``: the bare loop of (a) with the Hugging Face formula for those three keys written
  out (``h²``, ``0.9·h²``, ``10·h``: what HF's Trainer fills for ``"auto"``, and what the pipeline
  filled before issue 16). (p), (q), (r): (h) with ONE key left to DeepSpeed's default --
  (p) ``stage3_param_persistence_threshold``, (q) ``stage3_prefetch_bucket_size``, (r)
  ``reduce_bucket_size`` -- which key gives (g)'s speed.

``--ds-config`` replaces ``ds_configs/zero3_offload.json`` for (a), (b), (c), (g); ``--model
HIDDEN,LAYERS,HEADS`` the tiny model (results then go to ``<workdir>/full-<config>-<model>``).

Data: every contender reads the same token sequences in the same order per rank and step
(sample ``8t + 4r + i`` of the stage's blended, shuffled stream at step ``t`` on rank ``r``):
(a) and (d) through :class:`pipeline.data.sampler.RankLoader` (memmap reads on a read-ahead
thread, like the stage), (c) through a map-style dataset over
:class:`~pipeline.data.sampler.BlendedSamples` with the Trainer's sequential sampler (accelerate
shards its batches round-robin, which gives the same samples per rank), (b) reads its own.

Timing, the same for all: the benchmark starts the launcher and timestamps (``time.time()``)
every stdout line when it arrives. Rank 0 of (a), (c), (d) prints ``BENCH step N`` at the end
of every optimizer step; (b) prints ``step N | ...`` (its monitor, every step). Throughput is
``tokens per step x measured steps / (arrival of the last step - arrival of step <warmup>)``;
time to first step is ``arrival of step 1 - launch``. The stage's data wait comes from its
TensorBoard scalars (``perf/data_wait_s`` / ``perf/step_time_s``, the values behind the
console's "(data x%)"). The contenders run interleaved (the order rotates every repetition)
and the report gives medians and ratios of medians. The load other processes put on the
machine during each run is recorded (``others``: busy cores not used by the run's process tree);
before each run the benchmark waits while ``bench/preprocess.py`` runs (``--bench-wait``, up to
40 min) and then (``--quiet-wait``, up to 240 s) until other processes keep under 0.25 cores
busy; a run during which others kept more than ``--max-others`` cores busy is repeated up to
``--retries`` times (the discarded attempts stay in ``results.json``).

Results: a Markdown table on stdout and ``<workdir>/results.json``; logs under ``<workdir>/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import launch, log, machine, median, run_env, stage_scalars, wait_quiet
WORKERS = ROOT / "bench" / "_train_workers.py"
CONTENDERS = ("a", "b", "c", "d", "e", "f", "g", "h", "p", "q", "r")
STAGES = ("b", "e")  # contenders that run launch/train.py (their step lines are the monitor's)
LABEL = {"a": "(a) bare DeepSpeed loop", "b": "(b) stage launch/train.py", "c": "(c) HF Trainer + DeepSpeed",
         "d": "(d) plain DDP (no DeepSpeed)", "e": "(e) stage, deepspeed.config=auto",
         "f": "(f) bare DeepSpeed loop, ZeRO-0", "g": "(g) bare DeepSpeed loop, DeepSpeed's default ZeRO-3 values",
         "h": "(h) bare DeepSpeed loop, HF formula values", "p": "(p) (h) + DeepSpeed's persistence threshold",
         "q": "(q) (h) + DeepSpeed's prefetch bucket", "r": "(r) (h) + DeepSpeed's reduce bucket"}
MODE = {"a": "ds", "c": "hf", "d": "ddp", "f": "ds", "g": "ds", "h": "ds", "p": "ds", "q": "ds", "r": "ds"}
DS_DEFAULT_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
# (h): every key by the HF formula; (p), (q), (r): the formula less one key (DeepSpeed's default for it)
FORMULA_LESS = {"h": (), "p": ("stage3_param_persistence_threshold",), "q": ("stage3_prefetch_bucket_size",),
                "r": ("reduce_bucket_size",)}
GOAL_AUTO_OVER_DDP = 0.95
RANKS = 2
GOAL_B_OVER_A, GOAL_B_OVER_C, GOAL_TTFS, GOAL_DATA_WAIT = 0.97, 1.0, 1.1, 0.01
STEP_LINE = re.compile(r"(?:^|\s)step (\d+) \| loss ([-\d.naninf]+) .*?\| ([\d,]+) tok/s .*?\| step ([\d.]+)s(?: \(data ([\d.]+)%\))?")

FULL = dict(hidden=256, layers=4, heads=4, seq_len=256, micro=4, vocab=2048, sample_docs=20000)
QUICK = dict(hidden=64, layers=2, heads=4, seq_len=64, micro=4, vocab=2048, sample_docs=20000)


# ---------------------------------------------------------------------------- setup


def _env() -> dict:
    return run_env(ROOT)


def make_dataset(workdir: Path, m: dict) -> Path:
    """The preprocessed dataset, made (once) by the stage's own preprocess."""
    out = workdir / f"data-{m['sample_docs']}-v{m['vocab']}"
    if (out / "manifest.json").exists():
        return out
    log(f"preprocessing the built-in sample ({m['sample_docs']} documents, vocab {m['vocab']}) into {out}")
    cmd = [sys.executable, str(ROOT / "launch" / "preprocess.py"), f"output={out}", f"sample_docs={m['sample_docs']}",
           f"tokenizer.vocab_size={m['vocab']}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return out


def stage_overrides(m: dict, data: Path, output: Path, max_steps: int, warmup: int,
                    ds_config: str = "ds_configs/zero3_offload.json") -> list[str]:
    """The stage's key=value arguments; the same recipe is resolved here for the other contenders."""
    return [
        f"output={output}", f"data.datasets.0.path={data}", f"data.seq_len={m['seq_len']}",
        "model.model_type=llama", f"model.hidden_size={m['hidden']}", f"model.num_layers={m['layers']}",
        f"model.num_heads={m['heads']}", f"train.micro_batch_size={m['micro']}", "train.grad_accum=1",
        f"train.max_steps={max_steps}", f"train.warmup_steps={warmup}", "train.eval_batches=0", "checkpoint.every=0",
        "monitor.log_every=1", f"deepspeed.config={ds_config}", "deepspeed.precision=fp32",
    ]


def worker_spec(cfg, data: Path, model_dir: Path, ds_config: Path, max_steps: int, workdir: Path) -> dict:
    """What ``bench/_train_workers.py`` reads (``--spec``): the data, model and DeepSpeed JSON, and
    the stage recipe ``cfg``'s batch and optimizer settings."""
    t = cfg.train
    return {
        "data": str(data), "model_dir": str(model_dir), "ds_config": str(ds_config),
        "seq_len": cfg.data.seq_len, "micro_batch": t.micro_batch_size, "max_steps": max_steps, "seed": t.seed,
        "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
        "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio, "workdir": str(workdir),
    }


def prepare(workdir: Path, data_root: Path, m: dict, max_steps: int, warmup: int,
            ds_config: str = "ds_configs/zero3_offload.json") -> dict:
    """Dataset (under ``data_root``), model config, resolved DeepSpeed JSON and the workers' spec (under ``workdir``)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.training.model import architecture_fingerprint, hf_config
    from pipeline.stages.train import TrainConfig

    from pipeline.training.ds_config import resolve_for_recipe  # how the stage fills its DeepSpeed JSON

    data = make_dataset(data_root, m)
    cfg = load_config(TrainConfig, None, stage_overrides(m, data, workdir / "unused", max_steps, warmup, ds_config))
    tok = read_manifest(data)["tokenizer"]
    conf = hf_config(cfg.model, tok["vocab_size"], cfg.data.seq_len, tok)
    ds = resolve_for_recipe(cfg, cfg.deepspeed.config, world=RANKS, precision="fp32", hidden=conf.hidden_size)
    model_dir = workdir / "model"
    conf.save_pretrained(model_dir)
    (workdir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    spec = worker_spec(cfg, data, model_dir, workdir / "ds_config.json", max_steps, workdir / "hf-output")
    (workdir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    # (g): the same JSON without the three keys the pipeline fills from the hidden size: DeepSpeed's defaults
    ds_def = json.loads(json.dumps(ds))
    for k in DS_DEFAULT_KEYS:
        (ds_def.get("zero_optimization") or {}).pop(k, None)
    (workdir / "ds_config_dsdefaults.json").write_text(json.dumps(ds_def, indent=2) + "\n")
    (workdir / "spec-g.json").write_text(json.dumps({**spec, "ds_config": str(workdir / "ds_config_dsdefaults.json")}, indent=2) + "\n")
    # (h), (p), (q), (r): the HF formula's values (h², 0.9·h², 10·h), less one key each but (h)
    h = conf.hidden_size
    formula = dict(zip(DS_DEFAULT_KEYS, (h * h, int(0.9 * h * h), 10 * h)))
    ds_formula = {}
    for c, drop in FORMULA_LESS.items():
        d = json.loads(json.dumps(ds_def))
        d.setdefault("zero_optimization", {}).update({k: v for k, v in formula.items() if k not in drop})
        ds_formula[c] = d
        (workdir / f"ds_config_{c}.json").write_text(json.dumps(d, indent=2) + "\n")
        (workdir / f"spec-{c}.json").write_text(json.dumps({**spec, "ds_config": str(workdir / f"ds_config_{c}.json")}, indent=2) + "\n")
    # (e) and (f): the config `auto` resolves to for this model on this machine (the planner's choice)
    import dataclasses

    from pipeline.training.plan import detect_target
    from pipeline.training.resolve import choose_auto, recipe_from

    recipe = recipe_from(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm", precision="fp32")
    fit = choose_auto(recipe, detect_target(RANKS))
    chosen = fit.config if fit is not None else None
    if chosen is None:
        raise SystemExit("deepspeed.config=auto: nothing fits this machine's memory for the benchmark model")
    auto_cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, config=chosen))
    ds_auto = resolve_for_recipe(auto_cfg, chosen, world=RANKS, precision="fp32", hidden=conf.hidden_size, strict_nvme=False)
    (workdir / "ds_config_auto.json").write_text(json.dumps(ds_auto, indent=2) + "\n")
    (workdir / "spec-f.json").write_text(json.dumps({**spec, "ds_config": str(workdir / "ds_config_auto.json")}, indent=2) + "\n")
    return {"data": data, "ds": ds, "ds_auto": ds_auto, "ds_defaults": ds_def, "ds_formula": ds_formula, "ds_config_file": ds_config, "auto_config": chosen, "spec": spec, "fingerprint": architecture_fingerprint(conf), "tokenizer": tok,
            "tokens_per_step": t.micro_batch_size * RANKS * cfg.data.seq_len, "n_layers": conf.num_hidden_layers,
            "vocab": conf.vocab_size, "intermediate": conf.intermediate_size}


# ---------------------------------------------------------------------------- one run


def command(c: str, workdir: Path, m: dict, data: Path, max_steps: int, warmup: int, out: Path,
            ds_config: str = "ds_configs/zero3_offload.json") -> list[str]:
    sys.path.insert(0, str(ROOT))
    from pipeline.rendezvous import free_port

    port = str(free_port())
    if c in STAGES:
        return ["deepspeed", "--num_gpus", str(RANKS), "--master_port", port, str(ROOT / "launch" / "train.py"),
                *stage_overrides(m, data, out, max_steps, warmup, "auto" if c == "e" else ds_config)]
    spec = workdir / ("spec.json" if c in "acd" else f"spec-{c}.json")
    if max_steps != json.loads(spec.read_text())["max_steps"]:  # the warm-up run: fewer steps
        s = json.loads(spec.read_text()) | {"max_steps": max_steps}
        spec = workdir / f"spec-{c}-{max_steps}.json"
        spec.write_text(json.dumps(s))
    worker = [str(WORKERS), "--mode", MODE[c], "--spec", str(spec)]
    if c == "d":
        return ["torchrun", "--nnodes", "1", "--nproc-per-node", str(RANKS), "--master-addr", "127.0.0.1",
                "--master-port", port, *worker]
    return ["deepspeed", "--num_gpus", str(RANKS), "--master_port", port, *worker]


def step_of(c: str, text: str) -> int | None:
    """The optimizer step a stdout line reports the end of, if any."""
    if c in STAGES:
        mt = STEP_LINE.search(text)
        return int(mt.group(1)) if mt else None
    i = text.find("BENCH step ")
    return int(text[i:].split()[2]) if i >= 0 else None



def _tensorboard_wait(out: Path, first: int, last: int) -> dict | None:
    """Data wait / step time of steps ``first..last`` from the stage's TensorBoard scalars."""
    wait, step = stage_scalars(out, "perf/data_wait_s"), stage_scalars(out, "perf/step_time_s")
    if not wait or not step:
        return None
    keep = [s for s in range(first, last + 1) if s in wait and s in step]
    if not keep:
        return None
    w, t = sum(wait[s] for s in keep), sum(step[s] for s in keep)
    return {"data_wait_frac": w / t, "monitor_step_s_mean": t / len(keep), "steps": len(keep)}


def wait_other_benchmarks(max_wait: float) -> float:
    """Wait (polling every 30 s, at most ``max_wait`` s) while another benchmark runs; seconds waited."""
    t0 = time.time()
    while other_benchmarks() and time.time() - t0 < max_wait:
        time.sleep(30)
    return time.time() - t0


def run_one(c: str, workdir: Path, m: dict, prep: dict, max_steps: int, warmup: int, tag: str, ns: argparse.Namespace) -> dict:
    """Launch contender ``c`` once and measure it (see the module doc)."""
    waited = wait_other_benchmarks(ns.bench_wait) if ns.bench_wait > 0 else 0.0
    if waited > 1:
        log(f"waited {waited:.0f} s for another benchmark to finish")
    quiet = wait_quiet(ns.quiet_wait) if ns.quiet_wait > 0 else {}
    busy_before = other_benchmarks()
    out = workdir / "runs" / f"{c}-{tag}"
    shutil.rmtree(out, ignore_errors=True)  # the stage would resume from an old checkpoint
    cmd = command(c, workdir, m, prep["data"], max_steps, warmup, out, prep.get("ds_config_file", "ds_configs/zero3_offload.json"))
    log(f"{LABEL[c]} [{tag}] ..." + (f" (waited {quiet['waited_s']:.0f} s for a quiet machine: others "
                                     f"{quiet['load_before']:.2f} cores)" if quiet else ""))
    if ns.nice:
        cmd = ["nice", "-n", str(ns.nice), *cmd]
    load_start = os.getloadavg()[0]
    r = launch(cmd, workdir / "logs" / f"{c}-{tag}.log", ns.timeout, cwd=ROOT, env=_env(), step_fn=lambda text: step_of(c, text),
               cpu_at=(warmup, max_steps))
    other_bench = bool(busy_before or other_benchmarks())
    t0 = r["t_launch"]
    steps: dict[int, dict] = {}
    marks: dict[str, float] = {}
    info: dict = {}
    for ts, text in r.pop("lines"):
        if c in STAGES:
            mt = STEP_LINE.search(text)  # search: another rank's output may precede it on the line
            if mt:
                steps[int(mt.group(1))] = {"arrival": ts, "loss": float(mt.group(2)), "monitor_step_s": float(mt.group(4)),
                                           "data_pct": float(mt.group(5)) if mt.group(5) else None}
            elif "train: " in text and "rank(s)" in text:
                marks.setdefault("dist", ts - t0)  # printed right after the process group is up
            continue
        if "BENCH " not in text:
            continue
        parts = text[text.index("BENCH "):].split()
        if len(parts) < 3:
            continue
        if parts[1] == "step" and len(parts) >= 7:
            steps[int(parts[2])] = {"arrival": ts, "printed": float(parts[3]), "loss": float(parts[4]),
                                    "wait_s": float(parts[5]), "step_s": float(parts[6])}
        elif parts[1] == "mark" and len(parts) >= 4:
            marks[parts[2]] = float(parts[3]) - t0
        elif parts[1] == "info":
            info.update(json.loads(text[text.index("BENCH "):].split(" ", 2)[2]))
    res = {"contender": c, "tag": tag, "rc": r["rc"], "wall_s": r["wall_s"], "others_cores": r["others_cores"],
           "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0],
           "cpu_s": r["cpu_s"], "quiet": quiet, "other_benchmark": other_bench,
           "disturbed": other_bench or r["others_cores"] > ns.max_others, "steps_seen": len(steps), "marks_s": marks, "info": info,
           "losses": [steps[s]["loss"] for s in sorted(steps)]}
    # a worker that printed "done" after its last step finished: a crash in the interpreter's exit ("terminate
    # called without an active exception" from a library thread, seen now and then) does not void its timings
    finished = r["rc"] == 0 or (c not in STAGES and "done" in marks)
    ok = finished and all(s in steps for s in range(1, max_steps + 1))
    if ok and r["rc"] != 0:
        res["rc_after_done"] = r["rc"]
    res["ok"] = ok
    if not ok:
        log(f"  FAILED (rc {r['rc']}, {len(steps)}/{max_steps} steps); see {workdir / 'logs' / f'{c}-{tag}.log'}")
        return res
    tps = prep["tokens_per_step"]
    measured = max_steps - warmup
    span = steps[max_steps]["arrival"] - steps[warmup]["arrival"]
    res.update(tokens_per_s=tps * measured / span, first_step_s=steps[1]["arrival"] - t0,
               step_s=[steps[s]["arrival"] - steps[s - 1]["arrival"] for s in range(warmup + 1, max_steps + 1)])
    snap = r["usage_snap"]
    if warmup in snap and max_steps in snap:  # CPU seconds (all ranks, all threads) per measured step
        u0, u1 = snap[warmup], snap[max_steps]
        res["cpu_s_per_step"] = (u1["cpu_s"] - u0["cpu_s"]) / measured
        res["system_s_per_step"] = (u1["system_s"] - u0["system_s"]) / measured
        res["minor_faults_per_step"] = (u1["minor_faults"] - u0["minor_faults"]) / measured
    if c in STAGES:
        tb = _tensorboard_wait(out, warmup + 1, max_steps)
        if tb is not None:
            res.update(data_wait_frac=tb["data_wait_frac"], monitor_step_s_mean=tb["monitor_step_s_mean"])
        else:  # the console's rounded "(data x%)"
            pct = [steps[s]["data_pct"] or 0.0 for s in range(warmup + 1, max_steps + 1)]
            sec = [steps[s]["monitor_step_s"] for s in range(warmup + 1, max_steps + 1)]
            res["data_wait_frac"] = sum(p / 100 * t for p, t in zip(pct, sec)) / sum(sec)
        res["ds_config_identical"] = json.loads((out / "ds_config.json").read_text()) == prep["ds_auto" if c == "e" else "ds"]
        res["model_identical"] = _stage_fingerprint(out) == prep["fingerprint"]
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~50 MB per run, not needed
    else:
        keep = range(warmup + 1, max_steps + 1)
        res["data_wait_frac"] = sum(steps[s]["wait_s"] for s in keep) / sum(steps[s]["step_s"] for s in keep)
        # cross-check: the same throughput from rank 0's own clock
        res["tokens_per_s_inproc"] = tps * measured / (steps[max_steps]["printed"] - steps[warmup]["printed"])
    log(f"  {res['tokens_per_s']:,.0f} tok/s, {res.get('cpu_s_per_step', float('nan')):.3f} CPU s/step, "
        f"first step after {res['first_step_s']:.1f} s, "
        f"data wait {100 * res['data_wait_frac']:.2f}%, others {r['others_cores']:.2f} cores")
    return res


def _stage_fingerprint(out: Path) -> str | None:
    from transformers import AutoConfig

    from pipeline.training.model import architecture_fingerprint

    conf_dir = out / ".hf_config"
    return architecture_fingerprint(AutoConfig.from_pretrained(conf_dir)) if (conf_dir / "config.json").exists() else None


# ---------------------------------------------------------------------------- report


def summarize(runs: list[dict], tokens_per_step: int) -> dict:
    """Medians over the repetitions, ratios, goals. ``tokens_per_s_median_step`` (tokens per step over
    the median step time of a run) is less sensitive to bursts of load from other processes."""
    s: dict = {}
    for c in CONTENDERS:
        ok = [r for r in runs if r["contender"] == c and r.get("ok")]
        if not ok:
            continue
        tok = [r["tokens_per_s"] for r in ok]
        tok_med = [tokens_per_step / statistics.median(r["step_s"]) for r in ok]
        ttfs = [r["first_step_s"] for r in ok]
        marks = {k: median([r["marks_s"][k] for r in ok if k in r["marks_s"]]) for k in ("start", "imports", "dist", "ready")}
        s[c] = {"runs": len(ok), "tokens_per_s": median(tok), "tokens_per_s_min": min(tok), "tokens_per_s_max": max(tok),
                "tokens_per_s_median_step": median(tok_med),
                "cpu_s_per_step": median([r["cpu_s_per_step"] for r in ok if r.get("cpu_s_per_step") is not None]),
                "system_s_per_step": median([r.get("system_s_per_step") for r in ok]),
                "minor_faults_per_step": median([r.get("minor_faults_per_step") for r in ok]),
                "first_step_s": median(ttfs), "first_step_s_min": min(ttfs), "first_step_s_max": max(ttfs),
                "data_wait_frac": median([r["data_wait_frac"] for r in ok]),
                "marks_s": {k: v for k, v in marks.items() if v is not None},
                "others_cores": median([r["others_cores"] for r in ok])}
    ratios: dict = {}
    for num, den in (("b", "a"), ("b", "c"), ("c", "a"), ("d", "a"), ("e", "d"), ("f", "d"), ("e", "f"), ("b", "g"), ("a", "g"),
                     ("b", "h"), ("a", "h"), ("g", "h"), ("p", "h"), ("q", "h"), ("r", "h")):
        if num in s and den in s:
            paired = [x["tokens_per_s"] / y["tokens_per_s"] for x in runs for y in runs
                      if x["contender"] == num and y["contender"] == den and x.get("ok") and y.get("ok") and x["tag"] == y["tag"]]
            ratios[f"{num}/{den}"] = {"of_medians": s[num]["tokens_per_s"] / s[den]["tokens_per_s"],
                                      "paired_median": median(paired),
                                      "median_step": s[num]["tokens_per_s_median_step"] / s[den]["tokens_per_s_median_step"],
                                      "cpu_per_step": (s[den]["cpu_s_per_step"] / s[num]["cpu_s_per_step"]
                                                       if s[num]["cpu_s_per_step"] and s[den]["cpu_s_per_step"] else None)}
    if "a" in s and "b" in s:
        ratios["first_step b/a"] = {"of_medians": s["b"]["first_step_s"] / s["a"]["first_step_s"]}
    goals = {}
    if "b/a" in ratios:
        goals["b/a >= 0.97"] = ratios["b/a"]["of_medians"] >= GOAL_B_OVER_A
    bare = [c for c in "agh" if c in s]
    if "b" in s and ("g" in s or "h" in s):  # issue 16: the stage against the fastest bare loop
        fastest = max(s[c]["tokens_per_s"] for c in bare)
        goals[f"b >= 0.97 x max({', '.join(bare)})"] = s["b"]["tokens_per_s"] / fastest >= GOAL_B_OVER_A
    if "b/c" in ratios:
        goals["b/c >= 1.0"] = ratios["b/c"]["of_medians"] >= GOAL_B_OVER_C
    if "first_step b/a" in ratios:
        goals["first step (b) <= 1.1 x (a)"] = ratios["first_step b/a"]["of_medians"] <= GOAL_TTFS
    if "e/d" in ratios:
        goals["auto (e) >= 0.95 x DDP (d)"] = ratios["e/d"]["of_medians"] >= GOAL_AUTO_OVER_DDP
    if "b" in s:
        goals["data wait (b) < 1%"] = s["b"]["data_wait_frac"] < GOAL_DATA_WAIT
    return {"contenders": s, "ratios": ratios, "goals": goals}


def _f3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(summary: dict, meta: dict, runs: list[dict] | None = None) -> str:
    s, ratios = summary["contenders"], summary["ratios"]
    base = s.get("a", {}).get("tokens_per_s")
    rows = ["| contender | tokens/s (median; min-max) | vs (a) | tokens/s from the median step | CPU s per step (all ranks) "
            "| of it system | minor page faults per step | first step after, s (median; min-max) | data wait | others' load, cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in meta["contenders"]:
        if c not in s:
            rows.append(f"| {LABEL[c]} | failed (see results.json) | | | | | | | | |")
            continue
        x = s[c]
        rel = f"{x['tokens_per_s'] / base:.3f}" if base else "-"
        faults = x.get("minor_faults_per_step")
        rows.append(f"| {LABEL[c]} | {x['tokens_per_s']:,.0f} ({x['tokens_per_s_min']:,.0f}-{x['tokens_per_s_max']:,.0f}) "
                    f"| {rel} | {x['tokens_per_s_median_step']:,.0f} | {_f3(x.get('cpu_s_per_step'))} | {_f3(x.get('system_s_per_step'))} "
                    f"| {'-' if faults is None else f'{faults:,.0f}'} | {x['first_step_s']:.1f} ({x['first_step_s_min']:.1f}-{x['first_step_s_max']:.1f}) "
                    f"| {100 * x['data_wait_frac']:.2f}% | {x['others_cores']:.2f} |")
    out = ["\n".join(rows), ""]
    brk = ["| contender | launcher + interpreter | imports | process group | model + initialize | first step |",
           "|---|---:|---:|---:|---:|---:|"]
    for c in CONTENDERS:
        if c not in s:
            continue
        mk, first = s[c]["marks_s"], s[c]["first_step_s"]
        pts = [mk.get("start"), mk.get("imports"), mk.get("dist"), mk.get("ready"), first]

        def d(i: int) -> str:
            a = 0.0 if i == 0 else pts[i - 1]
            return "-" if pts[i] is None or a is None else f"{pts[i] - a:.1f}"

        if c in STAGES:  # only "process group up" (its "train:" line) and step 1 are visible from outside
            cells = ["-", "-", f"{pts[2]:.1f} (all three)" if pts[2] is not None else "-", "-",
                     f"{first - pts[2]:.1f} (model, initialize, step 1)" if pts[2] is not None else "-"]
        else:
            cells = [d(0), d(1), d(2), d(3), d(4)]
        brk.append(f"| {LABEL[c]} | " + " | ".join(cells) + " |")
    out += ["Time to first step, split (medians, seconds from launch; each cell is the time since the previous one):",
            "", "\n".join(brk), ""]
    rr = ["| ratio (tokens/s) | of medians | median of paired runs | of median step times | of CPU s per step (inverse) |",
          "|---|---:|---:|---:|---:|"]
    for k, v in ratios.items():
        rr.append(f"| {k} | {v['of_medians']:.3f} | {_f3(v.get('paired_median'))} | {_f3(v.get('median_step'))} "
                  f"| {_f3(v.get('cpu_per_step'))} |")
    out += ["\n".join(rr), ""]
    if meta.get("disturbed_kept"):
        out += [f"{meta['disturbed_kept']} of the runs above were disturbed (others kept more than "
                f"{meta.get('max_others')} cores busy or another benchmark ran) even after {meta.get('retries')} retries.", ""]
    if runs:
        rl = ["| run | contender | tokens/s | 1-min load at start / end | others' cores |", "|---|---|---:|---|---:|"]
        for r in runs:
            tok = f"{r['tokens_per_s']:,.0f}" if r.get("ok") else "failed"
            ld = (f"{r['loadavg_1min_start']:.2f} / {r['loadavg_1min_end']:.2f}" if "loadavg_1min_start" in r else "-")
            rl.append(f"| {r['tag']} | {LABEL[r['contender']]} | {tok} | {ld} | {r['others_cores']:.2f} |")
        out += ["Runs in order:", "", "\n".join(rl), ""]
    out += ["| goal | met |", "|---|---|"] + [f"| {k} | {'yes' if v else '**no**'} |" for k, v in summary["goals"].items()]
    return "\n".join(out) + "\n"


def other_benchmarks() -> list[str]:
    r = subprocess.run(["pgrep", "-af", "bench/preprocess.py"], capture_output=True, text=True)
    # a `flock ... python bench/preprocess.py` still waiting for the lock (or its timeout/shell wrapper) runs nothing yet
    waiting = ("flock", "timeout", "bash", "sh", "nice")
    return [l for l in r.stdout.splitlines() if l.strip() and str(os.getpid()) != l.split()[0]
            and len(l.split()) > 1 and os.path.basename(l.split()[1]) not in waiting]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".work" / "train"), help="cache, runs, logs and results")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before the measured ones")
    p.add_argument("--only", default="abcdg", help="contenders to run, e.g. 'abgh' (default: abcdg; also e, f, h, p, q, r)")
    p.add_argument("--ds-config", default="ds_configs/zero3_offload.json",
                   help="DeepSpeed JSON of (a), (b), (c), (g) (default ds_configs/zero3_offload.json)")
    p.add_argument("--model", default=None, help="HIDDEN,LAYERS,HEADS of the Llama instead of 256,4,4 (e.g. 512,8,8)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 6 steps (2 + 4 measured), 1 repetition")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="before each run, wait up to this many seconds for other processes to use < 0.25 cores "
                        "(default 240; 0 with --quick)")
    p.add_argument("--bench-wait", type=float, default=None,
                   help="before each run, wait up to this many seconds while bench/preprocess.py runs (default 2400; 0 with --quick)")
    p.add_argument("--max-others", type=float, default=0.6,
                   help="a run during which other processes kept more cores busy than this is repeated (see --retries)")
    p.add_argument("--retries", type=int, default=None, help="repeats of a disturbed run (default 2; 0 with --quick)")
    p.add_argument("--nice", type=int, default=0, help="run every contender under `nice -n N` (e.g. -10 as root)")
    p.add_argument("--report", action="store_true", help="only print the report of the last results.json again")
    ns = p.parse_args(argv)
    m = dict(QUICK if ns.quick else FULL)
    variant = ""
    if ns.model:
        m["hidden"], m["layers"], m["heads"] = (int(x) for x in ns.model.split(","))
        variant += f"-h{m['hidden']}l{m['layers']}"
    if ns.ds_config != "ds_configs/zero3_offload.json":
        variant = f"-{Path(ns.ds_config).stem}" + variant
    if ns.quick:
        ns.repeats, ns.steps, ns.warmup = 1, 4, 2
    if ns.quiet_wait is None:
        ns.quiet_wait = 0.0 if ns.quick else 240.0
    if ns.bench_wait is None:
        ns.bench_wait = 0.0 if ns.quick else 2400.0
    if ns.retries is None:
        ns.retries = 0 if ns.quick else 2
    contenders = [c for c in CONTENDERS if c in ns.only]
    workdir = Path(ns.workdir).resolve() / (("quick" if ns.quick else "full") + variant)
    workdir.mkdir(parents=True, exist_ok=True)
    if ns.report:
        res = json.loads((workdir / "results.json").read_text())
        res["meta"].setdefault("contenders", sorted({r["contender"] for r in res["runs"]}))
        res["summary"] = summarize(res["runs"], res["meta"]["tokens_per_step"])
        (workdir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        print(markdown(res["summary"], res["meta"], res["runs"]))
        return 0
    busy = other_benchmarks()
    if busy and not ns.quick:
        log(f"warning: another benchmark is running ({busy[0]}); numbers will be distorted")
    max_steps = ns.warmup + ns.steps
    prep = prepare(workdir, Path(ns.workdir).resolve(), m, max_steps, ns.warmup, ns.ds_config)
    t_start = time.time()
    runs: list[dict] = []
    if not ns.quick:  # compile/load DeepSpeed's cached ops and warm the page cache; not measured
        run_one("a", workdir, m, prep, 2, 1, "warmup", ns)
    discarded: list[dict] = []
    for rep in range(ns.repeats):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            for attempt in range(ns.retries + 1):
                res = run_one(c, workdir, m, prep, max_steps, ns.warmup, f"r{rep + 1}", ns)
                res["attempt"] = attempt
                if res["ok"] and not res["disturbed"] or attempt == ns.retries:
                    break
                log(f"  disturbed (others {res['others_cores']:.2f} cores, other benchmark: {res['other_benchmark']}); again")
                discarded.append(res)
            runs.append(res)
    summary = summarize(runs, prep["tokens_per_step"])
    meta = {
        "command": "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "other_benchmarks_at_start": busy, "other_benchmarks_at_end": other_benchmarks(),
        "model": {"type": "llama", "hidden": m["hidden"], "layers": m["layers"], "heads": m["heads"],
                  "intermediate": prep["intermediate"], "vocab": prep["vocab"], "seq_len": m["seq_len"],
                  "micro_batch": m["micro"], "grad_accum": 1, "ranks": RANKS, "omp_threads_per_rank": 1},
        "data": str(prep["data"]), "ds_config_file": ns.ds_config, "ds_config": prep["ds"], "ds_config_g": prep["ds_defaults"],
        "ds_config_formula": prep["ds_formula"],
        "tokens_per_step": prep["tokens_per_step"],
        "steps": {"warmup": ns.warmup, "measured": ns.steps}, "repeats": ns.repeats, "quiet_wait_s": ns.quiet_wait,
        "elapsed_s": time.time() - t_start, "contenders": contenders,
        "nice": ns.nice, "max_others": ns.max_others, "retries": ns.retries, "disturbed_kept": sum(bool(r.get("disturbed")) for r in runs),
    }
    (workdir / "results.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs, "discarded_runs": discarded}, indent=2) + "\n")
    print(markdown(summary, meta, runs))
    log(f"results: {workdir / 'results.json'}; logs: {workdir / 'logs'}")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

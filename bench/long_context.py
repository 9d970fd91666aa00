"""Long-context benchmark: the longest sequence that trains under a per-rank memory cap, ALST
against plain ZeRO-3 data parallelism, and their tokens/s at a length both can run.

    python bench/long_context.py [--workdir bench/.work/long_context] [--cap-gib 2.5] [--probe 2048,4096]
                                 [--contenders plain,alst,alst_z0] [--malloc-mmap-threshold N] [--skip-verify] [--mem-steps 2]
                                 [--tps-steps 6] [--tps-repeats 3] [--tps-only L] [--tps-mmap-ab] [--report]

Both contenders are ``launch/train.py`` on two CPU ranks (``deepspeed --num_gpus 2``,
``OMP_NUM_THREADS=1`` each) with one model and data: a Llama of 58M parameters (hidden 512, 8
layers, 8 heads, the Llama MLP rule) with a real 32,000-token vocabulary (Mistral's
SentencePiece tokenizer from the ``mistral-common`` wheel, fetched with ``pip download``),
fp32, ``ds_configs/zero3.json``, micro-batch 1, activation checkpointing on in both:

* ``plain``: ZeRO-3 data parallel (each rank its own sequence of ``L`` tokens): what a user gets
  without sequence parallelism.
* ``alst``: the same with ALST's set: ``parallel.sequence_parallel_size=2`` (each rank holds
  ``L / 2`` tokens), ``model.tiled_mlp``, ``model.tiled_logits`` (tiles of 512 tokens: the
  automatic 2,097-token logits tile alone would be a fifth of a 2.5 GiB cap).

Memory: the peak RSS (``VmHWM``) of each rank process over a ``--mem-steps`` run (default 2: from
the second step on the optimizer states and the gradient partitions are resident through the
forward, what every longer run holds; the first step alone peaked 0.4 GiB lower here); the
larger of the two ranks.
It grows linearly with ``L`` for both (SDPA's CPU kernel holds no ``L x L`` matrix), so the
benchmark measures each contender at the ``--probe`` lengths, fits ``peak = base + L x
per_token``, predicts the longest ``L`` (a multiple of 512) under ``--cap-gib``, and then runs
that length to verify (stepping down 512 tokens at a time while the measured peak is over the
cap). The ratio reported is verified ALST / verified plain.

Throughput: at the plain contender's longest verified length (or ``--tps-only L``), in
``--tps-repeats`` interleaved rounds (the contenders' order rotates per round, so load from other
processes falls on all alike) each contender runs ``--tps-steps`` steps; a run's tokens/s is
``global tokens per step / median step time`` of steps 3.. (steps 1-2: warm-up, the optimizer
states' allocation), from the stage's console (``monitor.log_every=1``): plain counts both
ranks' sequences, ALST its group's one. The report gives each round, the median, the ratio to
plain under the same allocator setting and the load before each run. ``--tps-mmap-ab`` runs
every contender both with ``--malloc-mmap-threshold`` and with glibc's default. Per-phase
profiles of one step: ``bench/long_context_profile.py``.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rank_peaks import run_with_rank_peaks  # noqa: E402

MODEL = ["model.model_type=llama", "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8",
         "model.activation_checkpointing=true"]
CONTENDERS = {
    "plain": [],
    "alst": ["parallel.sequence_parallel_size=2", "model.tiled_mlp=true", "model.tiled_logits=true", "model.tile_tokens=512"],
    # the same ALST set on ZeRO-2 (the model's states are small here; see docs/benchmarks.md)
    "alst_z2": ["parallel.sequence_parallel_size=2", "model.tiled_mlp=true", "model.tiled_logits=true", "model.tile_tokens=512",
                "deepspeed.config=ds_configs/zero2.json"],
    "alst_z0": ["parallel.sequence_parallel_size=2", "model.tiled_mlp=true", "model.tiled_logits=true", "model.tile_tokens=512",
                "deepspeed.config=ds_configs/zero0.json"],
    # the savers without sequence parallelism: what each half of ALST contributes
    "tiled": ["model.tiled_mlp=true", "model.tiled_logits=true", "model.tile_tokens=512"],
}
GiB = 2**30
STEP = 512
MMAP_THRESHOLD = 0  # --malloc-mmap-threshold
TPS_WARMUP = 2  # untimed steps of a tokens/s run


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tokenizer_dir(work: Path) -> Path:
    """Mistral's 32,000-token SentencePiece tokenizer, from the mistral-common wheel (GUIDE.md)."""
    out = work / "tokenizer"
    if (out / "tokenizer.model").exists():
        return out
    dl = work / "wheel"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "mistral-common", "-d", str(dl)], check=True)
    import zipfile

    wheel = next(dl.glob("mistral_common-*.whl"))
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        (out / "tokenizer.model").write_bytes(z.read("mistral_common/data/tokenizer.model.v1"))
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(out)
    assert len(tok) == 32000, len(tok)
    tok.save_pretrained(out)
    return out


def dataset(work: Path) -> Path:
    out = work / "data"
    if (out / "manifest.json").exists():
        return out
    tok = tokenizer_dir(work)
    cmd = [sys.executable, str(ROOT / "launch" / "preprocess.py"), f"output={out}", f"tokenizer.path={tok}",
           "sample_docs=20000", "val_fraction=0.01"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def run(work: Path, name: str, seq: int, steps: int, mmap: int | None = None) -> dict:
    """One launch: ``{"peak": max rank VmHWM, "step_s": [per step], "tokens_per_step": ...}``; ``mmap``:
    the ranks' ``MALLOC_MMAP_THRESHOLD_`` (None: ``--malloc-mmap-threshold``; 0: glibc's default)."""
    mmap = MMAP_THRESHOLD if mmap is None else mmap
    from pipeline.dist import free_port

    tag = f"{name}-{seq}-{steps}" + (f"-mmap{mmap}" if mmap else "")
    out = work / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    args = [f"output={out}", f"data.datasets.0.path={dataset(work)}", *MODEL, "deepspeed.config=ds_configs/zero3.json",
            *CONTENDERS[name], f"data.seq_len={seq}", f"model.max_position_embeddings={seq}", "train.micro_batch_size=1",
            f"train.max_steps={steps}", "train.warmup_steps=1", "train.eval_batches=0", "checkpoint.every=0",
            "checkpoint.keep_last=1", "deepspeed.memory_check=false", "monitor.log_every=1"]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap:  # glibc: allocations from this size get their own mapping, returned to the system when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    logf = work / "logs" / f"{tag}.log"
    t0 = time.time()
    load0 = os.getloadavg()[0]
    with open(logf, "w") as fh:
        proc, rank_peaks = run_with_rank_peaks(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    code = proc.returncode
    text = logf.read_text()
    if code != 0:
        raise SystemExit(f"{name} at {seq} tokens failed (exit {code}); see {logf}:\n{text[-3000:]}")
    step_s = [float(m.group(1)) for m in re.finditer(r"^step \d+ \|.*\| step ([\d.]+)s", text, re.M)]
    shutil.rmtree(out, ignore_errors=True)  # the checkpoints: not needed, and disk adds up
    dp = 1 if "parallel.sequence_parallel_size=2" in CONTENDERS[name] else 2
    r = {"contender": name, "mmap": mmap, "seq_len": seq, "steps": steps, "peak": max(rank_peaks) if rank_peaks else 0,
         "rank_peaks": rank_peaks, "step_s": step_s, "tokens_per_step": seq * dp, "wall_s": time.time() - t0,
         "load": [load0, os.getloadavg()[0]]}
    log(f"{name:5s} L={seq:6d} mmap={mmap} steps={steps} peak {r['peak'] / GiB:.3f} GiB  step times {step_s}  ({r['wall_s']:.0f} s)")
    return r


def fit(points: list[dict]) -> tuple[float, float]:
    """``(base bytes, bytes per token)``: least squares through ``(seq_len, peak)``."""
    xs, ys = [p["seq_len"] for p in points], [p["peak"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def longest(work: Path, name: str, cap: int, base: float, per_token: float, results: list, verify: bool,
            steps: int) -> int:
    guess = int((cap - base) / per_token) // STEP * STEP
    if not verify:
        return guess
    seq = guess
    while seq >= STEP:
        r = run(work, name, seq, steps)
        results.append(r)
        if r["peak"] <= cap:
            return seq
        seq -= STEP
    return 0


def throughput(work: Path, names: list[str], seq: int, steps: int, repeats: int, results: list,
               mmaps: list[int | None]) -> dict:
    """Tokens/s of every contender (and allocator setting in ``mmaps``) at ``seq`` tokens: ``repeats``
    rounds, each running every (contender, setting) once in an order that rotates per round, so
    that load from other processes falls on all of them alike. A run's figure is its global tokens
    per step over the median time of steps ``TPS_WARMUP + 1 ..``: step 1 allocates the optimizer
    states and is slower on every contender alike. Returns ``{key: {"runs": [tokens/s per round],
    "median": ...}}`` with keys ``name`` (or ``name@mmapN`` when several settings are compared)."""
    keys = [(n, m) for n in names for m in mmaps]
    label = {k: k[0] if len(mmaps) == 1 else f"{k[0]}@mmap{k[1] if k[1] is not None else MMAP_THRESHOLD}" for k in keys}
    out: dict = {label[k]: {"runs": [], "load": []} for k in keys}
    for i in range(repeats):
        for name, mm in keys[i % len(keys):] + keys[:i % len(keys)]:
            r = run(work, name, seq, steps, mm)
            results.append(r)
            timed = r["step_s"][TPS_WARMUP:]
            o = out[label[(name, mm)]]
            o["runs"].append(r["tokens_per_step"] / statistics.median(timed))
            o["load"].append(r["load"])
    for o in out.values():
        o["median"] = statistics.median(o["runs"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".work" / "long_context"))
    p.add_argument("--cap-gib", type=float, default=2.5)
    p.add_argument("--probe", default="2048,4096", help="lengths measured for the linear fit")
    p.add_argument("--contenders", default="plain,alst,alst_z0", help=f"of {', '.join(CONTENDERS)}")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="MALLOC_MMAP_THRESHOLD_ for every rank of every contender (0: glibc's default, dynamic)")
    p.add_argument("--skip-verify", action="store_true", help="report the fitted longest lengths without running them")
    p.add_argument("--mem-steps", type=int, default=2,
                   help="steps of each memory run: from the second on the optimizer states and gradient partitions "
                        "are resident through the forward (1: the first step's peak only, the recorded runs before 2026-12-07)")
    p.add_argument("--tps-steps", type=int, default=6, help="steps of each tokens/s run (the first %d not timed)" % TPS_WARMUP)
    p.add_argument("--tps-repeats", type=int, default=3, help="interleaved rounds of the tokens/s runs (medians reported); 0: none")
    p.add_argument("--tps-only", type=int, default=0, metavar="L",
                   help="skip the memory search: tokens/s only, at L tokens")
    p.add_argument("--tps-mmap-ab", action="store_true",
                   help="tokens/s of every contender both with --malloc-mmap-threshold and with glibc's default, interleaved")
    p.add_argument("--report", action="store_true", help="print the table of an earlier run's results.json")
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res_file = work / "results.json"
    if a.report:
        for f in sorted(work.glob("results*.json")):
            print(f"{f.name}:\n{report(json.loads(f.read_text()))}\n")
        return 0
    if a.tps_steps <= TPS_WARMUP:
        p.error(f"--tps-steps must be above {TPS_WARMUP} (the warm-up steps)")
    cap = int(a.cap_gib * GiB)
    global MMAP_THRESHOLD
    MMAP_THRESHOLD = a.malloc_mmap_threshold
    if MMAP_THRESHOLD:
        res_file = work / f"results-mmap{MMAP_THRESHOLD}.json"
    if a.tps_only:
        res_file = res_file.with_name(res_file.stem + f"-tps{a.tps_only}" + ("-ab" if a.tps_mmap_ab else "") + ".json")
    dataset(work)
    results: list[dict] = []
    names = a.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or "plain" not in names:
        p.error(f"--contenders: {unknown or 'plain is the baseline and must be one'}; choose from {', '.join(CONTENDERS)}")
    summary: dict = {"cap": cap, "probe": a.probe, "mem_steps": a.mem_steps, "malloc_mmap_threshold": MMAP_THRESHOLD, "contenders": {n: CONTENDERS[n] for n in names},
                     "model": MODEL, "tps_steps": a.tps_steps, "tps_repeats": a.tps_repeats, "cpus": os.cpu_count()}
    both = a.tps_only
    if not a.tps_only:
        for name in names:
            pts = [run(work, name, int(s), a.mem_steps) for s in a.probe.split(",")]
            results += pts
            base, per_token = fit(pts)
            summary[name] = {"base": base, "per_token": per_token}
            summary[name]["longest"] = longest(work, name, cap, base, per_token, results, not a.skip_verify, a.mem_steps)
            res_file.write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
        both = summary["plain"]["longest"]
    if both >= STEP and a.tps_repeats > 0:
        mmaps = [None, 0] if a.tps_mmap_ab and MMAP_THRESHOLD else [None]
        summary["tps_len"] = both
        summary["throughput"] = throughput(work, names, both, a.tps_steps, a.tps_repeats, results, mmaps)
    res_file.write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    print(report({"summary": summary, "runs": results}))
    return 0


def report(data: dict) -> str:
    s = data["summary"]
    mmap = s.get("malloc_mmap_threshold") or "glibc default"
    lines = [f"cap {s['cap'] / GiB:.2f} GiB per rank (peak RSS over {s.get('mem_steps', 1)}-step runs); probe lengths {s['probe']}; "
             f"MALLOC_MMAP_THRESHOLD_ {mmap}", ""]
    base = s.get("plain", {})
    if base:
        lines += ["| contender | base (GiB) | per token (KiB) | longest L under the cap |", "|---|---|---|---|"]
        for name in s["contenders"]:
            c = s.get(name, {})
            if c:
                lines.append(f"| {name} | {c['base'] / GiB:.3f} | {c['per_token'] / 1024:.1f} | {c['longest']:,} |")
        lines.append("")
        for name in [n for n in s["contenders"] if n != "plain" and n in s]:
            c = s[name]
            if base.get("longest"):
                lines.append(f"{name} / plain: longest {c['longest'] / base['longest']:.1f}x, per-token memory "
                             f"{base['per_token'] / c['per_token']:.1f}x less")
        lines.append("")
    tp = s.get("throughput")
    if tp:
        lines += [f"tokens/s at L={s['tps_len']:,} ({s.get('tps_repeats')} interleaved rounds of {s.get('tps_steps')} steps, "
                  f"steps {TPS_WARMUP + 1}.. timed; load = 1-min load average before each run):", "",
                  "| contender | tokens/s per round | median | / plain (same setting) | load |", "|---|---|---|---|---|"]
        for key, o in tp.items():
            ref = tp.get("plain" + key[len(key.split("@")[0]):])
            ratio = f"{o['median'] / ref['median']:.2f}x" if ref else "-"
            loads = ", ".join(f"{x[0]:.1f}" for x in o["load"])
            lines.append(f"| {key} | {', '.join(f'{x:.0f}' for x in o['runs'])} | {o['median']:.0f} | {ratio} | {loads} |")
    elif "tokens_per_s" in base:  # results of the single-run version of this benchmark
        lines += [f"tokens/s at L={base['longest']:,} (one run, step 3): " + ", ".join(
            f"{n} {s[n]['tokens_per_s']:.0f}" for n in s["contenders"] if "tokens_per_s" in s.get(n, {}))]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

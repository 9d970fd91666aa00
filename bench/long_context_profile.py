"""Per-phase profile of one training step of ``launch/train.py`` (issue 13: what limits ALST's tokens/s).

    python bench/long_context_profile.py --contender alst --seq 1024 [--steps 3] [--profile-step 3]
                                         [--malloc-mmap-threshold 65536] [--out DIR] [-- extra key=value ...]

Runs the stage exactly as ``bench/long_context.py`` does (same model, data, contender keys, two
CPU ranks, ``OMP_NUM_THREADS=1``), but each rank goes through :func:`rank_main` here, which wraps
``Trainer.train_step`` so that step ``--profile-step`` (after warm-up) runs under
``torch.profiler`` (CPU) and records, per rank:

* wall time of the step, and of its phases (``record_function`` ranges around DeepSpeed's
  ``engine.forward`` / ``engine.backward`` / ``engine.step``, the tiled head + loss, the tiled MLP);
* self CPU time of every op, grouped into: Ulysses all-to-alls (``all_to_all``), ZeRO-3
  parameter all-gathers, gradient reduce-scatters / all-reduces, attention (SDPA), matmuls,
  everything else;
* the process's user and system CPU seconds and minor page faults over the step (``getrusage``):
  with ``MALLOC_MMAP_THRESHOLD_`` every large tensor is a fresh mapping, so its first touch
  faults pages in and its free unmaps them: system time and faults are that cost.

Results: ``<out>/rank<N>.json`` and a table on stdout (rank 0 and rank 1 side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# categories of profiler op names (lower case substrings), first match wins
CATEGORIES = [
    ("all_to_all (Ulysses)", ("all_to_all", "alltoall")),
    ("all_gather (ZeRO-3 params)", ("all_gather", "allgather")),
    ("reduce_scatter/all_reduce (grads)", ("reduce_scatter", "allreduce", "all_reduce", "reduce")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("copy/cat/contiguous", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous")),
    ("cross_entropy/log_softmax", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer (adam)", ("adam",)),
]
PHASES = ("engine.forward", "engine.backward", "engine.step", "tiled_loss.head_ce", "tiled_mlp", "ulysses.attn")


def rank_main(argv: list[str]) -> int:
    """One rank: ``launch/train.py``'s main with the profiling wrappers in place."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    import pipeline.training.tiling as tiling
    from pipeline.training import trainer as trainer_mod

    out = Path(os.environ["LC_PROFILE_OUT"])
    want = int(os.environ.get("LC_PROFILE_STEP", "3"))

    def ranged(name, fn):
        def wrapped(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return wrapped

    for meth in ("forward", "backward", "step"):
        setattr(DeepSpeedEngine, meth, ranged(f"engine.{meth}", getattr(DeepSpeedEngine, meth)))
    tiling._ce_sum = ranged("tiled_loss.head_ce", tiling._ce_sum)
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    ulysses_sp.TiledMLP.forward = staticmethod(ranged("tiled_mlp", ulysses_sp.TiledMLP.forward))
    ulysses_sp.TiledMLP.backward = staticmethod(ranged("tiled_mlp", ulysses_sp.TiledMLP.backward))
    ulysses_sp.UlyssesSPAttentionHF.forward = ranged("ulysses.attn", ulysses_sp.UlyssesSPAttentionHF.forward)

    base_step = trainer_mod.Trainer.train_step

    def train_step(self):
        if self.step + 1 != want:
            return base_step(self)
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = base_step(self)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        ops, phases = {}, {}
        for e in prof.key_averages():
            if e.key in PHASES:
                phases[e.key] = e.cpu_time_total / 1e6  # inclusive
            else:
                ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
        cats = {c: 0.0 for c, _ in CATEGORIES}
        cats["other"] = 0.0
        for k, v in ops.items():
            low = k.lower()
            for c, subs in CATEGORIES:
                if any(s in low for s in subs):
                    cats[c] += v
                    break
            else:
                cats["other"] += v
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
        rank = int(os.environ.get("RANK", "0"))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps({
            "wall_s": wall, "user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
            "minflt": ru1.ru_minflt - ru0.ru_minflt, "phases_s": phases, "categories_s": cats, "top_ops_s": top,
            "profiled_cpu_s": sum(ops.values())}, indent=1))
        return result

    trainer_mod.Trainer.train_step = train_step
    del deepspeed
    from pipeline.stages.train import main

    sys.argv = ["launch/train.py", *argv]
    return main(description="profiled")


def launch(a, extra: list[str]) -> Path:
    from bench.long_context import CONTENDERS, MODEL, dataset
    from pipeline.dist import free_port

    work = Path(a.workdir)
    out = Path(a.out or work / "profile" / f"{a.contender}-{a.seq}-mmap{a.malloc_mmap_threshold}")
    run_out = work / "runs" / f"profile-{a.contender}-{a.seq}"
    args = [f"output={run_out}", f"data.datasets.0.path={dataset(work)}", *MODEL, "deepspeed.config=ds_configs/zero3.json",
            *CONTENDERS[a.contender], f"data.seq_len={a.seq}", f"model.max_position_embeddings={a.seq}",
            "train.micro_batch_size=1", f"train.max_steps={a.steps}", "train.warmup_steps=1", "train.eval_batches=0",
            "checkpoint.every=0", "checkpoint.keep_last=1", "deepspeed.memory_check=false", "monitor.log_every=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LC_PROFILE_OUT": str(out),
           "LC_PROFILE_STEP": str(a.profile_step)}
    if a.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(Path(__file__).resolve()), "--rank-main", *args]
    log = out / "train.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    import shutil

    shutil.rmtree(run_out, ignore_errors=True)
    if code:
        raise SystemExit(f"exit {code}; see {log}")
    return out


def table(out: Path) -> str:
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    lines = [f"{out.name}", "| | " + " | ".join(f"rank {i}" for i in range(len(ranks))) + " |",
             "|---|" + "---:|" * len(ranks)]
    def row(label, vals, fmt="{:.2f}"):
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in vals) + " |")
    row("step wall s", [r["wall_s"] for r in ranks])
    row("user CPU s", [r["user_s"] for r in ranks])
    row("system CPU s", [r["sys_s"] for r in ranks])
    row("minor faults", [r["minflt"] for r in ranks], "{:,}")
    for ph in PHASES:
        if any(ph in r["phases_s"] for r in ranks):
            row(f"phase {ph} (incl.)", [r["phases_s"].get(ph, 0) for r in ranks])
    for c in ranks[0]["categories_s"]:
        row(f"ops: {c} (self)", [r["categories_s"][c] for r in ranks])
    lines.append("")
    lines.append("top ops rank 0: " + ", ".join(f"{k} {v:.2f}" for k, v in ranks[0]["top_ops_s"][:15]))
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main" or any(x == "--rank-main" for x in sys.argv[1:3]):
        # deepspeed's launcher puts --local_rank=N first
        argv = [x for x in sys.argv[1:] if x != "--rank-main"]
        return rank_main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", default="alst")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--profile-step", type=int, default=3)
    p.add_argument("--malloc-mmap-threshold", type=int, default=65536)
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".work" / "long_context"))
    p.add_argument("--out", default="")
    p.add_argument("--table", default="", help="print the table of an earlier profile directory")
    a, extra = p.parse_known_args()
    if a.table:
        print(table(Path(a.table)))
        return 0
    out = launch(a, [x for x in extra if x != "--"])
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

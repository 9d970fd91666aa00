"""Should CPU ranks fix glibc's mmap threshold? Peak RSS and tokens/s of an ordinary training run
with and without it, interleaved (issue 13).

    python bench/malloc_mmap.py [--workdir bench/.work/malloc_mmap] [--repeats 5] [--steps 12] [--warmup 2]
                                [--threshold 65536] [--report]

The run is ``bench/train.py``'s stage contender (b): ``launch/train.py`` on two CPU ranks
(``deepspeed --num_gpus 2``, one thread each), a tiny Llama (4 layers, hidden 256, 4 heads, seq
256, micro-batch 4, a 2,048-token vocabulary from the built-in sample), fp32,
``ds_configs/zero3_offload.json``. Two settings of the ranks' allocator:

* ``glibc``: glibc's default, a dynamic threshold (128 KiB at start, raised to the size of any
  mapped block freed, up to 32 MiB), so after the first frees most tensors come from the heap,
  which keeps freed memory for reuse.
* ``mmapN``: ``MALLOC_MMAP_THRESHOLD_=N`` in the ranks' environment: every allocation from
  ``N`` bytes its own mapping, unmapped when freed (memory back at once; a new block's pages are
  faulted in and zeroed on first touch).

Each round runs both, in an order that alternates per round; per run: the larger rank's peak RSS
(``VmHWM``, :mod:`bench.rank_peaks`), tokens/s over the median step time of steps ``warmup+1..``
(the stage's console) and the run's wall time. The report gives medians and the ratio
of medians (mmap / glibc); the machine's 1-minute load average before each run.

Measured (docs/benchmarks.md, "Long context"): peak RSS 0.90x, tokens/s 0.685x with a 64 KiB
threshold, so the pipeline leaves the allocator alone.

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
from bench.train import FULL, _env, make_dataset, stage_overrides  # noqa: E402

STEP = re.compile(r"^step (\d+) \|.*\| ([\d,]+) tok/s .*\| step ([\d.]+)s", re.M)
MiB = 2**20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(work: Path, data: Path, setting: str, threshold: int, steps: int, warmup: int, i: int) -> dict:
    out = work / "runs" / f"{setting}-{i}"
    shutil.rmtree(out, ignore_errors=True)
    env = _env()
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if setting != "glibc":
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    from pipeline.dist import free_port

    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           *stage_overrides(FULL, data, out, steps, 1), "deepspeed.memory_check=false"]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    logf = work / "logs" / f"{setting}-{i}.log"
    load = os.getloadavg()[0]
    t0 = time.time()
    with open(logf, "w") as fh:
        proc, peaks = run_with_rank_peaks(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = logf.read_text()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"{setting} failed (exit {proc.returncode}); see {logf}:\n{text[-3000:]}")
    step_s = [float(m.group(3)) for m in STEP.finditer(text)]
    tokens_per_step = FULL["seq_len"] * FULL["micro"] * 2
    r = {"setting": setting, "round": i, "peak": max(peaks), "rank_peaks": peaks, "step_s": step_s, "load": load,
         "tokens_per_s": tokens_per_step / statistics.median(step_s[warmup:]), "wall_s": wall}
    log(f"{setting:10s} round {i}: peak {r['peak'] / MiB:.0f} MiB, {r['tokens_per_s']:.0f} tokens/s, load {load:.1f}")
    return r


def report(data: dict) -> str:
    runs = data["runs"]
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    med = {s: {k: statistics.median([r[k] for r in runs if r["setting"] == s]) for k in ("peak", "tokens_per_s")}
           for s in settings}
    lines = ["| setting | peak RSS per round (MiB) | median | tokens/s per round | median | load |", "|---|---|---|---|---|---|"]
    for s in settings:
        rs = [r for r in runs if r["setting"] == s]
        peaks = ", ".join(f"{r['peak'] / MiB:.0f}" for r in rs)
        tps = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
        loads = ", ".join(f"{r['load']:.1f}" for r in rs)
        lines.append(f"| {s} | {peaks} | {med[s]['peak'] / MiB:.0f} | {tps} | {med[s]['tokens_per_s']:.0f} | {loads} |")
    if len(settings) == 2:
        a, b = settings[0], settings[1]
        paired = [y["tokens_per_s"] / x["tokens_per_s"] for x, y in zip([r for r in runs if r["setting"] == a],
                                                                        [r for r in runs if r["setting"] == b])]
        lines += ["", f"{b} / {a}: peak RSS {med[b]['peak'] / med[a]['peak']:.2f}x, tokens/s {med[b]['tokens_per_s'] / med[a]['tokens_per_s']:.3f}x "
                  f"(per round: {', '.join(f'{x:.3f}' for x in paired)})"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".work" / "malloc_mmap"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--threshold", type=int, default=65536)
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.report:
        print(report(json.loads((work / "results.json").read_text())))
        return 0
    data = make_dataset(work, FULL)
    names = ["glibc", f"mmap{a.threshold}"]
    runs: list[dict] = []
    for i in range(a.repeats):
        for s in (names if i % 2 == 0 else names[::-1]):
            runs.append(run(work, data, s, a.threshold, a.steps, a.warmup, i))
            (work / "results.json").write_text(json.dumps({"threshold": a.threshold, "runs": runs}, indent=1))
    print(report({"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

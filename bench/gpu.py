"""The checks only a GPU can give (issue 13, docs/benchmarks.md "On one GPU"), prepared here, run there.

Here (CPU, PyPI reachable), once::

    python bench/gpu.py prepare

writes ``.whl/`` (the wheels the device image lacks: DeepSpeed built as a pure-Python wheel from
its source release, transformers and its Hub client at the versions installed here, pydantic,
hjson, zstandard, ...; ``.git/info/exclude`` ignores it) and ``bench/.work/gpu/`` (Mistral's
32K tokenizer and the built-in sample preprocessed with it, a quarter held out so that the
validation split holds long rows too), and prints the device command. There, in ONE call of the
device tool (``carry: [".whl", "bench/.work/gpu"]``, ``timeout_s`` 560)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
      export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 bench/gpu.py run --out $OUT

Each check has its own time limit and its results are written to ``$OUT/gpu.json`` as soon as
they exist (a call cut short still returns the finished ones); ``$OUT/gpu.log`` has every
command's output:

1. ``env``: the GPU, torch, CUDA, DeepSpeed, transformers.
2. ``gpu_tests``: ``pytest -m gpu`` on the files that hold such tests (tests/test_offload.py: activation offload to host memory
   keeps the loss and the gradients of checkpointing alone and lowers the device peak).
3. ``mfu``: bf16, ZeRO-3 (``ds_configs/zero3.json`` resolved as the stage resolves it), one
   GPU, TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632) with
   the 32K vocabulary, seq 2048, micro-batch 4: (a) a bare DeepSpeed loop
   (``bench/_train_workers.py --mode ds``, the same JSON) then (b) the stage
   (``launch/train.py``); tokens/s and MFU from the median step time of steps 6.., with the
   stage monitor's FLOPs per token and peak FLOP/s, and b/a.
4. ``alst``: the longest sequence ALST trains on one GPU: the planner's ``--longest`` for the
   same model with activation checkpointing + offload, the tiled MLP and the tiled head + loss,
   then the stage at min(that, ``--alst-max-tokens``: attention time grows with the square of
   the length, and the call has minutes) for 2 steps; the peak device memory it reached
   (``mem/max_allocated`` in its TensorBoard) against the planner's estimate, 25 % shorter after
   an out-of-memory.

``run --tiny`` runs the same plumbing on CPU ranks with a tiny model in fp32 (how this script is
checked without a GPU).
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
from bench.machine import stage_scalars

WORK = ROOT / "bench" / ".work" / "gpu"
WHEELS = ROOT / ".whl"
# what the device image lacks or holds at another version (docs/dev/testing.md "GPU checks"); numpy, torch,
# pyarrow and the rest of the image stay as they are there
WHEEL_NAMES = ["transformers", "huggingface-hub", "kernels", "pydantic", "hjson", "zstandard"]
PY312 = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
         "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
         "--platform", "manylinux1_x86_64"]
MODELS = {  # (hidden, layers, heads, kv heads, intermediate), seq, micro-batch
    "1b": ((2048, 22, 32, 4, 5632), 2048, 4),
    "tiny": ((128, 2, 4, 2, 256), 128, 2),
}
LOG: Path | None = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(line + "\n")


# ---------------------------------------------------------------------------- here


def prepare() -> int:
    import importlib.metadata as md

    from bench.long_context import tokenizer_dir

    WHEELS.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"  # the wheels travel as carried files, never committed
    if exclude.parent.is_dir() and "/.whl/" not in (exclude.read_text() if exclude.exists() else ""):
        with open(exclude, "a") as f:
            f.write("/.whl/\n")
    pins = [f"{n}=={md.version(n)}" for n in WHEEL_NAMES]
    log(f"wheels: {' '.join(pins)} and their needs, for Python 3.12 (numpy left out: the image has it)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *PY312, "-d", str(WHEELS), *pins], check=True)
    for numpy in WHEELS.glob("numpy-*.whl"):
        numpy.unlink()
    ds = f"deepspeed=={md.version('deepspeed')}"
    log(f"{ds}: a pure-Python wheel from its source release (PyPI has no wheel; its ops build on the GPU when used)")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(WHEELS), ds],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    data = WORK / "data"
    if not (data / "manifest.json").exists():
        tok = tokenizer_dir(WORK)
        subprocess.run([sys.executable, str(ROOT / "launch" / "preprocess.py"), f"output={data}", f"tokenizer.path={tok}",
                        "sample_docs=20000", "val_fraction=0.25"], cwd=ROOT, check=True)
    size = sum(f.stat().st_size for d in (WHEELS, WORK / "data", WORK / "tokenizer") for f in d.rglob("*") if f.is_file())
    log(f"carry: .whl, bench/.work/gpu ({size / 2**20:.0f} MiB; the tool takes 64 MiB with the tree)")
    shutil.rmtree(WORK / "wheel", ignore_errors=True)
    print('device call: carry [".whl", "bench/.work/gpu"], timeout_s 560, command:\n'
          "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && "
          "export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 bench/gpu.py run --out $OUT")
    return 0


# ---------------------------------------------------------------------------- there


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` (output into the log); ``(exit code, output)``, 124 on timeout."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})})
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(f"$ {' '.join(cmd)}  # exit {code}, {time.time() - t0:.0f} s\n{out}\n")
    return code, out


def model_args(shape: tuple, seq: int) -> list[str]:
    h, layers, heads, kv, inter = shape
    return ["model.model_type=llama", f"model.hidden_size={h}", f"model.num_layers={layers}", f"model.num_heads={heads}",
            f"model.num_kv_heads={kv}", f"model.intermediate_size={inter}", f"model.max_position_embeddings={seq}"]


# DeepSpeed's launcher, one rank (the GPU, or one CPU rank with --tiny); by module: a wheel installed with
# pip --target puts no `deepspeed` script on the PATH
LAUNCH = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]


def check_mfu(out: Path, gpu: bool, size: str, steps: int, timeout: float) -> dict:
    from bench.train import worker_spec
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.stages.train import TrainConfig
    from pipeline.training.ds_config import resolve_for_recipe
    from pipeline.training.model import hf_config
    from pipeline.training.monitor import flops_per_token, peak_flops

    shape, seq, micro = MODELS[size]
    precision = "bf16" if gpu else "fp32"
    data = WORK / "data"
    stage = ["launch/train.py", f"output={out / 'mfu-stage'}", f"data.datasets.0.path={data}", f"data.seq_len={seq}",
             *model_args(shape, seq), f"train.micro_batch_size={micro}", "train.grad_accum=1", f"train.max_steps={steps}",
             "train.warmup_steps=2", "train.eval_batches=1", "train.eval_every=0", "checkpoint.every=0",
             "monitor.log_every=1", "deepspeed.config=ds_configs/zero3.json", f"deepspeed.precision={precision}"]
    cfg = load_config(TrainConfig, None, stage[1:])
    tok = read_manifest(data)["tokenizer"]
    conf = hf_config(cfg.model, tok["vocab_size"], seq, tok)
    ds = resolve_for_recipe(cfg, cfg.deepspeed.config, world=1, precision=precision, hidden=conf.hidden_size)
    work = out / "mfu-bare"
    work.mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(work / "model")
    (work / "ds_config.json").write_text(json.dumps(ds, indent=1))
    spec = worker_spec(cfg, data, work / "model", work / "ds_config.json", steps, work)
    (work / "spec.json").write_text(json.dumps(spec))
    fpt = flops_per_token(conf, seq)
    peak = peak_flops("cuda" if gpu else "cpu", precision)[0]
    res = {"model": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), shape)), "seq_len": seq,
           "micro_batch": micro, "precision": precision, "flops_per_token": fpt, "peak_flops": peak, "steps": steps}
    runs = {"a_bare_deepspeed": [*LAUNCH, "bench/_train_workers.py", "--mode", "ds", "--spec", str(work / "spec.json")],
            "b_stage": [*LAUNCH, *stage]}
    for name, cmd in runs.items():
        code, text = sh(cmd, timeout)
        if name.startswith("a"):
            step_s = [float(m.group(1)) for m in re.finditer(r"^BENCH step \d+ \S+ \S+ \S+ (\S+)$", text, re.MULTILINE)]
        else:  # the stage's own step times at full precision (its console rounds them to 10 ms)
            step_s = [v for _, v in sorted((stage_scalars(out / "mfu-stage", "perf/step_time_s") or {}).items())]
        timed = step_s[5:] or step_s[-1:]
        r = {"exit": code, "step_s": step_s}
        if timed and code == 0:
            s = statistics.median(timed)
            r |= {"median_step_s": s, "tokens_per_s": micro * seq / s, "mfu": fpt * micro * seq / s / peak if peak else None}
        else:
            r["tail"] = text[-1500:]
        res[name] = r
        log(f"mfu {name}: {json.dumps({k: v for k, v in r.items() if k not in ('step_s', 'tail')})}")
    a, b = res["a_bare_deepspeed"].get("tokens_per_s"), res["b_stage"].get("tokens_per_s")
    res["b_over_a"] = b / a if a and b else None
    return res


def plan_row(text: str, config: str) -> dict[str, str]:
    """The planner table's row of ``config`` as ``{column header: cell}`` ({} when absent)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    head = next((r for r in rows if r[0] == "config"), None)
    row = next((r for r in rows if r[0] == config), None)
    return dict(zip(head, row)) if head and row else {}


def check_alst(out: Path, gpu: bool, size: str, max_tokens: int, timeout: float) -> dict:
    shape, _, _ = MODELS[size]
    data = WORK / "data"
    savers = ["model.activation_checkpointing=true", "model.activation_offload=true", "model.tiled_mlp=true",
              "model.tiled_logits=true"]
    base = [f"data.datasets.0.path={data}", *model_args(shape, 1 << 22)[:-1], "train.micro_batch_size=1", "train.grad_accum=1",
            "deepspeed.config=ds_configs/zero3.json", f"deepspeed.precision={'bf16' if gpu else 'fp32'}", *savers]
    code, text = sh([sys.executable, "launch/plan.py", *base, "model.max_position_embeddings=4194304", "data.seq_len=4096",
                     "--longest"], 120)
    row = plan_row(text, "zero3.json")
    planned = int(row["longest seq_len"].replace(",", "")) if code == 0 and row.get("longest seq_len", "-") != "-" else 0
    res = {"planner_exit": code, "planned_longest": planned, "plan": text[-3000:], "max_tokens": max_tokens, "tries": []}
    log(f"alst: the planner's longest for ZeRO-3 on this device: {planned:,}")
    seq = min(planned, max_tokens) // 1024 * 1024 if planned else max_tokens
    deadline = time.time() + timeout
    while seq >= 1024 and time.time() < deadline:
        _, text = sh([sys.executable, "launch/plan.py", *base, f"model.max_position_embeddings={seq}", f"data.seq_len={seq}"], 120)
        row = plan_row(text, "zero3.json")
        estimate = row.get("total per GPU") or row.get("total per rank")  # GiB; CPU ranks (--tiny): per rank
        run = out / f"alst-{seq}"
        cmd = [*LAUNCH, "launch/train.py", f"output={run}", *base, f"data.seq_len={seq}",
               f"model.max_position_embeddings={seq}", "train.max_steps=2", "train.warmup_steps=1", "train.eval_batches=1",
               "train.eval_every=0", "checkpoint.every=0", "monitor.log_every=1", "deepspeed.memory_check=false"]
        code, text = sh(cmd, max(60.0, deadline - time.time()))
        step_s = [float(x) for x in re.findall(r"^step \d+ \|.*\| step ([\d.]+)s", text, re.MULTILINE)]
        t = {"seq_len": seq, "exit": code, "step_s": step_s, "planner_total_per_gpu_gib": estimate, "max_allocated_gib": max((stage_scalars(run, "mem/max_allocated") or {}).values(), default=None),
             "oom": "out of memory" in text.lower()}
        res["tries"].append(t)
        log(f"alst {seq:,} tokens: {json.dumps({k: v for k, v in t.items()})}")
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        if code == 0:
            res["trained"] = seq
            break
        if not t["oom"]:
            res["tail"] = text[-2000:]
            break
        seq = int(seq * 0.75) // 1024 * 1024
    return res


def run(out: Path, tiny: bool, steps: int, alst_max: int) -> int:
    global LOG
    import torch

    out.mkdir(parents=True, exist_ok=True)
    LOG = out / "gpu.log"
    gpu = torch.cuda.is_available() and not tiny
    size = "tiny" if tiny else "1b"
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(results, indent=1))

    import deepspeed
    import transformers

    results["env"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
                      "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    log(f"env: {results['env']}")
    save()
    if not tiny:
        # the files holding `gpu` tests (collecting all of tests/ would import lm_eval and trl, absent there); without
        # the project's addopts (its xdist options need a pytest-xdist the image may not have at that version)
        files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
        code, text = sh([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "gpu", *files], 240)
        results["gpu_tests"] = {"exit": code, "summary": text.strip().splitlines()[-1] if text.strip() else ""}
        log(f"gpu tests: {results['gpu_tests']}")
        save()
    results["mfu"] = check_mfu(out, gpu, size, steps, 240)
    save()
    results["alst"] = check_alst(out, gpu, size, alst_max, 240)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="here: wheels and data to carry")
    r = sub.add_parser("run", help="there: the checks")
    r.add_argument("--out", required=True)
    r.add_argument("--tiny", action="store_true", help="CPU ranks, a tiny model, fp32: the plumbing only")
    r.add_argument("--steps", type=int, default=20, help="steps of each MFU run (the first 5 not timed)")
    r.add_argument("--alst-max-tokens", type=int, default=131072)
    a = p.parse_args()
    if a.cmd == "prepare":
        return prepare()
    return run(Path(a.out), a.tiny, a.steps, a.alst_max_tokens)


if __name__ == "__main__":
    sys.exit(main())

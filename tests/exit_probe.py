"""Many short 2-rank launches in a row, counting the ranks that die at exit (SIGABRT etc.).

    python tests/exit_probe.py --launches 40 --logs DIR [--end plain|finish] [--engine]

Each launch is two fresh rank processes forked from this one after the heavy imports
(torch, DeepSpeed, TensorBoard), so a launch costs its process group and its exit, not
8 s of imports per rank, while every rank still ends through a whole interpreter exit. A
rank does what a stage's rank does around its work: ``pipeline.dist.init`` (DeepSpeed's
``init_distributed`` on gloo), a group of its own like the ones DeepSpeed's ZeRO makes,
an all-reduce on both, TensorBoard events on rank 0, optionally a tiny
``deepspeed.initialize`` + step (``--engine``), ``dist.shutdown()`` while the stage's objects
still hold their groups, then the end the entry scripts use (``--end finish``:
``pipeline.dist.finish``) or a plain interpreter exit (``--end plain``).

Prints one JSON line: launches, ranks, ok, aborted (killed by a signal), failed (other
non-zero codes), the threads rank 0 of the first launch still had after ``dist.shutdown()``,
and the log tails of the ranks that did not end with 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import quiet  # noqa: E402,F401  (as the entry scripts: before DeepSpeed is imported)

import deepspeed  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from pipeline import dist  # noqa: E402

# What every rank would otherwise do first on its own: probe DeepSpeed's ops (imports
# setuptools) and load its CPU comm op (0.9 s per rank).
with quiet.stdout_filtered():
    from deepspeed.comm.torch import build_shm_op  # noqa: E402

    build_shm_op()

KEEP = []  # what a stage's engine and optimizer hold until the interpreter ends


def rank_body(rank: int, logdir: str, engine: bool) -> None:
    env = dist.init(dist.DistConfig(timeout_s=60))
    x = torch.full((4,), float(rank + 1))
    torch.distributed.all_reduce(x)
    group = torch.distributed.new_group(ranks=[0, 1])
    torch.distributed.all_reduce(x, group=group)
    # A stage's DeepSpeed engine outlives dist.shutdown(): its parameters' gradient hooks
    # (C++ autograd nodes) hold the engine, a cycle gc cannot see, so the optimizer's groups,
    # the world group and rank 0's store live on into the interpreter's exit. Hold both here.
    KEEP.extend([group, torch.distributed.distributed_c10d._get_default_group()])
    if engine:
        model = torch.nn.Linear(8, 8)
        cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
               "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        loss = eng(torch.ones(1, 8)).sum()
        eng.backward(loss)
        eng.step()
        KEEP.append(eng)
    if env.rank == 0:
        w = SummaryWriter(log_dir=logdir, flush_secs=10)
        w.add_scalar("probe/value", float(x[0]), 1)
        w.close()
    dist.shutdown()
    threads = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                threads.append(f.read().strip())
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile (ESRCH when it ends between listdir and read)
    threads.sort()
    print(f"probe: threads after shutdown: {' '.join(threads)}", flush=True)


def launch(i: int, logs: str, end: str, engine: bool) -> list[tuple[int, int, str]]:
    port = dist.free_port()
    pids = []
    for r in range(2):
        log = os.path.join(logs, f"launch{i:03d}-rank{r}.log")
        pid = os.fork()
        if pid == 0:  # the rank: never returns into the loop below
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            rank_body(r, os.path.join(logs, f"tb{i:03d}"), engine)
            if end == "finish":
                dist.finish(0)
            raise SystemExit(0)  # through the whole interpreter exit, as `python script.py` ends
        pids.append((pid, r, log))
    out = []
    for pid, r, log in pids:
        _, status = os.waitpid(pid, 0)
        out.append((r, status, log))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launches", type=int, default=40)
    ap.add_argument("--logs", required=True)
    ap.add_argument("--end", choices=("plain", "finish"), default="finish")
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=170.0, help="stop starting launches after this long")
    args = ap.parse_args()
    os.makedirs(args.logs, exist_ok=True)
    t0, ranks, ok, aborted, failed, bad, first = time.monotonic(), 0, 0, 0, 0, [], []
    launches = 0
    for i in range(args.launches):
        if time.monotonic() - t0 > args.max_seconds:
            break
        launches += 1
        for r, status, log in launch(i, args.logs, args.end, args.engine):
            ranks += 1
            if os.WIFSIGNALED(status):
                aborted += 1
                what = f"signal {signal.Signals(os.WTERMSIG(status)).name}"
            elif os.WEXITSTATUS(status) != 0:
                failed += 1
                what = f"exit {os.WEXITSTATUS(status)}"
            else:
                ok += 1
                continue
            with open(log, errors="replace") as f:
                bad.append({"launch": i, "rank": r, "end": what, "tail": f.read()[-1500:]})
        if launches == 1:
            with open(os.path.join(args.logs, "launch000-rank0.log"), errors="replace") as f:
                first = [line for line in f if line.startswith("probe: threads")]
    print(json.dumps({"launches": launches, "ranks": ranks, "ok": ok, "aborted": aborted, "failed": failed,
                      "seconds": round(time.monotonic() - t0, 1), "threads_after_shutdown": first, "bad": bad}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

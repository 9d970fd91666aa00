"""Per-rank code of the training benchmark's contenders (a), (c) and (d); see ``bench/train.py``.

    deepspeed --num_gpus 2 bench/_train_workers.py --mode ds  --spec SPEC.json   # (a) bare DeepSpeed loop
    deepspeed --num_gpus 2 bench/_train_workers.py --mode hf  --spec SPEC.json   # (c) Hugging Face Trainer
    torchrun --nproc-per-node 2 bench/_train_workers.py --mode ddp --spec SPEC.json  # (d) plain DDP

``SPEC.json`` (written by ``bench/train.py``) names the preprocessed dataset, the model config
directory (a ``config.json`` shared by every contender), the resolved DeepSpeed JSON, the batch
and optimizer hyper-parameters and the number of steps.

Rank 0 prints machine-readable lines on stdout (flushed at once), which the benchmark
timestamps when they arrive, exactly as it timestamps the stage's ``step N |`` lines::

    BENCH mark <name> <time.time()>          # imports done, process group up, engine ready
    BENCH step <n> <time.time()> <loss> <data wait s> <step s>
    BENCH info <json>

Heavy modules are imported inside the mode functions, after the ``start`` mark, so the
import time of each contender is its own.
"""

from __future__ import annotations

import time

_T0 = time.time()  # as early as possible: interpreter start-up is before this, imports after

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_RANK = int(os.environ.get("RANK", "0"))


def say(*parts) -> None:
    """One ``BENCH`` line from rank 0, flushed (the benchmark timestamps its arrival)."""
    if _RANK == 0:  # one write() per line: the ranks share the pipe (python -u writes print's pieces apart)
        sys.stdout.write(" ".join(["BENCH", *map(str, parts)]) + "\n")
        sys.stdout.flush()


def mark(name: str) -> None:
    say("mark", name, f"{time.time():.6f}")


def lr_lambda(spec: dict):
    """Linear warm-up then cosine decay to ``min_lr_ratio`` (the stage's default schedule)."""
    warm, total, floor = spec["warmup_steps"], spec["max_steps"], spec["min_lr_ratio"]

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if total <= warm:
            return 1.0
        progress = min(1.0, (s - warm) / (total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as the stage builds them: no decay on 1-D parameters and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _loader(spec: dict, rank: int, world: int):
    from pipeline.data.sampler import BlendedSamples, RankLoader

    samples = BlendedSamples([(spec["data"], 1.0)], "train", spec["seq_len"], spec["seed"], verify="fast")
    return RankLoader(samples, rank, world, spec["micro_batch"], 1)


def _info(extra: dict) -> None:
    import torch

    say("info", json.dumps({"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), **extra}))


# ---------------------------------------------------------------------------- (a) bare DeepSpeed


def run_ds(spec: dict) -> None:
    import deepspeed
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import pipeline.data.sampler  # noqa: F401  (the data reader, imported like the rest)

    mark("imports")
    gpu = torch.cuda.is_available()  # bench/gpu.py: one GPU, NCCL, bf16 as the JSON says
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mark("dist")
    ds = json.loads(open(spec["ds_config"]).read())
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (ZeRO-3: from_config builds under zero.Init)
    torch.manual_seed(spec["seed"])
    conf = AutoConfig.from_pretrained(spec["model_dir"])
    dtype = torch.bfloat16 if (ds.get("bf16") or {}).get("enabled") else torch.float32
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, spec["weight_decay"]), config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec)),
    )
    mark("ready")
    loader = _loader(spec, rank, world)
    _info({"world": world, "n_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())})
    vocab = conf.vocab_size
    for step in range(1, spec["max_steps"] + 1):
        t0 = time.perf_counter()
        batch = next(loader).to(engine.device, non_blocking=True)
        wait = time.perf_counter() - t0
        logits = engine(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        if gpu:
            torch.cuda.synchronize()  # the step's time, not its launch
        say("step", step, f"{time.time():.6f}", f"{loss.item():.5f}", f"{wait:.6f}", f"{time.perf_counter() - t0:.6f}")
    loader.close()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- (d) plain DDP


def run_ddp(spec: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoConfig, AutoModelForCausalLM

    import pipeline.data.sampler  # noqa: F401

    mark("imports")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mark("dist")
    torch.manual_seed(spec["seed"])
    conf = AutoConfig.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model, spec["weight_decay"]), lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec))
    mark("ready")
    loader = _loader(spec, rank, world)
    _info({"world": world, "n_params": sum(p.numel() for p in model.parameters())})
    vocab = conf.vocab_size
    for step in range(1, spec["max_steps"] + 1):
        t0 = time.perf_counter()
        batch = next(loader)
        wait = time.perf_counter() - t0
        logits = ddp(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        sched.step()
        say("step", step, f"{time.time():.6f}", f"{loss.item():.5f}", f"{wait:.6f}", f"{time.perf_counter() - t0:.6f}")
    loader.close()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- (c) Hugging Face Trainer


def run_hf(spec: dict) -> None:
    import torch
    from accelerate import PartialState
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from pipeline.data.sampler import BlendedSamples

    mark("imports")
    # Known pitfall on CPU: without a pre-built gloo state the Trainer counts one process and
    # DeepSpeed stops with "train_batch_size 8 != 4 * 1 * 2". Build accelerate's state for
    # DeepSpeed on gloo first and tell the Trainer to reuse it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")  # not cpu=True: that path skips DeepSpeed
    rank, world = state.process_index, state.num_processes
    mark("dist")
    ds = json.loads(open(spec["ds_config"]).read())
    micro, steps = spec["micro_batch"], spec["max_steps"]
    args = TrainingArguments(
        output_dir=spec["workdir"], deepspeed=ds, use_cpu=True,
        accelerator_config={"use_configured_state": True},
        per_device_train_batch_size=micro, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=spec["lr"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["grad_clip"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=spec["warmup_steps"], seed=spec["seed"], train_sampling_strategy="sequential",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    # TrainingArguments(deepspeed=...) switches from_config to zero.Init (ZeRO-3), like the others.
    torch.manual_seed(spec["seed"])
    conf = AutoConfig.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False

    samples = BlendedSamples([(spec["data"], 1.0)], "train", spec["seq_len"], spec["seed"], verify="fast")

    class Sequences(torch.utils.data.Dataset):
        """Global sample ``i`` of the blended stream, as the Trainer's idiom wants it (labels = inputs;
        the model shifts them, so 255 of the 256 positions of a row are targets)."""

        read_s = 0.0

        def __len__(self) -> int:
            return steps * micro * world

        def __getitem__(self, i: int) -> dict:
            t = time.perf_counter()
            x = torch.from_numpy(samples[i][:-1])
            Sequences.read_s += time.perf_counter() - t
            return {"input_ids": x, "labels": x}

    class Stamp(TrainerCallback):
        t0 = None
        read0 = 0.0

        def on_train_begin(self, a, s, c, **kw):
            mark("ready")
            _info({"world": world, "n_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())})

        def on_step_begin(self, a, s, c, **kw):
            Stamp.t0 = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            # The sequential sampler + accelerate's batch sharding give rank r the samples
            # [8t + 4r, 8t + 4r + 4) at step t: the same as RankLoader (micro 4, accum 1, 2 ranks).
            wait, Stamp.read0 = Sequences.read_s - Stamp.read0, Sequences.read_s
            say("step", s.global_step, f"{time.time():.6f}", "nan", f"{wait:.6f}",
                f"{time.perf_counter() - (Stamp.t0 or time.perf_counter()):.6f}")

    trainer = Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[Stamp()])
    out = trainer.train()
    say("info", json.dumps({"train_loss": out.training_loss}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("ds", "hf", "ddp"), required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # passed by the deepspeed launcher
    ns = p.parse_args()
    say("mark", "start", f"{_T0:.6f}")
    spec = json.loads(open(ns.spec).read())
    {"ds": run_ds, "hf": run_hf, "ddp": run_ddp}[ns.mode](spec)
    mark("done")


if __name__ == "__main__":
    main()

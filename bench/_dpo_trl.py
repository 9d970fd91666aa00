"""Per-rank code of the DPO benchmark's TRL contenders (t), (tp) and (tg); see ``bench/dpo.py``.

    deepspeed --num_gpus 2 bench/_dpo_trl.py --spec SPEC.json [--precompute] [--gradient-checkpointing]

``SPEC.json`` (written by ``bench/dpo.py``) names the model directory (weights, tokenizer with
the stage's chat template), the pairs in the order the stage's loader deals them (global
micro-batch ``2t + r`` of the list goes to rank ``r`` at step ``t``: TRL's sequential sampler
and accelerate's batch sharding give every rank the very pairs the stage gives it), the
DeepSpeed JSON the stage resolved (given to ``DPOConfig(deepspeed=...)`` as it is), the
optimizer values written in it, micro-batch, steps, ``beta`` and ``max_length``.

Rank 0 prints lines the benchmark timestamps when they arrive (as ``bench/_train_workers.py``)::

    BENCH mark <name> <time.time()>                      # imports, process group, trainer built
    BENCH step <n> <time.time()> <num_tokens so far>     # end of every optimizer step
    BENCH info <json>

``num_tokens`` is TRL's own count (``DPOTrainer._total_train_tokens``: the attention mask's sum
of the chosen and rejected rows, gathered over the ranks).
"""

from __future__ import annotations

import time

_T0 = time.time()

import argparse
import json
import os
import sys

_RANK = int(os.environ.get("RANK", "0"))


def say(*parts) -> None:
    if _RANK == 0:  # one write() per line: the ranks share the pipe
        sys.stdout.write(" ".join(["BENCH", *map(str, parts)]) + "\n")
        sys.stdout.flush()


def mark(name: str) -> None:
    say("mark", name, f"{time.time():.6f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True (no reference model)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="DPOConfig's default gradient_checkpointing=True (off otherwise, as the stage's default)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # passed by the deepspeed launcher
    ns = p.parse_args()
    say("mark", "start", f"{_T0:.6f}")
    with open(ns.spec) as f:
        spec = json.load(f)

    import torch
    from accelerate import PartialState
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    mark("imports")
    # As for the HF Trainer on CPU (bench/_train_workers.py): accelerate's state built for DeepSpeed
    # on gloo first, reused by the Trainer (otherwise it counts one process).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    world = state.num_processes
    mark("dist")
    with open(spec["ds_config"]) as f:
        ds = json.load(f)
    opt = ds["optimizer"]["params"]
    args = DPOConfig(
        output_dir=spec["workdir"], deepspeed=ds, use_cpu=True, accelerator_config={"use_configured_state": True},
        bf16=False, fp16=False,  # DPOConfig defaults bf16 on: accelerate would autocast the CPU forwards to bf16
        per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=1, max_steps=spec["max_steps"],
        learning_rate=opt["lr"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"], max_grad_norm=ds.get("gradient_clipping", 1.0),
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=spec["warmup_steps"], seed=spec["seed"], train_sampling_strategy="sequential",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, logging_steps=1,
        beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
        precompute_ref_log_probs=ns.precompute, model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        dataset_num_proc=None,
        # DPOConfig defaults gradient_checkpointing on (a recomputed forward in every backward); the stage's
        # model.activation_checkpointing defaults off: off here unless asked, so both do the same work
        gradient_checkpointing=ns.gradient_checkpointing,
    )
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    # a file-backed dataset in a cache of this run: precompute_ref_log_probs writes its table next to the
    # dataset's cache files, where every rank reads it back (an in-memory dataset's cache is per process)
    with state.main_process_first():
        data = load_dataset("json", data_files=spec["pairs_ordered"], split="train",
                            cache_dir=os.path.join(spec["workdir"], "datasets-cache"))
    torch.manual_seed(spec["seed"])
    holder: dict = {}

    class Stamp(TrainerCallback):
        def on_train_begin(self, a, s, c, **kw):
            mark("ready")

        def on_step_end(self, a, s, c, **kw):
            say("step", s.global_step, f"{time.time():.6f}", holder["trainer"]._total_train_tokens)

    # the one-off reference pass of precompute_ref_log_probs=True, timed (it runs inside the trainer's constructor)
    precompute_s: list[float] = []
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        t = time.time()
        try:
            return original(self, *a, **k)
        finally:
            precompute_s.append(time.time() - t)

    DPOTrainer._precompute_ref_logps = timed
    t = time.time()
    # the model by its path: TRL loads it (and, without precompute, the reference from the same path)
    # under zero.Init, since DPOConfig(deepspeed=...) made the HF DeepSpeed config current
    trainer = DPOTrainer(model=spec["model_dir"], args=args, train_dataset=data, processing_class=tok,
                         callbacks=[Stamp()])
    holder["trainer"] = trainer
    seen: dict = {}

    def probe(module, args):  # what the forward really runs with (autocast, dtype, threads), once
        if not seen:
            seen.update(autocast_cpu=torch.is_autocast_enabled("cpu"), input_dtype=str(args[0].dtype),
                        threads=torch.get_num_threads(), interop=torch.get_num_interop_threads())
            say("info", json.dumps({"forward": seen}))

    trainer.model.get_output_embeddings().register_forward_pre_hook(probe)
    built = time.time() - t
    mark("built")
    first = trainer.train_dataset[0]
    say("info", json.dumps({"world": world, "gradient_checkpointing": bool(args.gradient_checkpointing), "mixed_precision": str(trainer.accelerator.mixed_precision), "precompute": ns.precompute, "trainer_init_s": built, "precompute_s": sum(precompute_s) if precompute_s else None,
                            "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
                            "first_pair": {k: first[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}}))
    out = trainer.train()
    say("info", json.dumps({"train_loss": out.training_loss, "num_tokens": trainer._total_train_tokens}))
    mark("done")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

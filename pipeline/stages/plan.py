"""``python launch/plan.py``: which DeepSpeed config and micro batch fit a recipe on a target.

Reads a train or finetune recipe (the stage from ``--stage`` or the recipe's keys), describes the
target (detected, or given: GPUs per node, nodes, GPU / CPU / NVMe memory), runs
:func:`pipeline.training.plan.make_plan` and prints :func:`pipeline.training.plan_report.report`;
with ``--longest``, :func:`pipeline.training.plan.longest_plan` instead (the longest ``seq_len``
each config fits) and :func:`pipeline.training.plan_report.longest_report`.
Exit codes: 0 something fits, 1 nothing fits, 2 bad config or arguments.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.precision import NAMES
from pipeline.stages.finetune import finetune_conf, finetune_head, planning_seq_len
from pipeline.stages.train import planning_conf
from pipeline.training.plan import SEQ_MULTIPLE, GiB, Recipe, detect_target, longest_plan, make_plan
from pipeline.training.plan_report import cpu_memory_assumption, longest_report, report
from pipeline.training.resolve import recipe_from
from pipeline.training.tasks import TASKS


def _stage_of(config_file: str | None) -> str:
    import yaml

    if not config_file:
        return "train"
    try:
        data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "train"  # load_config reports the problem with its own message
    finetune_keys = {"task", *(task.section for task in TASKS.values())}  # a new task's section counts too
    return "finetune" if isinstance(data, dict) and finetune_keys & set(data) else "train"


def _recipe_for_cli(stage: str, cfg: Any, vocab_size: int, precision: str) -> Recipe:
    """The recipe as the stage itself builds it (:func:`pipeline.training.resolve.recipe_from`)."""
    if stage == "finetune":
        return recipe_from(cfg, finetune_conf(cfg), seq_len=planning_seq_len(cfg), head=finetune_head(cfg),
                           precision=precision)
    conf, note = planning_conf(cfg, vocab_size)
    if note:
        print(f"{note} (set --vocab-size)")
    return recipe_from(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm", precision=precision)


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/plan.py``: print the memory table for a recipe and a target; exit 0 if something fits."""
    import argparse

    from pipeline.cli import report_errors
    from pipeline.config import load_config

    p = argparse.ArgumentParser(prog="launch/plan.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="a train or finetune YAML recipe")
    p.add_argument("--stage", choices=("train", "finetune"), help="the recipe's stage (default: from its keys)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (default: detected; CPU ranks: 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: detected free memory; 0 = CPU ranks)")
    p.add_argument("--cpu-memory", type=float,
                   help="GiB of CPU RAM per node available to the job (default: MemAvailable; for GPUs given with "
                        "--gpu-memory on a machine without GPUs: 128 GiB per GPU, said in the output)")
    p.add_argument("--nvme", type=float,
                   help="GiB free on the NVMe offload disk per node (default: free space at deepspeed.nvme_path)")
    p.add_argument("--precision", choices=NAMES,
                   help="training precision (default: deepspeed.precision; auto = bf16 on GPUs, fp32 on CPU)")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of a new model when its data is not there yet")
    p.add_argument("--longest", action="store_true",
                   help="instead of the table at the recipe's seq_len: the longest seq_len each config fits on the target "
                        "(at the recipe's micro batch and parallel.sequence_parallel_size), as written and with every "
                        "memory saver on")
    p.add_argument("--seq-multiple", type=int, metavar="N",
                   help=f"with --longest: search seq_len in multiples of N tokens (default {SEQ_MULTIPLE}, times the "
                        "sequence-parallel degree where that does not divide it)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for the stage")

    def body() -> int:
        ns = p.parse_args(argv)
        # a zero or negative count reached DeepSpeed's batch arithmetic as a ValueError traceback
        checks = (("--nodes", ns.nodes, 1, "at least 1"), ("--gpus-per-node", ns.gpus_per_node, 1, "at least 1"),
                  ("--gpu-memory", ns.gpu_memory, 0, "0 GiB (CPU ranks) or more"),
                  ("--cpu-memory", ns.cpu_memory, 1e-9, "more than 0 GiB"), ("--nvme", ns.nvme, 0, "0 GiB or more"))
        for flag, value, low, need in checks:
            if value is not None and value < low:
                p.error(f"{flag} must be {need}, got {value:g}")
        if ns.seq_multiple is not None and not ns.longest:
            p.error("--seq-multiple is the step of --longest's search; add --longest")
        if ns.seq_multiple is not None and ns.seq_multiple < 1:
            p.error(f"--seq-multiple must be at least 1 token, got {ns.seq_multiple}")
        stage = ns.stage or _stage_of(ns.config)
        if stage == "finetune":
            from pipeline.stages.finetune import FinetuneConfig as cls
        else:
            from pipeline.stages.train import TrainConfig as cls
        cfg = load_config(cls, ns.config, ns.overrides)
        target = detect_target(ns.gpus_per_node, nodes=ns.nodes, nvme_path=cfg.deepspeed.nvme_path or "/local_nvme")
        gpus_here = target.on_gpu
        if ns.gpu_memory is not None:
            target.gpu_memory = int(ns.gpu_memory * GiB)
        if ns.cpu_memory is not None:
            target.cpu_memory = int(ns.cpu_memory * GiB)
        if ns.nvme is not None:
            target.nvme = int(ns.nvme * GiB)
        given = any(v is not None for v in (ns.gpu_memory, ns.cpu_memory, ns.nvme, ns.gpus_per_node))
        if given:
            target.detected = "given on the command line" + (", the rest detected" if target.detected else "")
        if target.on_gpu and not gpus_here and ns.cpu_memory is None:
            # GPUs described from a machine without any: its MemAvailable is not the GPU nodes' RAM
            # (a CPU login node's few GiB made nothing fit a 7B on 8 x 80 GB), so assume a stated figure.
            target.cpu_memory, note = cpu_memory_assumption(target.gpus_per_node)
            target.detected = "GPUs given on the command line; CPU RAM assumed, see the note"
            print(note)
        precision = ns.precision or cfg.deepspeed.precision
        if precision == "auto":
            precision = "bf16" if target.on_gpu else "fp32"
        recipe = _recipe_for_cli(stage, cfg, ns.vocab_size, precision)
        if target.world % recipe.sp:
            p.error(f"parallel.sequence_parallel_size={recipe.sp} does not divide the target's {target.world} ranks "
                    "(--gpus-per-node x --nodes)")
        if ns.longest:
            step = ns.seq_multiple or math.lcm(SEQ_MULTIPLE, recipe.sp)
            if step % recipe.sp:
                p.error(f"--seq-multiple {step} is not a multiple of parallel.sequence_parallel_size={recipe.sp} (each "
                        f"rank holds seq_len / sp tokens); use e.g. {math.lcm(step, recipe.sp)}")
            rows = longest_plan(recipe, target, step=step)
            print(longest_report(target, recipe, rows, step), end="")
            return 0 if any(plain.seq_len for plain, _ in rows) else 1
        plan = make_plan(recipe, target)
        print(report(plan), end="")
        return 0 if plan.choice is not None else 1

    return report_errors(body)

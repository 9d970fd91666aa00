"""What ``python launch/plan.py`` prints: the planner's table and report, and the CPU memory assumed
for GPU nodes described from a machine without GPUs.

The estimates themselves live in :mod:`pipeline.training.plan`; the command line that describes a
target and a recipe is :mod:`pipeline.stages.plan`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.training.plan import GiB, Longest, Plan, Recipe, Target, _g

GPU_NODE_CPU_MEMORY_PER_GPU = 128 * GiB
"""Host RAM per GPU assumed for GPUs described without ``--cpu-memory`` from a machine without any
(1 TiB for 8 GPUs). 8-GPU training servers carry 1-2 TiB (DGX A100/H100 and AWS p5: 2 TiB; AWS
p4d/p4de: 1.1 TiB; Azure ND A100 v4: 1.9 TiB), i.e. 128-256 GiB per GPU: the low end, so a plan
that fits under it fits those servers. Smaller machines exist (GCP a2: 85 GB per GPU), so the
assumption is printed with the way to give the real figure."""


def cpu_memory_assumption(gpus_per_node: int) -> tuple[int, str]:
    """``(bytes, note)``: the CPU RAM per node assumed for GPUs described without ``--cpu-memory``."""
    total = GPU_NODE_CPU_MEMORY_PER_GPU * max(gpus_per_node, 1)
    return total, (f"note: --cpu-memory not given for a GPU target, and this machine has no GPU (its own RAM says "
                   f"nothing about the target's): assuming {total / GiB:.0f} GiB of CPU RAM per node "
                   f"({GPU_NODE_CPU_MEMORY_PER_GPU / GiB:.0f} GiB per GPU x {gpus_per_node}, the low end of 8-GPU "
                   "training servers, which carry 1-2 TiB); give --cpu-memory GIB for your nodes")


def table(p: Plan) -> str:
    """The plan as a Markdown table (GiB), one row per config, fastest first."""
    dev = "per GPU" if p.target.on_gpu else "per rank"
    r = p.recipe
    head = (f"| config | ZeRO | offload | states | activations (micro {r.micro_batch}, checkpointing "
            f"{'on' if r.checkpointing else 'off'}) | buffers | total {dev} | CPU per node | NVMe per node | fits | "
            f"largest micro (checkpointing off / on) |")
    lines = [head, "|" + "---|" * 11]
    for e in p.rows:
        off, on = p.largest.get(e.config, (0, 0))
        mark = "yes" if e.fits else "no"
        c = p.choice
        if c is not None and e.config == c.config:
            how = [f"micro {c.micro_batch}"] if c.micro_batch != e.micro_batch else []
            how += ["with checkpointing"] if c.activation_checkpointing != e.activation_checkpointing else []
            mark += " **(chosen" + (f": {', '.join(how)})**" if how else ")**")
        lines.append(f"| {Path(e.config).name} | {e.stage} | {e.offload_label} | {_g(e.states)} | {_g(e.activations)} | "
                     f"{_g(e.buffers)} | {_g(e.device_total)} | {_g(e.cpu_node)} | {_g(e.nvme_node) if e.nvme_node else '-'} | "
                     f"{mark} | {off or '-'} / {on or '-'} |")
    return "\n".join(lines)


def report(p: Plan) -> str:
    """What ``launch/plan.py`` prints: the target, the model, the table, the advice."""
    f, r = p.recipe.facts, p.recipe
    return "\n".join([
        f"target: {p.target.describe()}",
        f"model: {f.n_params / 1e6:.1f}M parameters (largest layer {f.largest_layer / 1e6:.2f}M), {f.layers} layers, "
        f"hidden {f.hidden}, vocab {f.vocab}; seq_len {r.seq_len}, micro batch {r.micro_batch}, {r.precision}"
        + (f", sequence-parallel {r.sp} ({r.local_seq} tokens of activations per rank)" if r.sp > 1 else "") + _savers(r, p.target.on_gpu),
        "memory in GiB; states = parameters + gradients + optimizer (DeepSpeed's estimators), buffers = "
        "communication buckets + " + ("CUDA context" if p.target.on_gpu else "rank process runtime") + " + fragmentation",
        "",
        table(p),
        "",
        f"recommended (fastest that fits): {p.advice()}",
    ]) + "\n"


def _savers(r: Recipe, on_gpu: bool) -> str:
    f = r.facts
    on = ([f"tiled MLP ({f.mlp_tile}-token tiles)"] if f.mlp_tile else []) + (
        [f"tiled logits ({f.logits_tile}-token tiles)"] if f.logits_tile else []) + (
        ["activation offload" + ("" if on_gpu else " (no effect on CPU ranks)")] if f.activation_offload and r.checkpointing else [])
    return f"; {', '.join(on)}" if on else ""


def _seq(x: Longest) -> str:
    return "-" if not x.seq_len else f"{'>= ' if x.capped else ''}{x.seq_len:,}"


def longest_report(target: Target, r: Recipe, rows: list[tuple[Longest, Longest]], step: int) -> str:
    """What ``launch/plan.py --longest`` prints: per config the longest seq_len that fits, its estimate
    there, and the longest with every memory saver on; then the longest of all."""
    f, dev = r.facts, "per GPU" if target.on_gpu else "per rank"
    lines = [
        f"target: {target.describe()}",
        f"model: {f.n_params / 1e6:.1f}M parameters, {f.layers} layers, hidden {f.hidden}, vocab {f.vocab}; micro batch "
        f"{r.micro_batch}, {r.precision}, sequence-parallel {r.sp}, activation checkpointing "
        f"{'on' if r.checkpointing else 'off'}" + _savers(r, target.on_gpu),
        f"the longest seq_len (a multiple of {step}) that each config fits; memory in GiB at that length; the last column: "
        "with activation checkpointing, tiled MLP and tiled logits all on" + (", checkpointed layer inputs offloaded to host memory" if dev == "per GPU" else ""),
        "",
        f"| config | ZeRO | offload | longest seq_len | tokens per rank | states | activations | buffers | total {dev} | "
        "CPU per node | with every saver |",
        "|" + "---|" * 11,
    ]
    for plain, saving in rows:
        e = plain.estimate
        cells = [_g(e.states), _g(e.activations), _g(e.buffers), _g(e.device_total), _g(e.cpu_node)] if plain.seq_len else ["-"] * 5
        lines.append(f"| {Path(plain.config).name} | {e.stage} | {e.offload_label} | {_seq(plain)} | "
                     f"{plain.seq_len // r.sp:,} | " + " | ".join(cells) + f" | {_seq(saving)} |")
    best = max(rows, key=lambda x: x[0].seq_len, default=None)
    lines.append("")
    lines += [f"{Path(plain.config).name}: not even {step} tokens: {plain.estimate.why_not}" for plain, _ in rows if not plain.seq_len]
    if best is None or not best[0].seq_len:
        lines.append(f"nothing fits even {step} tokens as written"
                     + (f"; with every saver on: {_seq(max(rows, key=lambda x: x[1].seq_len)[1])}" if rows else ""))
    else:
        b = best[0]
        lines.append(f"longest: data.seq_len={b.seq_len} with deepspeed.config={b.config} "
                     f"({_g(b.estimate.device_total)} GiB {dev} estimated)")
    return "\n".join(lines) + "\n"

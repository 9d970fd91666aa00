"""Preflight memory planner: which DeepSpeed config and micro batch fit a recipe on a target.

    python launch/plan.py --config FILE [key=value ...] [--gpus-per-node N --gpu-memory GiB ...]

For each shipped ``ds_configs/`` file (ZeRO stage 0-3, no offload, optimizer offload,
parameter + optimizer offload to CPU or NVMe) the planner estimates, per rank and per node:

* **model states** (parameters, gradients, optimizer): DeepSpeed's own estimators
  (:func:`deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs` and
  ``stage3.estimate_zero3_model_states_mem_needs``, ``zero_init`` variant, which is how the
  pipeline builds models) for 16-bit training; they assume 2-byte weights and gradients
  beside the fp32 master copy, so for fp32 training the 16-bit copies are replaced by
  4-byte ones (DeepSpeed still keeps a separate fp32 master partition). Stage 0 has no
  DeepSpeed estimator: every rank holds everything (16 bytes per parameter in fp32, 20 in
  bf16/fp16). Stage 1 keeps full gradients until the step, stage 2 partitions them. The
  parameter count comes from the model built on PyTorch's ``meta`` device (no memory). Under
  ZeRO-3 the parameters of at most ``stage3_param_persistence_threshold`` elements are held
  whole on every rank besides their partition (:mod:`pipeline.training.plan_zero`).
* **activations** of one micro batch: the per-layer count of Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 1: ``sbh(34 +
  5as/h)`` bytes for GPT-3 in 16 bit) redone for the tensors PyTorch actually saves in a
  Hugging Face decoder layer, counted with ``torch.autograd.graph.saved_tensors_hooks`` on a
  Llama: ``e·s·b·(c·h + 2h_kv + k·i)`` bytes per layer (``e`` bytes per element, ``c`` = 8 in
  fp32 and 10 in 16 bit, where each RMSNorm also keeps an fp32 copy of its input; ``k`` = 4 for
  gated MLPs such as Llama's SwiGLU, 2 for GPT-2's GELU; under sequence parallelism ``c`` is one
  more: the Ulysses all-to-all keeps the attention output apart from the projection's input),
  plus ``2·e·a·s²·b`` for the attention scores with ``eager`` attention (``sdpa``/flash attention
  keep none), plus 1-byte dropout masks when dropout is on, plus the logits (the LM head output,
  the loss's fp32 log-softmax, its gradient and the logits' gradient: ``s·b·V·12`` in fp32,
  ``s·b·V·(e+12)`` in 16 bit with the fp32 copy). With activation checkpointing only each layer's
  input (``e·s·b·h``) is kept and one layer is recomputed at a time. The backward pass holds one
  layer's working set on top. Under sequence parallelism ``s`` is the tokens one rank holds
  (``seq_len / sp``).
* **the ALST memory savers** (:mod:`pipeline.training.tiling`): with ``model.tiled_mlp`` a
  layer keeps none of the MLP's ``k·i`` intermediates; one tile of ``t`` tokens (saved tensors
  and their gradients, ``2·e·t·b·k·i``) exists at a time. With ``model.tiled_logits`` the logits
  terms are those of one tile of the sequence. A sequence no longer than one tile runs untiled.
  With ``model.activation_offload`` on GPU ranks the checkpointed layer inputs live in pinned
  host memory (each rounded up to a power of two by PyTorch's caching host allocator); the
  device keeps the one copied back for its recompute. On CPU ranks it changes nothing.
* **buffers and overheads**: DeepSpeed's communication buckets from the resolved JSON (each
  capped at the model size: DeepSpeed never fills more), the CUDA context, and allocator
  fragmentation (a fraction of everything else). On CPU ranks (no GPU) the "device" is host
  memory and each rank process also carries the Python, PyTorch and DeepSpeed runtime.

The estimates were compared with the peak RSS of real runs on this project's CPU machines:
see ``docs/deepspeed.md`` ("How good are the estimates") and ``tests/test_plan.py``.

The table and the report are in :mod:`pipeline.training.plan_report`; ``launch/plan.py``'s command line is
:mod:`pipeline.stages.plan`.

``deepspeed.config: auto`` picks the FASTEST config that fits, in the order of
:data:`CANDIDATES` (no partitioning first, NVMe offload last), not the most frugal one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.training.ds_config import locate_ds_config, offload, resolve_for_recipe, zero_stage
from pipeline.training.model_shape import model_shape
from pipeline.training.plan_zero import DS_ADDITIONAL_BUFFER_FACTOR  # noqa: F401 - where it was
from pipeline.training.plan_zero import buffers as _buffers, model_states as _model_states, persistent_bytes
from pipeline.training.tiling import logits_tile_tokens, mlp_tile_tokens

GiB = 1024 ** 3

CANDIDATES = (
    "ds_configs/zero0.json",
    "ds_configs/zero1.json",
    "ds_configs/zero2.json",
    "ds_configs/zero3.json",
    "ds_configs/zero2_offload.json",
    "ds_configs/zero3_offload.json",
    "ds_configs/zero3_offload_nvme.json",
)
"""Shipped configs, fastest first: ``auto`` takes the first that fits. Partitioning costs
communication (stage 3 gathers every layer twice per step), offload costs PCIe/host traffic
and a CPU optimizer step, NVMe costs disk I/O; see ``docs/deepspeed.md`` for the measurements."""

CUDA_CONTEXT = 1.0 * GiB
"""CUDA context, kernels and cuBLAS/NCCL workspaces per GPU (typically 0.5-1 GiB on current GPUs)."""
ALLOCATOR_SLACK = 0.10
"""Fraction added to the device estimate for allocator fragmentation (PyTorch's caching allocator)."""
CPU_RANK_RUNTIME = 0.65 * GiB
"""Host memory of one rank process before any model exists (Python, PyTorch, transformers, DeepSpeed,
gloo, data loader), measured on this project's CPU machines (about 0.41 GiB after the imports alone)."""
GPU_RANK_HOST_RUNTIME = 3.0 * GiB
"""Host memory of one GPU rank process beside the offloaded states (CUDA libraries, pinned staging)."""


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelFacts:
    """What the estimates need to know about a model."""

    n_params: int
    largest_layer: int  # parameters of the largest module (ZeRO-3 gathers one at a time)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    dropout: float
    lm_head: bool  # a causal LM (logits over the vocabulary) rather than a classifier
    attn: str
    # how the run computes, as far as activations go (pipeline.training.tiling, sequence_parallel)
    mlp_tile: int = 0  # tokens per tile of the tiled MLP (0: not tiled)
    logits_tile: int = 0  # tokens per tile of the tiled head + loss (0: not tiled)
    sp: int = 1  # the sequence-parallel degree the attention runs under (set by Recipe from its sp): K/V replication
    activation_offload: bool = False  # with checkpointing: layer inputs in pinned host memory (GPU ranks only)
    param_sizes: tuple[int, ...] = ()  # elements of each parameter, named_parameters() order (ZeRO-3 persistence)


def model_facts(conf, *, head: str = "causal_lm", attn_implementation: str = "sdpa", tiled_mlp: bool = False,
                tiled_logits: bool = False, tile_tokens: int = 0, activation_offload: bool = False) -> ModelFacts:
    """Count the parameters of the model ``conf`` describes, built on the ``meta`` device.

    Args:
        conf: a transformers config.
        head: ``causal_lm`` or ``classification``.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (activation estimate).
        tiled_mlp, tiled_logits, tile_tokens: the recipe's ``model.*`` savers (tiles as
            :mod:`pipeline.training.tiling` sizes them; a classifier has no logits to tile).
        activation_offload: ``model.activation_offload`` with checkpointing on.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM
    conf = copy.deepcopy(conf)
    with torch.device("meta"):  # shapes only: a 70B model costs nothing here
        model = auto.from_config(conf)
    sizes = tuple(int(p.numel()) for p in model.parameters())
    n = sum(sizes)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    s = model_shape(conf)  # the reading MFU's FLOP count uses too (gated MLP or not, K/V heads)
    return ModelFacts(
        n_params=int(n), largest_layer=int(largest), hidden=s.hidden, layers=s.layers, heads=s.heads,
        kv_heads=s.kv_heads, intermediate=s.intermediate, vocab=s.vocab, gated_mlp=s.gated, dropout=s.dropout,
        lm_head=head != "classification", attn=attn_implementation,
        mlp_tile=mlp_tile_tokens(s.hidden, tile_tokens) if tiled_mlp else 0,
        logits_tile=logits_tile_tokens(s.vocab, tile_tokens) if tiled_logits and head != "classification" else 0,
        activation_offload=activation_offload, param_sizes=sizes,
    )


def with_savers(f: ModelFacts, tile_tokens: int = 0) -> ModelFacts:
    """``f`` with the tiled MLP, the tiled head + loss and activation offload on (what the planner's
    "every saver" column assumes; the offload counts on GPU targets only)."""
    return replace(f, activation_offload=True, mlp_tile=f.mlp_tile or mlp_tile_tokens(f.hidden, tile_tokens),
                   logits_tile=(f.logits_tile or logits_tile_tokens(f.vocab, tile_tokens)) if f.lm_head else 0)


# ---------------------------------------------------------------------------- the target


@dataclass
class Target:
    """Where the job runs. Memory in bytes; ``gpu_memory`` 0 means CPU ranks (no GPU)."""

    gpus_per_node: int = 1  # ranks per node (GPUs, or CPU processes without a GPU)
    nodes: int = 1
    gpu_memory: int = 0
    cpu_memory: int = 0  # per node, available to the job
    nvme: int = 0  # free bytes on the NVMe offload path per node (0: none)
    detected: str = ""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def on_gpu(self) -> bool:
        return self.gpu_memory > 0

    def describe(self) -> str:
        dev = f"{self.gpus_per_node} GPU(s) of {self.gpu_memory / GiB:.1f} GiB" if self.on_gpu else f"{self.gpus_per_node} CPU rank(s)"
        s = f"{self.nodes} node(s) x {dev}, {self.cpu_memory / GiB:.1f} GiB CPU RAM per node"
        if self.nvme:
            s += f", {self.nvme / GiB:.0f} GiB NVMe"
        return s + (f" ({self.detected})" if self.detected else "")


def available_cpu_memory() -> int:
    """Bytes of host memory available to new allocations (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def detect_target(ranks_per_node: int | None = None, nodes: int = 1, nvme_path: str = "") -> Target:
    """This machine: its GPUs (free memory of the first) or CPU ranks, available RAM, NVMe space."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        free, _total = torch.cuda.mem_get_info(torch.cuda.current_device())
        gpu_mem, how = int(free), "detected: torch.cuda free memory, MemAvailable"
    else:
        gpu_mem, how = 0, "detected: no GPU, CPU ranks in host memory (MemAvailable)"
    per_node = ranks_per_node or gpus or 1
    nvme = 0
    if nvme_path and Path(nvme_path).exists():
        import shutil

        nvme = int(shutil.disk_usage(nvme_path).free)
    return Target(gpus_per_node=per_node, nodes=nodes, gpu_memory=gpu_mem, cpu_memory=available_cpu_memory(), nvme=nvme, detected=how)


# ---------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """Memory of one (config, micro batch, activation checkpointing) choice, in bytes."""

    config: str
    stage: int
    offload_optimizer: str
    offload_param: str
    micro_batch: int
    activation_checkpointing: bool
    states: int = 0  # per rank, on the device
    activations: int = 0
    buffers: int = 0  # communication buckets + CUDA context + fragmentation (+ rank runtime on CPU)
    device_total: int = 0  # per GPU (on CPU ranks: per rank, in host memory)
    cpu_node: int = 0  # host memory per node (on CPU ranks: everything, all ranks of the node)
    nvme_node: int = 0
    fits: bool = False
    why_not: str = ""

    @property
    def offload_label(self) -> str:
        o, p = self.offload_optimizer, self.offload_param
        if o == "none" and p == "none":
            return "none"
        return "+".join(x for x in (f"param {p}" if p != "none" else "", f"optimizer {o}" if o != "none" else "") if x)


def activation_bytes(f: ModelFacts, micro: int, seq: int, precision: str, checkpointing: bool,
                     offload: bool = False) -> int:
    """Peak activation memory of one forward+backward of ``micro`` sequences of ``seq`` tokens
    (under sequence parallelism: the ``seq_len / sp`` tokens one rank holds) on the device.

    Args:
        offload: the checkpointed layer inputs live in host memory (``model.activation_offload`` on
            a GPU rank; :func:`offloaded_bytes` counts them there): the device keeps the one
            copied back for its recompute.
    """
    e = 4 if precision == "fp32" else 2
    s, b, h = seq, micro, f.hidden
    # Ulysses hands each rank kv_heads / sp K/V heads over the whole sequence: with fewer K/V heads
    # than sp they are replicated, one per rank, sp / kv_heads times a rank's share of the elements
    kv = h * f.kv_heads // f.heads * max(1, f.sp // f.kv_heads)
    c = (8 if e == 4 else 10) + (1 if f.sp > 1 else 0)  # measured (module docstring)
    k = 4 if f.gated_mlp else 2
    mlp_tile = f.mlp_tile if 0 < f.mlp_tile < s else 0  # one tile: TiledMLP runs the plain forward
    attn = e * s * b * (c * h + 2 * kv)
    mlp = 2 * e * mlp_tile * b * k * f.intermediate if mlp_tile else e * s * b * k * f.intermediate
    per_layer = attn + (0 if mlp_tile else mlp)  # kept for the backward
    if f.attn == "eager":
        per_layer += 2 * e * f.heads * s * s * b  # scores and softmax output
    if f.dropout > 0:
        per_layer += s * b * (3 * h + (f.heads * s if f.attn == "eager" else 0))  # 1-byte masks
    logit_tokens = min(f.logits_tile, s) if f.logits_tile else s
    logits = logit_tokens * b * f.vocab * (12 if e == 4 else e + 12) if f.lm_head else 0
    if checkpointing:  # layer inputs (offloaded: the one copied back) + the layer being recomputed
        stored = (1 if offload else f.layers) * e * s * b * h + per_layer
    else:
        stored = f.layers * per_layer
    working = per_layer + (mlp if mlp_tile else 0)  # one layer's activation gradients (+ one MLP tile) in backward
    return int(stored + max(working, logits) + 4 * e * s * b * h)  # + embeddings output, final norm, rotary tables


def offloaded_bytes(f: ModelFacts, micro: int, seq: int, precision: str) -> int:
    """Host memory per rank of the checkpointed layer inputs under ``model.activation_offload``:
    one pinned block per layer, which PyTorch's caching host allocator rounds up to a power of two
    (``CachingHostAllocator``)."""
    e = 4 if precision == "fp32" else 2
    return f.layers * (1 << max(0, (e * seq * micro * f.hidden - 1).bit_length()))


def estimate(f: ModelFacts, ds: dict, config: str, target: Target, *, micro: int, seq: int, precision: str,
             checkpointing: bool) -> Estimate:
    """Memory of running ``config`` (its resolved dict ``ds``) on ``target``; sets ``fits``."""
    stage = zero_stage(ds)
    dev_off = offload(ds)
    est = Estimate(config=config, stage=stage, offload_optimizer=dev_off["optimizer"], offload_param=dev_off["param"],
                   micro_batch=micro, activation_checkpointing=checkpointing)
    states, cpu_states, nvme = _model_states(f, stage, est.offload_optimizer, est.offload_param, precision, target)
    states += persistent_bytes(f, ds, precision, target.world)  # ZeRO-3: small parameters kept whole on every rank
    off = checkpointing and f.activation_offload and target.on_gpu  # a no-op on CPU ranks
    acts = activation_bytes(f, micro, seq, precision, checkpointing, offload=off)
    buffers = _buffers(ds, f, precision, target.on_gpu)
    buffers += int(ALLOCATOR_SLACK * (states + acts + buffers))
    g = target.gpus_per_node
    offloaded = est.offload_optimizer != "none" or est.offload_param != "none"
    if target.on_gpu:
        buffers += int(CUDA_CONTEXT)
        host = (cpu_states if offloaded else 0) + g * int(GPU_RANK_HOST_RUNTIME)
        host += g * offloaded_bytes(f, micro, seq, precision) if off else 0
    else:  # CPU ranks: the "device" is host memory; the loading copy is the model itself
        buffers += int(CPU_RANK_RUNTIME)
        host = (cpu_states if offloaded else 0) + g * (states + acts + buffers)
    est.states, est.activations, est.buffers = states, acts, buffers
    est.device_total = states + acts + buffers
    est.cpu_node, est.nvme_node = int(host), int(nvme)
    problems = []
    if target.on_gpu and est.device_total > target.gpu_memory:
        problems.append(f"needs {est.device_total / GiB:.2f} GiB per GPU, {target.gpu_memory / GiB:.2f} GiB there")
    if est.cpu_node > target.cpu_memory:
        problems.append(f"needs {est.cpu_node / GiB:.2f} GiB CPU RAM per node, {target.cpu_memory / GiB:.2f} GiB there")
    if nvme and nvme > target.nvme:
        problems.append(f"needs {nvme / GiB:.1f} GiB NVMe per node, {target.nvme / GiB:.1f} GiB given")
    est.fits, est.why_not = not problems, "; ".join(problems)
    return est


# ---------------------------------------------------------------------------- a recipe


@dataclass
class Recipe:
    """What a training or fine-tuning recipe asks for, as far as memory goes."""

    facts: ModelFacts
    seq_len: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    checkpointing: bool
    precision: str
    cfg: Any  # the stage config (train and deepspeed sections)
    sp: int = 1  # sequence-parallel degree: each rank holds the activations of seq_len / sp tokens

    def __post_init__(self) -> None:
        if self.facts.sp != self.sp:  # the activation count reads the degree from the facts (one source: this field)
            self.facts = replace(self.facts, sp=self.sp)

    @property
    def local_seq(self) -> int:
        """Tokens whose activations one rank holds (Ulysses: after the all-to-all a rank holds the
        whole sequence for heads / sp, the same number of elements)."""
        return self.seq_len // self.sp


def estimate_config(r: Recipe, config: str, target: Target, micro: int, checkpointing: bool,
                    free_batch: bool = False) -> Estimate | None:
    """None when ``micro`` cannot make the recipe's global batch (batch arithmetic); ``free_batch``:
    any global batch (memory does not depend on it)."""
    ds = _resolved(r, config, target, micro, free_batch)
    if ds is None:
        return None
    return estimate(r.facts, ds, config, target, micro=micro, seq=r.local_seq, precision=r.precision, checkpointing=checkpointing)


def _resolved(r: Recipe, config: str, target: Target, micro: int, free_batch: bool) -> dict | None:
    """``config`` filled for the recipe on ``target`` (None: ``micro`` cannot make its global batch)."""
    try:
        if free_batch:
            grad_accum, global_batch = 1, 0
        elif micro == r.micro_batch:
            grad_accum, global_batch = r.grad_accum, r.global_batch
        else:
            grad_accum, global_batch = 0, r.global_batch or r.micro_batch * max(r.grad_accum, 1) * (target.world // r.sp)
        return resolve_for_recipe(r.cfg, config, world=target.world // r.sp, sp=r.sp, precision=r.precision,
                                  hidden=r.facts.hidden, strict_nvme=False, micro=micro, grad_accum=grad_accum,
                                  global_batch=global_batch)
    except UserError:
        if micro == r.micro_batch:
            raise
        return None


def largest_micro(r: Recipe, config: str, target: Target, checkpointing: bool, limit: int = 256) -> int:
    """The largest micro batch (a power of two, or the recipe's) that fits with ``config``; 0 if none."""
    sizes = sorted({2 ** k for k in range(int(math.log2(limit)) + 1)} | {r.micro_batch}, reverse=True)
    for m in sizes:
        est = estimate_config(r, config, target, m, checkpointing, free_batch=True)
        if est is not None and est.fits:
            return m
    return 0


@dataclass
class Plan:
    """The planner's answer for one recipe and target."""

    target: Target
    recipe: Recipe
    rows: list[Estimate]  # each candidate at the recipe's micro batch and checkpointing
    largest: dict[str, tuple[int, int]]  # config -> largest micro batch without / with activation checkpointing
    choice: Estimate | None  # the fastest that fits (possibly with checkpointing or a smaller micro batch)

    def advice(self) -> str:
        """One sentence: what to use."""
        c, r = self.choice, self.recipe
        if c is None:
            return ("nothing fits: even ZeRO-3 with offload and micro batch 1 with activation checkpointing exceeds the "
                    "memory; use more GPUs or nodes, a shorter data.seq_len or a smaller model")
        parts = [f"deepspeed.config={c.config}"]
        if c.micro_batch != r.micro_batch:
            dp = self.target.world // r.sp
            accum = max(1, (r.global_batch or r.micro_batch * max(r.grad_accum, 1) * dp) // (c.micro_batch * dp))
            parts.append(f"train.micro_batch_size={c.micro_batch} train.grad_accum={accum}")
        if c.activation_checkpointing and not r.checkpointing:
            parts.append("model.activation_checkpointing=true")
        return " ".join(parts)


def make_plan(r: Recipe, target: Target, candidates: tuple[str, ...] = CANDIDATES) -> Plan:
    """Estimate every candidate; choose the fastest that fits (recipe as is, then with activation
    checkpointing, then with the largest smaller micro batch)."""
    configs = [c for c in candidates if config_exists(c)]
    rows = [estimate_config(r, c, target, r.micro_batch, r.checkpointing) for c in configs]
    largest = {c: (largest_micro(r, c, target, False), largest_micro(r, c, target, True)) for c in configs}
    choice = next((e for e in rows if e is not None and e.fits), None)
    if choice is None and not r.checkpointing:
        for c in configs:
            e = estimate_config(r, c, target, r.micro_batch, True)
            if e is not None and e.fits:
                choice = e
                break
    if choice is None:
        best = max(((m, c, ac) for c, pair in largest.items() for ac, m in zip((False, True), pair)
                    if m and m < r.micro_batch and (ac or not r.checkpointing)), key=lambda x: (x[0], -configs.index(x[1]), not x[2]),
                   default=None)
        if best is not None:
            choice = estimate_config(r, best[1], target, best[0], best[2])
    return Plan(target=target, recipe=r, rows=[e for e in rows if e is not None], largest=largest, choice=choice)


# ---------------------------------------------------------------------------- the longest sequence

SEQ_MULTIPLE = 256
"""The longest-sequence search steps in multiples of this many tokens (and of the sequence-parallel degree)."""
MAX_SEARCH_SEQ = 2 ** 30
"""Where that search stops (a billion tokens, beyond any model's positions): a config that still fits there
is reported as fitting at least this."""


@dataclass
class Longest:
    """The longest ``seq_len`` (a multiple of the search's step) that ``config`` fits, with its estimate."""

    config: str
    seq_len: int  # 0: not even one step
    estimate: Estimate  # at seq_len (at one step, not fitting, when seq_len is 0)
    capped: bool = False  # still fits at MAX_SEARCH_SEQ


def longest_seq(r: Recipe, config: str, target: Target, *, step: int, checkpointing: bool | None = None,
                limit: int = MAX_SEARCH_SEQ) -> Longest:
    """The largest multiple of ``step`` (itself a multiple of ``r.sp``) up to ``limit`` for which ``config``
    fits ``target`` at the recipe's micro batch (its checkpointing unless ``checkpointing`` says).

    Memory grows with the sequence except where the tiled MLP starts to tile (a sequence of one
    tile per rank runs the plain MLP, which keeps more), so each side of that point is searched
    by bisection on its own, the longer side first."""
    ckpt = r.checkpointing if checkpointing is None else checkpointing
    ds = _resolved(r, config, target, r.micro_batch, free_batch=True)

    def at(seq: int) -> Estimate:
        return estimate(r.facts, ds, config, target, micro=r.micro_batch, seq=seq // r.sp, precision=r.precision,
                        checkpointing=ckpt)

    def fitting(seq: int) -> Estimate | None:
        e = at(seq)
        return e if e.fits else None

    top = limit // step
    untiled = r.facts.mlp_tile * r.sp // step if r.facts.mlp_tile else top  # the last multiple run untiled
    for lo, hi in ((untiled + 1, top), (1, min(untiled, top))):
        if lo > hi or fitting(lo * step) is None:
            continue
        while lo < hi:  # invariant: lo fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fitting(mid * step) is not None else (lo, mid - 1)
        return Longest(config, lo * step, fitting(lo * step), capped=lo == top)
    return Longest(config, 0, at(step))


def longest_plan(r: Recipe, target: Target, *, step: int, candidates: tuple[str, ...] = CANDIDATES,
                 ) -> list[tuple[Longest, Longest]]:
    """For every candidate: the longest sequence of the recipe as written, and with every saver on
    (activation checkpointing, tiled MLP, tiled logits; ``model.tile_tokens`` as given)."""
    tile = getattr(getattr(r.cfg, "model", None), "tile_tokens", 0)
    saving = replace(r, checkpointing=True, facts=with_savers(r.facts, tile))
    return [(longest_seq(r, c, target, step=step), longest_seq(saving, c, target, step=step))
            for c in candidates if config_exists(c)]


def config_exists(config: str) -> bool:
    try:
        locate_ds_config(config)
        return True
    except UserError:
        return False


def _g(x: int) -> str:
    return f"{x / GiB:.2f}"

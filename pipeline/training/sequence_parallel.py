"""Sequence parallelism: DeepSpeed Ulysses (ALST, arXiv 2506.13996) for the training stages.

With ``parallel.sequence_parallel_size = sp`` the ranks form groups of ``sp`` consecutive
ranks (DeepSpeed's ``parallel_state_sp``: ranks ``[g·sp, (g+1)·sp)``); ``dp = world / sp``
groups see different data. Every member of a group reads the same micro-batch (the loaders
are keyed by the group, :func:`dp_coords`) and keeps its own ``1/sp`` slice of the sequence
(:func:`shard`): inputs, shifted targets and the global position ids. Inside each attention
layer DeepSpeed's ``UlyssesSPAttentionHF`` (registered into transformers by
:func:`attach`) exchanges heads for sequence with an all-to-all, so each rank attends over the
whole sequence for ``heads / sp`` heads, and exchanges back; everything else (embeddings,
MLP, norms, LM head, loss) runs on the local slice only. That is where the memory goes: the
activations of one rank are those of ``seq_len / sp`` tokens.

Why the batch is sliced here and not by DeepSpeed's ``UlyssesSPDataLoaderAdapter``: the
adapter gathers one batch from each member and has the group process them in turn (``sp``
forward/backward passes per loader batch), which changes the batch arithmetic (a group would
consume ``sp`` micro-batches per micro-step) and costs an all-gather of every batch. Reading
the same micro-batch on every member needs neither, and keeps ``global batch = micro × accum ×
dp`` with the sampler, checkpoints and resume unchanged.

The loss: every rank returns the sum of its slice's token losses and its target count; the
trainer normalises by the window's target tokens over all ranks (disjoint slices: each target
is counted once) and scales by the divisor DeepSpeed averages gradients with
(:func:`grad_divisor`: it differs between ZeRO stages), so the update equals the one of a single rank that saw the whole
sequences, with masks (SFT) and accumulation exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention implementations Ulysses wraps (``eager`` builds an O(seq²) mask: DeepSpeed refuses it)."""


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = 1
    """Ranks that share one sequence (DeepSpeed Ulysses / ALST); 1 = off. World = data-parallel
    × this; each rank holds seq_len / this tokens of activations. Needs the attention heads, the
    KV heads, data.seq_len and the world size divisible by it."""

    def check(self) -> list[tuple[str, str]]:
        if self.sequence_parallel_size < 1:
            return [("sequence_parallel_size", f"must be >= 1, got {self.sequence_parallel_size}")]
        return []


def check(conf, *, sp: int, seq_len: int, world: int, attn: str, key: str = "data.seq_len") -> None:
    """Refuse what Ulysses cannot run exactly, before any heavy work (one message, all problems).

    Raises:
        UserError: heads or KV heads not divisible by ``sp``, ``seq_len`` not divisible by
            ``sp``, a world size not divisible by ``sp``, or an attention implementation the
            wrapper does not support.
    """
    from pipeline.errors import UserError

    if sp == 1:
        return
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    problems = []
    if heads is None or heads % sp:
        problems.append(f"the model's {heads} attention heads are not divisible by it (each rank attends with heads / sp)")
    if kv is not None and kv % sp and sp % kv:
        problems.append(f"the model's {kv} key/value heads neither divide nor are divisible by it")
    if seq_len % sp:
        problems.append(f"{key}={seq_len} is not divisible by it (each rank holds seq_len / sp tokens)")
    if world % sp:
        problems.append(f"the launch has {world} rank(s), not a multiple of it (world = data-parallel x sequence-parallel)")
    if attn not in SUPPORTED_ATTENTION:
        problems.append(f"model.attn_implementation={attn} is not supported by DeepSpeed's Ulysses wrapper "
                        f"(use one of {', '.join(SUPPORTED_ATTENTION)}; sdpa on CPU)")
    if getattr(text, "model_type", "") == "gpt2":
        problems.append("gpt2 takes no position ids through its attention (learned positions); use a RoPE model "
                        "(llama, qwen2, mistral)")
    if problems:
        raise UserError(f"parallel.sequence_parallel_size={sp}: " + "; ".join(problems) + ".")


def dp_coords(rank: int, world: int, sp: int) -> tuple[int, int, int]:
    """``(dp_rank, dp_world, sp_rank)`` of ``rank``: groups of ``sp`` consecutive ranks."""
    return rank // sp, world // sp, rank % sp


def grad_divisor(world: int, sp: int, zero_stage: int) -> int:
    """What DeepSpeed (0.19.8) divides the summed gradients by under sequence parallelism.

    Every stage sums the gradients over all ``world`` ranks (the sequence-data-parallel group).
    ZeRO-0 (the engine's ``allreduce_bucket``), ZeRO-1 and ZeRO-2 (``average_tensor``) then
    divide by ``world / sp``, as if each member's loss were the whole group's (DeepSpeed's
    convention for a loss all-gathered over the group); ZeRO-3 ends up divided by ``world``.
    Measured with a scale-sensitive optimizer (AdamW with ``eps`` 1.0, no clipping, 8 steps,
    SP=2 on 2 ranks vs 1 rank): scaling the loss by ``accum × world`` matched to 1e-6 under
    ZeRO-3 and differed by 1.4e-2 under ZeRO-0/1/2, where ``accum × world / sp`` matched to 1e-6
    (and ZeRO-3 then differed). With the default AdamW the difference hides: Adam is invariant
    to a constant gradient scale except for ``eps``, and clipping a norm above the threshold
    gives the same update either way; it shows once a clipped and an unclipped step differ (the
    drift noted in shared/GUIDE.md under ZeRO-0 after six steps). ``tests/test_sequence_parallel.py``
    checks this with the scale-sensitive settings, so a DeepSpeed upgrade that changes it fails there."""
    return world // sp if (sp > 1 and zero_stage < 3) else world


def _fields(batch) -> dict:
    """A micro-batch as ``input_ids``, ``labels`` (aligned) and ``position_ids`` (positions
    ``0..T-1`` unless it has its own); a ``(B, T+1)`` token tensor gives inputs ``[:, :-1]`` and
    targets ``[:, 1:]``. A dense ``attention_mask`` is dropped (DeepSpeed's wrapper drops it too)."""
    import torch

    if isinstance(batch, torch.Tensor):
        fields = {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}
    else:
        fields = {k: v for k, v in batch.items() if k != "attention_mask"}
    ids = fields["input_ids"]
    if "position_ids" not in fields:
        fields["position_ids"] = torch.arange(ids.shape[1], dtype=torch.long).expand(ids.shape[0], -1)
    return fields


def shard(batch, sp_rank: int, sp: int) -> dict:
    """This rank's slice of a micro-batch: a ``(B, T+1)`` token tensor (inputs ``[:, :-1]``,
    targets ``[:, 1:]``) or a dict with ``input_ids``, ``labels`` (aligned: ``labels[t]`` is the
    target of ``input_ids[t]``) and optional ``position_ids``. Positions are the global ones
    (RoPE and causality need them after the all-to-all)."""
    fields = _fields(batch)
    n = fields["input_ids"].shape[1] // sp
    return {k: v[:, sp_rank * n:(sp_rank + 1) * n].contiguous() for k, v in fields.items()}


def fill(batch, rows: int):
    """``batch`` grown to ``rows`` rows with rows that carry no target (labels all ignored), as a
    dict: the last validation batch may be short, and DeepSpeed's Ulysses attention runs only the
    micro-batch size it was registered with. The losses and target counts are unchanged."""
    import torch

    from pipeline.training.trainer import IGNORE_INDEX

    fields = _fields(batch)
    missing = rows - fields["input_ids"].shape[0]
    if missing <= 0:
        return batch
    T = fields["input_ids"].shape[1]
    extra = {"input_ids": fields["input_ids"][:1].expand(missing, -1), "labels": torch.full((missing, T), IGNORE_INDEX),
             "position_ids": torch.arange(T).expand(missing, -1)}
    return {k: torch.cat([v, extra[k].to(v.dtype)]) for k, v in fields.items()}


class ShardedBatches:
    """Wraps an iterator of micro-batches (the group's, the same on every member) into this
    rank's slices; passes ``(batch, real)`` pairs (validation) through with the flag, a short
    batch filled to ``micro`` rows (:func:`fill`)."""

    def __init__(self, batches, sp_rank: int, sp: int, micro: int):
        self.batches, self.sp_rank, self.sp, self.micro = batches, sp_rank, sp, micro

    def __iter__(self):
        for item in self.batches:
            if isinstance(item, tuple):
                yield shard(fill(item[0], self.micro), self.sp_rank, self.sp), item[1]
            else:
                yield shard(item, self.sp_rank, self.sp)


def document_spans(position_ids) -> list[list[tuple[int, int]]] | None:
    """The documents of each packed row as ``(start, end)`` token spans, from position ids that
    restart at 0 at every document (:func:`pipeline.data.sft.collate`); None when every row is one
    document. The padding at the end of a row (its positions all 0) is one span: its tokens carry
    no target, and causally no real token sees them."""
    import torch

    pos = position_ids.detach().to("cpu")
    if not bool((pos[:, 1:] == 0).any()):
        return None
    rows = []
    for row in pos:
        nonzero = torch.nonzero(row).flatten()
        tail = int(nonzero[-1]) + 1 if len(nonzero) else 0  # where the trailing run of 0s (the padding) begins
        starts = torch.nonzero(row[:tail + 1] == 0).flatten().tolist()
        starts = starts if starts and starts[0] == 0 else [0, *starts]
        rows.append(list(zip(starts, [*starts[1:], row.shape[0]])))
    return rows


def document_attention(core):
    """``core`` (an attention function of transformers' ``ALL_ATTENTION_FUNCTIONS``) run causally
    within each document of a packed row, found by :func:`document_spans` from the full sequence's
    position ids that DeepSpeed's Ulysses wrapper hands it after the all-to-all.

    Why: the wrapper drops every dense attention mask (it was built for the local slice and would
    be ``seq²``), so with sdpa a packed row would be one causal sequence and its documents would
    attend to each other. Attention over each document's span with sdpa's own causal kernel is
    what the block-diagonal mask of one rank computes, without the ``seq²`` mask. (flex attention
    block masks would need ``torch.compile``, and the wrapper rebuilds them as plain causal masks;
    flash attention separates documents by the position ids itself.)"""
    import torch

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")
        spans = document_spans(pos) if pos is not None else None
        if spans is None:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        bias = kwargs.pop("position_bias", None)
        rows = []
        for b, row in enumerate(spans):  # query/key/value: (B, heads, T, head_dim)
            parts = []
            for s, e in row:
                extra = {} if bias is None else {"position_bias": bias[b:b + 1, ..., s:e, s:e]}
                out, _ = core(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], None,
                              *args, **kwargs, **extra)
                parts.append(out)  # (1, span, heads, head_dim)
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0), None

    return attention


def attach(model, *, sp: int, micro_batch: int, attn: str, documents: bool = False) -> Any:
    """Register DeepSpeed's Ulysses attention for ``model``'s attention implementation and return
    the ``mpu`` (sequence-parallel groups) for ``deepspeed.initialize``; None when ``sp`` is 1.
    ``documents``: rows are packed documents (SFT packing); with sdpa each attends within its own
    document (:func:`document_attention`). Needs the process group (the groups are made here)."""
    if sp == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if documents and attn == "sdpa":  # DeepSpeed wraps what is registered under the name: ours, around sdpa
        ALL_ATTENTION_FUNCTIONS[attn] = document_attention(ALL_ATTENTION_FUNCTIONS[attn])
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=sp,
        micro_batch_size=micro_batch, seq_length_is_variable=True)

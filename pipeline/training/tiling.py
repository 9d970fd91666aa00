"""ALST's memory savers for long sequences: a tiled MLP and tiled logits + loss.

At long context the largest activations of a decoder are not attention's (flash/SDPA kernels
never hold ``seq x seq``) but the MLP's intermediate (``tokens x intermediate``, several copies
for a gated MLP) and the head's logits (``tokens x vocab``, plus an fp32 copy, the log-softmax
and its gradient: for Llama-3's 128K vocabulary about 2 MB per token). Both are token-wise, so
they can run over tiles of the sequence, one tile's worth alive at a time (ALST, arXiv
2506.13996, section 3.2):

- ``model.tiled_mlp``: every decoder layer's ``mlp`` runs through DeepSpeed's ``TiledMLP``
  (``deepspeed.runtime.sequence_parallel.ulysses_sp``): the forward over tiles without
  autograd, the backward recomputing each tile and back-propagating it with the incoming
  gradient (so the trainer's loss scale and DeepSpeed's ``1/accum`` and fp16 scale reach the
  weights), telling ZeRO to reduce the MLP's gradients only after the last tile
  (``ds_grad_is_ready``). Tiles of ``hidden_size`` tokens unless ``model.tile_tokens`` says.
- ``model.tiled_logits``: the head and the cross entropy run per tile under
  ``torch.utils.checkpoint``; the forward keeps only each tile's loss, the backward recomputes
  one tile's logits at a time. DeepSpeed's ``TiledFusedLogitsLoss`` is deliberately not used:
  it runs the backward inside its forward with an incoming gradient of 1, so the head's weight
  gradient never sees the scale the loss is later multiplied by (the trainer's normalisation by
  the window's targets, DeepSpeed's ``1/accum``, an fp16 loss scale); only the hidden states'
  gradient is rescaled in its backward. Its general ``SequenceTiledCompute`` gets the scale
  right but runs one autograd pass per tile, handing a tied embedding's gradient to ZeRO once
  per tile and once more from the input embedding. Checkpointed tiles stay inside the one
  backward (one gradient per parameter, every scale applied) for one tile's logits of memory,
  at the cost of computing the head twice, as both DeepSpeed variants do for the MLP.

Exactness: both compute the same sums over the same tokens as the plain path; they differ only
in float summation order (checked against the plain path to 1e-6 in tests/test_tiling.py and,
with sequence parallelism and ZeRO 1-3 over 8 steps, in tests/test_sequence_parallel.py).
Every rank runs the same number of tiles (sequences are padded to a fixed length, and under
sequence parallelism every rank holds ``seq_len / sp`` tokens), which ZeRO-3 needs: each tile
gathers the parameters it uses.
"""

from __future__ import annotations

import math
import types
from typing import Any

LOGITS_TILE_BYTES = 256 * 2**20
"""One tile's fp32 logits at most (the automatic logits tile): 2048 tokens of a 32K vocabulary,
512 of Llama-3's 128K."""

# transformers config keys of models whose logits are not just head(hidden states): a tiled head
# computing head(hidden) per tile would leave these out
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def mlp_tile_tokens(hidden: int, tile_tokens: int = 0) -> int:
    """Tokens per MLP tile: ``tile_tokens``, or the hidden size (DeepSpeed's rule: a tile's
    intermediate activations then weigh about what one MLP weight matrix does)."""
    return tile_tokens or hidden


def logits_tile_tokens(vocab: int, tile_tokens: int = 0) -> int:
    """Tokens per logits tile (per sequence of the micro-batch): ``tile_tokens``, or as many as
    keep one tile's fp32 logits within :data:`LOGITS_TILE_BYTES`."""
    return tile_tokens or max(1, LOGITS_TILE_BYTES // (4 * vocab))


def _mlps(model) -> list:
    """The decoder layers' ``mlp`` modules."""
    import torch

    return [m.mlp for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]


def check(conf, model_cfg, *, head: str, prefix: str = "model") -> None:
    """Refuse savers this model cannot run exactly, before any heavy work (the model is built on
    the meta device: no memory, no weights).

    Raises:
        UserError: ``tiled_logits`` with a head that is not a causal LM's, a model that transforms
            its logits after the head (soft-capping, scaling) or takes no ``logits_to_keep``;
            ``tiled_mlp`` on a model without ``mlp`` modules, with mixture-of-experts layers
            or with dropout inside the MLP (a recomputed tile would draw another mask).
    """
    import inspect

    import torch

    from pipeline.errors import UserError

    if not (model_cfg.tiled_mlp or model_cfg.tiled_logits):
        return
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    problems = []
    if model_cfg.tiled_logits:
        transforms = [k for k in _LOGIT_TRANSFORMS if getattr(text, k, None) not in (None, 1, 1.0)]
        if head != "causal_lm":
            problems.append(f"{prefix}.tiled_logits is for a causal LM's head and loss (task=sft, pre-training), not {head}")
        elif transforms:
            problems.append(f"{prefix}.tiled_logits: {text.model_type} transforms its logits after the head "
                            f"({', '.join(transforms)}), which a tiled head would leave out; set {prefix}.tiled_logits=false")
    model = None
    if model_cfg.tiled_mlp or (model_cfg.tiled_logits and not problems):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(conf)
    if model is not None and model_cfg.tiled_logits and not problems:
        if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
            problems.append(f"{prefix}.tiled_logits: {type(model).__name__} cannot skip its full logits (no logits_to_keep "
                            f"argument); set {prefix}.tiled_logits=false")
    if model is not None and model_cfg.tiled_mlp:
        mlps = _mlps(model)
        if not mlps:
            problems.append(f"{prefix}.tiled_mlp: {type(model).__name__} has no decoder-layer modules named mlp to tile; "
                            f"set {prefix}.tiled_mlp=false")
        elif any(hasattr(m, "experts") for m in mlps):
            problems.append(f"{prefix}.tiled_mlp: mixture-of-experts layers are not supported (their router statistics are "
                            f"per call); set {prefix}.tiled_mlp=false")
        elif any(isinstance(d, torch.nn.Dropout) and d.p > 0 for m in mlps for d in m.modules()):
            problems.append(f"{prefix}.tiled_mlp: the MLP applies dropout, which a tile recomputed in the backward would draw "
                            f"anew; set the model's dropout to 0 or {prefix}.tiled_mlp=false")
    if problems:
        raise UserError("; ".join(problems) + ".")


def tile_mlps(model, tile_tokens: int) -> int:
    """Route every decoder layer's ``mlp`` of ``model`` through DeepSpeed's ``TiledMLP`` in tiles
    of ``tile_tokens`` tokens (per instance: the class is untouched). Returns how many."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    mlps = _mlps(model)
    for mlp in mlps:
        base = type(mlp).forward
        params = list(mlp.parameters())

        def forward(self, x, _base=base, _params=params):
            shards = math.ceil(x.shape[-2] / tile_tokens)
            if shards <= 1:  # nothing to tile: the plain forward (the same on every rank: equal lengths)
                return _base(self, x)
            return TiledMLP.apply(_base, self, x, shards, _params)

        mlp.forward = types.MethodType(forward, mlp)
    return len(mlps)


def _ce_sum(head, hidden, labels, ignore_index: int):
    import torch.nn.functional as F

    logits = head(hidden)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")


def tiled_loss(model, inputs: dict, labels, tile_tokens: int, ignore_index: int):
    """``(sum of token losses, number of targets)`` of a causal LM over tiles of the sequence
    (targets equal to ``ignore_index`` excluded).

    ``model`` (a DeepSpeed engine or the bare model) runs once with ``logits_to_keep=1`` (the
    head on one position only) while a hook takes the decoder's output, the head's input; the
    head and the loss then run per tile under ``torch.utils.checkpoint``."""
    import torch
    from torch.utils.checkpoint import checkpoint

    module: Any = getattr(model, "module", model)
    taken = {}

    def take(_mod, _args, out):
        taken["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    hook = module.get_decoder().register_forward_hook(take)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden, head = taken["h"], module.get_output_embeddings()
    T = hidden.shape[1]
    if T <= tile_tokens:
        # One tile covers the sequence (short rows, or a rank's 1/sp of one): checkpointing it
        # would only compute the head and its ZeRO-3 gather twice. The peak is the same either
        # way: the backward of the loss holds the tile's log-probabilities and their gradient
        # whether they were kept from the forward or recomputed, and nothing runs in between.
        return _ce_sum(head, hidden, labels, ignore_index), (labels != ignore_index).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, T, tile_tokens):
        h, y = hidden[:, a:a + tile_tokens], labels[:, a:a + tile_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, h, y, ignore_index, use_reentrant=False)
        else:
            total = total + _ce_sum(head, h, y, ignore_index)
    return total, (labels != ignore_index).sum()

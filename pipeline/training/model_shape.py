"""One reader of a Hugging Face config's shape, for the FLOPs of MFU and the memory planner alike.

:func:`pipeline.training.monitor.flops_per_token` and :func:`pipeline.training.plan.model_facts` used to read the
config each their own way and disagreed on which families have a gated MLP (``gpt_bigcode`` and
``starcoder2`` gated for the planner, plain for MFU; ``bert`` the other way round), so the two could
count different work for one model. Both read :func:`model_shape` now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Families whose MLP is up -> activation -> down (2 matrices).
PLAIN_MLP = frozenset({
    "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "mpt",
    "codegen", "biogpt", "bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2",
})
# Families whose MLP is gated (gate and up, activation, down: 3 matrices; SwiGLU/GeGLU).
GATED_MLP = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "smollm3", "deepseek_v3",
})
# Families with a learned absolute position embedding (a lookup, not a matmul).
LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt"})


def cfg_get(conf: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``conf`` has and is not None (families name one thing differently)."""
    for name in names:
        value = getattr(conf, name, None)
        if value is not None:
            return value
    return default


def gated_mlp(conf: Any) -> bool:
    """Whether the model's MLP is gated (3 matrices) rather than plain (2).

    Known families by ``model_type``; another family by its activation: ``silu``/``swish`` or a
    name containing ``glu`` are the gated kinds in transformers (a plain GELU MLP names ``gelu*``).
    """
    model_type = getattr(conf, "model_type", "") or ""
    if model_type in PLAIN_MLP:
        return False
    if model_type in GATED_MLP:
        return True
    act = str(cfg_get(conf, "hidden_act", "activation_function", default="")).lower()
    return act in ("silu", "swish") or "glu" in act


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs and memory estimates read from a config; widths in elements."""

    layers: int
    hidden: int
    vocab: int
    heads: int
    head_dim: int  # per head; heads x head_dim is the attention width (the hidden size for most models)
    kv_heads: int
    intermediate: int
    positions: int  # rows of a learned position table (0 for rotary/ALiBi models)
    gated: bool
    tied: bool  # the LM head shares the input embedding's weights
    dropout: float  # the largest dropout probability the config sets


def model_shape(conf: Any) -> ModelShape:
    """Read ``conf`` (a transformers config).

    Raises:
        ValueError: the config names no layer count, hidden size or vocabulary size.
    """
    layers = cfg_get(conf, "num_hidden_layers", "n_layer", "num_layers")
    hidden = cfg_get(conf, "hidden_size", "n_embd", "d_model")
    vocab = cfg_get(conf, "vocab_size")
    if not (layers and hidden and vocab):
        raise ValueError(f"cannot read layers/hidden size/vocab size from {type(conf).__name__} "
                         "(expected num_hidden_layers|n_layer, hidden_size|n_embd, vocab_size)")
    heads = int(cfg_get(conf, "num_attention_heads", "n_head", default=1))
    model_type = getattr(conf, "model_type", "") or ""
    positions = cfg_get(conf, "n_positions", "max_position_embeddings", default=0) if model_type in LEARNED_POSITIONS else 0
    dropout = max(float(cfg_get(conf, k, default=0.0) or 0.0)
                  for k in ("attention_dropout", "attn_pdrop", "resid_pdrop", "hidden_dropout_prob", "dropout"))
    return ModelShape(
        layers=int(layers), hidden=int(hidden), vocab=int(vocab), heads=heads,
        head_dim=int(cfg_get(conf, "head_dim", default=int(hidden) // heads)),
        kv_heads=int(cfg_get(conf, "num_key_value_heads", default=heads)),
        intermediate=int(cfg_get(conf, "intermediate_size", "n_inner", "ffn_dim", default=4 * int(hidden))),
        positions=int(positions), gated=gated_mlp(conf), tied=bool(getattr(conf, "tie_word_embeddings", True)),
        dropout=dropout,
    )

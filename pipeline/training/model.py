"""Build the causal LM: from an architecture config, or from a Hugging Face checkpoint.

Under ZeRO-3 the model is never materialised whole on one rank: a
``transformers.integrations.HfDeepSpeedConfig`` object, kept alive for the life of the
model, makes ``from_config`` construct under ``deepspeed.zero.Init`` and
``from_pretrained`` load each weight straight into its partitions.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.inputs import TOKENIZER_FILES, ModelSource, check_model, check_positions

# Architecture-specific names of the size fields, for the types we document; any other
# model type takes its keys verbatim from `model.extra`.
_SIZE_KEYS = {
    "gpt2": {"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head", "max_position_embeddings": "n_positions", "intermediate_size": "n_inner"},
}
_KEEPALIVE: list[Any] = []  # HfDeepSpeedConfig objects must outlive model construction


@dataclass
class ModelConfig:
    path: str = ""
    """The model to continue training: a Hugging Face model directory, or a checkpoint of this
    pipeline (a run, checkpoints/ or step directory; exported and verified into
    <output>/init_model first). "" builds a new model from the architecture keys below."""
    model_type: str = "llama"
    """Any causal LM type transformers knows (llama, gpt2, qwen2, mistral, ...), for a new model."""
    hidden_size: int = 256
    """Width of the residual stream (a new model)."""
    num_layers: int = 4
    """Transformer blocks (a new model)."""
    num_heads: int = 4
    """Attention heads (a new model)."""
    num_kv_heads: int = 0
    """Key/value heads for grouped-query attention (0: same as num_heads; ignored by gpt2)."""
    intermediate_size: int = 0
    """Width of the MLP (0: the architecture's default rule, e.g. 4 x hidden for gpt2, 8/3 x hidden rounded for llama)."""
    max_position_embeddings: int = 0
    """Longest sequence the model supports in tokens (0: data.seq_len; a data.seq_len beyond it is refused)."""
    tie_word_embeddings: bool = False
    """Share the input embedding and output head weights (a new model)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keys for the transformers config verbatim (e.g. {rope_theta: 500000})."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    activation_offload: bool = False
    """With activation_checkpointing on GPUs: keep each layer's checkpointed input in pinned host
    memory instead of on the GPU (copied back for its recompute; transformers' offload). Frees
    layers x seq x hidden x bytes per rank, what dominates at long sequences (ALST); costs two
    copies per layer. No effect on CPU ranks, whose activations already live in host memory."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 where installed."""
    tiled_mlp: bool = False
    """Run each MLP over tiles of the sequence (DeepSpeed's TiledMLP, recomputed in the backward):
    the MLP's intermediate activations of one tile at a time. For long sequences (ALST)."""
    tiled_logits: bool = False
    """Compute the LM head and the loss over tiles of the sequence, recomputed in the backward:
    the seq x vocab logits never exist whole. For long sequences (ALST)."""
    tile_tokens: int = 0
    """Tokens per tile of tiled_mlp / tiled_logits (0: the hidden size for the MLP, DeepSpeed's rule,
    and as many as keep one tile's fp32 logits within 256 MiB for the head)."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.path:
            for key in ("hidden_size", "num_layers", "num_heads"):
                if getattr(self, key) <= 0:
                    problems.append((key, f"must be > 0, got {getattr(self, key)}"))
            if self.num_heads > 0 and self.hidden_size % self.num_heads:
                problems.append(("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}"))
            if self.num_kv_heads and self.num_heads % self.num_kv_heads:
                problems.append(("num_kv_heads", f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"))
        if self.tile_tokens < 0:
            problems.append(("tile_tokens", f"must be >= 0 (0: automatic), got {self.tile_tokens}"))
        return problems + offload_problems(self)


def offload_problems(cfg: Any) -> list[tuple[str, str]]:
    """``model.activation_offload`` offloads what checkpointing keeps: without it there is nothing to offload."""
    if getattr(cfg, "activation_offload", False) and not cfg.activation_checkpointing:
        return [("activation_offload", ("offloads the layer inputs that activation checkpointing keeps; "
                                        "set model.activation_checkpointing=true with it, or drop activation_offload"))]
    return []


def enable_checkpointing(model: Any, offload: bool) -> None:
    """Activation checkpointing on every decoder layer (non-reentrant), the checkpointed inputs in
    pinned host memory with ``offload``, through transformers' own switch
    (``activation_checkpointing_enable(offload=...)``: ``torch.autograd.graph.save_on_cpu`` around
    each layer's checkpoint). CPU ranks have no device memory to free, and pinning needs an
    accelerator, so there ``offload`` is a no-op (the stage says so at start)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before the rename (no offload there: refused by check_offload)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    enable(activation_checkpointing_kwargs=kwargs, **({"offload": True} if offload and offload_applies() else {}))


def offload_applies() -> bool:
    """Whether this process trains on an accelerator whose memory activation offload frees."""
    return torch.cuda.is_available()


def check_offload(cfg: Any) -> str:
    """Before heavy work: refuse ``model.activation_offload`` where transformers cannot do it;
    returns a note for the console when it has no effect here (CPU ranks), else ""."""
    if not getattr(cfg, "activation_offload", False):
        return ""
    import inspect

    from transformers import PreTrainedModel

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    if enable is None or "offload" not in inspect.signature(enable).parameters:
        import transformers

        raise UserError(f"model.activation_offload: transformers {transformers.__version__} cannot offload checkpointed "
                        "activations; upgrade transformers (pip install -U transformers) or drop model.activation_offload")
    if not offload_applies():
        return ("model.activation_offload: no effect on CPU ranks (activations already live in host memory); "
                "it frees GPU memory on GPU ranks")
    return ""


def _llama_intermediate(hidden: int) -> int:
    return 64 * math.ceil(8 * hidden / 3 / 64)


def hf_config(cfg: ModelConfig, vocab_size: int, seq_len: int, tokenizer: dict, *, weights: bool = True,
              source: ModelSource | None = None):
    """The transformers config of the model to train (new, or from ``cfg.path``: a Hugging Face
    directory or a pipeline checkpoint, checked by :func:`pipeline.inputs.check_model`).

    Args:
        weights: whether ``cfg.path`` must hold its weights (the planner reads config.json only).
        source: ``cfg.path`` as the stage already checked it (not checked again).
    """
    from transformers import AutoConfig

    if cfg.path:
        source = source or check_model(cfg.path, "model.path", weights=weights)
        try:
            conf = AutoConfig.from_pretrained(source.config_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path '{cfg.path}' is not a Hugging Face model directory ({e}); point it at a directory with config.json") from None
        check_positions(conf, seq_len, what="data.seq_len", fix=f"lower data.seq_len (model.path '{cfg.path}')")
        return conf
    names = _SIZE_KEYS.get(cfg.model_type, {})
    kwargs: dict[str, Any] = {
        names.get("hidden_size", "hidden_size"): cfg.hidden_size,
        names.get("num_layers", "num_hidden_layers"): cfg.num_layers,
        names.get("num_heads", "num_attention_heads"): cfg.num_heads,
        names.get("max_position_embeddings", "max_position_embeddings"): cfg.max_position_embeddings or seq_len,
        "vocab_size": vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if cfg.model_type != "gpt2":
        kwargs["num_key_value_heads"] = cfg.num_kv_heads or cfg.num_heads
        kwargs["intermediate_size"] = cfg.intermediate_size or _llama_intermediate(cfg.hidden_size)
    elif cfg.intermediate_size:
        kwargs["n_inner"] = cfg.intermediate_size
    for key in ("bos_id", "eos_id", "pad_id"):
        if tokenizer.get(key) is not None:
            kwargs[key.replace("_id", "_token_id")] = tokenizer[key]
    kwargs.update(cfg.extra)
    try:
        conf = AutoConfig.for_model(cfg.model_type, **kwargs)
    except ValueError as e:
        raise UserError(f"model.model_type '{cfg.model_type}': {e}") from None
    # A new model's positions come from model.max_position_embeddings (or model.extra): GPT-2's
    # learned table cannot index past it, and a RoPE model's config would claim fewer positions
    # than it was trained on, so a longer data.seq_len is refused for every type.
    check_positions(conf, seq_len, what="data.seq_len",
                    fix=f"raise model.max_position_embeddings to at least {seq_len} (0 means data.seq_len), or lower data.seq_len")
    return conf


def architecture_fingerprint(conf) -> str:
    """Hash of the architecture (shapes), to refuse resuming a checkpoint of another model."""
    d = conf.to_dict()
    keep = {k: d[k] for k in sorted(d) if any(s in k for s in ("hidden", "layer", "head", "vocab", "embd", "inner", "intermediate", "model_type", "tie_word"))}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_tokenizer_match(source: ModelSource, conf, data_tokenizer: dict, data_dir: str) -> None:
    """Refuse a model (``model.path``, checked) whose vocabulary or tokenizer differs from the shards' tokenizer."""
    from pipeline.data.tokenizer import load_tokenizer

    model_path = str(source.path)
    vocab = data_tokenizer["vocab_size"]
    if conf.vocab_size < vocab:
        raise UserError(
            f"model.path '{model_path}' has {conf.vocab_size} embeddings but the data in {data_dir} was tokenized with "
            f"{vocab} tokens; preprocess with the model's tokenizer (tokenizer.path={model_path})"
        )
    tok_dir = source.tokenizer_dir  # a checkpoint keeps it in hf/tokenizer
    if not any((tok_dir / f).exists() for f in TOKENIZER_FILES):
        raise UserError(
            f"model.path '{model_path}' holds no tokenizer, so the data's tokenizer cannot be checked against it; "
            "copy the model's tokenizer files into that directory"
        )
    theirs = load_tokenizer(tok_dir).fingerprint
    if theirs != data_tokenizer["fingerprint"]:
        raise UserError(
            f"the tokenizer of model.path '{model_path}' differs from the one {data_dir} was tokenized with "
            f"(fingerprints {theirs[:12]} vs {data_tokenizer['fingerprint'][:12]}); preprocess the corpus again "
            f"with tokenizer.path={model_path}"
        )


def build_model(cfg: ModelConfig, conf, ds_config: dict, dtype: torch.dtype = torch.float32, head: str = "causal_lm") -> torch.nn.Module:
    """Construct (ZeRO-3: partitioned) and return the model.

    Args:
        head: ``causal_lm`` or ``classification`` (``AutoModelForSequenceClassification``;
            a head missing from ``cfg.path`` is initialised, also under ZeRO-3).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import HfDeepSpeedConfig

    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        _KEEPALIVE.append(HfDeepSpeedConfig(ds_config))  # switches transformers to zero.Init
    auto = AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": dtype}
    if cfg.path:
        model = auto.from_pretrained(cfg.path, config=conf, **kwargs)
    else:
        model = auto.from_config(conf, **kwargs)
    model.config.architectures = [type(model).__name__]  # export and evaluate pick the class from it
    if cfg.activation_checkpointing:
        enable_checkpointing(model, cfg.activation_offload)
    if cfg.tiled_mlp:  # DeepSpeed's TiledMLP in every decoder layer (pipeline/training/tiling.py)
        from pipeline.training.tiling import mlp_tile_tokens, tile_mlps

        tile_mlps(model, mlp_tile_tokens(model.config.get_text_config().hidden_size, cfg.tile_tokens))
    model.config.use_cache = False
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters (nor embeddings' norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]

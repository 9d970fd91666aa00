"""ALST's memory savers (pipeline/training/tiling.py): model.tiled_mlp and model.tiled_logits.

Against the plain path on the same model and batch: the loss and every parameter's gradient
agree to float rounding, with masked labels, a scaled backward (the trainer multiplies the loss
before DeepSpeed's backward: the scale must reach the weights), tied and untied embeddings, and
with activation checkpointing. The same savers under sequence parallelism and ZeRO 1-3 over
8 training steps: tests/test_sequence_parallel.py. Refusals: before any heavy work.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from inproc import run_entry

from pipeline.errors import UserError
from pipeline.training.model import enable_checkpointing
from pipeline.training.tiling import check, logits_tile_tokens, mlp_tile_tokens, tile_mlps
from pipeline.training.trainer import IGNORE_INDEX, CausalLMTask


def _model(kind: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    conf = Qwen2Config(**common, tie_word_embeddings=True) if kind == "qwen2-tied" else LlamaConfig(**common)
    return AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").float()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 30), generator=g)
    labels = torch.randint(0, 97, (2, 30), generator=g)
    labels[0, :9] = IGNORE_INDEX  # a masked prompt, across a tile boundary
    labels[1, 20:] = IGNORE_INDEX  # a whole tile without targets
    return {"input_ids": ids, "labels": labels}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float summation order: within 1e-5 of the tensor's largest entry."""
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def _loss_and_grads(model, task, scale: float = 3.0):
    model.zero_grad()
    loss, n = task.loss(model, _batch())
    (loss * scale).backward()
    return float(loss.detach()), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_tiled_mlp_and_logits_give_the_plain_loss_and_gradients(kind: str, checkpointing: bool):
    model = _model(kind)
    tiled = copy.deepcopy(model)
    if checkpointing:
        for m in (model, tiled):
            enable_checkpointing(m, offload=False)  # the stages' switch (pipeline.training.model)
            m.train()
    assert tile_mlps(tiled, 8) == 2  # 30 tokens: tiles of 8, 8, 8, 6
    plain_loss, plain_n, plain = _loss_and_grads(model, CausalLMTask())
    loss, n, grads = _loss_and_grads(tiled, CausalLMTask(logits_tile=7))  # 5 tiles, the last of 2 tokens
    assert n == plain_n == 2 * 30 - 9 - 10
    assert abs(loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert grads.keys() == plain.keys() and len(grads) == len(list(model.parameters()))
    for k in plain:
        assert _close(grads[k], plain[k]), (k, float((grads[k] - plain[k]).abs().max()))
    if kind == "qwen2-tied":  # the head's gradient and the input embedding's arrive in one tensor
        assert tiled.get_output_embeddings().weight is tiled.get_input_embeddings().weight


def test_each_saver_alone_matches_and_no_grad_runs_the_forward_only():
    model = _model("llama")
    _, _, plain = _loss_and_grads(model, CausalLMTask())
    only_mlp = copy.deepcopy(model)
    tile_mlps(only_mlp, 4)
    for task, m in ((CausalLMTask(), only_mlp), (CausalLMTask(logits_tile=4), copy.deepcopy(model))):
        _, _, grads = _loss_and_grads(m, task)
        assert all(_close(grads[k], plain[k]) for k in plain)
    with torch.no_grad():  # validation: no checkpoint, the same sum
        a = CausalLMTask().loss(model, _batch())[0]
        b = CausalLMTask(logits_tile=4).loss(only_mlp, _batch())[0]
    assert abs(float(a) - float(b)) <= 1e-5 * float(a)


@pytest.mark.parametrize("tile, head_calls", [(7, 1 + 5 + 5), (30, 1 + 1), (64, 1 + 1)],
                         ids=["5-tiles", "one-tile-exactly", "one-tile-larger"])
def test_one_logits_tile_is_not_recomputed(tile: int, head_calls: int):
    # a rank's sequence within one tile (short rows, or 1/sp of one under sequence parallelism): the head runs
    # once in the forward and is not recomputed in the backward (beside the one-position pass that takes the
    # decoder's output); more tiles: each tile's head again in the backward. The same loss and gradients.
    model = _model("llama")
    _, _, plain = _loss_and_grads(model, CausalLMTask())
    tiled = copy.deepcopy(model)
    calls = []
    tiled.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    _, _, grads = _loss_and_grads(tiled, CausalLMTask(logits_tile=tile))
    assert len(calls) == head_calls, calls
    assert sum(calls) == 1 + 30 * (1 if tile >= 30 else 2)
    assert all(_close(grads[k], plain[k]) for k in plain)


def test_tile_sizes():
    assert mlp_tile_tokens(4096) == 4096 and mlp_tile_tokens(4096, 512) == 512
    assert logits_tile_tokens(32000) == 2097 and logits_tile_tokens(128256) == 523  # 256 MiB of fp32 logits
    assert logits_tile_tokens(128256, 64) == 64 and logits_tile_tokens(10**9) == 1


def _saver(**kw):
    from pipeline.training.model import ModelConfig

    return ModelConfig(**kw)


@pytest.mark.parametrize("conf_kind, saver, head, phrase", [
    ("gpt2", {"tiled_mlp": True}, "causal_lm", "model.tiled_mlp: the MLP applies dropout"),
    ("gemma2", {"tiled_logits": True}, "causal_lm", "gemma2 transforms its logits after the head (final_logit_softcapping)"),
    ("llama", {"tiled_logits": True}, "classification", "model.tiled_logits is for a causal LM's head and loss"),
    ("bert", {"tiled_mlp": True}, "classification", "has no decoder-layer modules named mlp"),
    ("mixtral", {"tiled_mlp": True}, "causal_lm", "mixture-of-experts layers are not supported"),
], ids=["dropout", "softcapping", "classification-head", "no-mlp", "moe"])
def test_savers_a_model_cannot_run_exactly_are_refused(conf_kind, saver, head, phrase):
    from transformers import AutoConfig

    sizes = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=97)
    conf = {
        "gpt2": lambda: AutoConfig.for_model("gpt2", n_embd=32, n_head=4, n_layer=1, vocab_size=97),
        "gemma2": lambda: AutoConfig.for_model("gemma2", num_hidden_layers=1, num_key_value_heads=4, head_dim=8, **sizes),
        "llama": lambda: AutoConfig.for_model("llama", num_hidden_layers=1, **sizes),
        "bert": lambda: AutoConfig.for_model("bert", num_hidden_layers=1, **sizes),
        "mixtral": lambda: AutoConfig.for_model("mixtral", num_hidden_layers=1, num_local_experts=2, **sizes),
    }[conf_kind]()
    with pytest.raises(UserError) as e:
        check(conf, _saver(**saver), head=head)
    assert phrase in str(e.value)
    check(conf, _saver(), head=head)  # the savers off: nothing to refuse


def test_the_train_stage_refuses_before_any_heavy_work(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = [f"output={out}", f"data.datasets.0.path={tiny_dataset}", *TINY_MODEL]
    code, _, err = run_entry("train.py", [*common, "model.model_type=gpt2", "model.tiled_mlp=true"], monkeypatch, capsys)
    assert code == 2 and "model.tiled_mlp: the MLP applies dropout" in err and "Traceback" not in err
    code, _, err = run_entry("train.py", [*common, "model.tile_tokens=-1"], monkeypatch, capsys)
    assert code == 2 and "model.tile_tokens: must be >= 0 (0: automatic), got -1" in err
    assert not out.exists()


def test_peer_names_point_to_the_keys():
    from pipeline.config import load_config
    from pipeline.stages.train import TrainConfig

    for key, ours in (("model.tiled_mlp_compute", "tiled_mlp"), ("parallel.ulysses_degree", "sequence_parallel_size"),
                      ("parallel.sp_size", "sequence_parallel_size")):
        with pytest.raises(UserError) as e:
            load_config(TrainConfig, None, [f"{key}=2"])
        assert f"{key}: unknown key; did you mean '{ours}'?" in str(e.value)

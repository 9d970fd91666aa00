"""model.activation_offload: activation checkpointing with the checkpointed layer inputs in
pinned host memory (ALST's offload, through transformers' ``activation_checkpointing_enable``).

On CPU ranks it is a no-op that the stage announces (pinning needs an accelerator: asking
transformers for it there crashes the first forward); without checkpointing it is refused
before any work; the planner moves the layer inputs from the device to the host on GPU targets
(tests/test_plan.py). On a GPU: the same loss and gradients as checkpointing alone, and the
device memory it is meant to free.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from inproc import run_entry

from pipeline.training.model import ModelConfig, build_model, check_offload, enable_checkpointing


def _llama(hidden: int = 32, layers: int = 2, device: str = "cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=80 * hidden // 32, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").to(device=device, dtype=dtype)


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return float(out.loss.detach()), {k: p.grad.float().clone() for k, p in model.named_parameters()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-rank path")
def test_on_cpu_ranks_offload_is_plain_checkpointing():
    """build_model with the key on a CPU rank: every decoder layer checkpointed, the first forward and backward
    run (transformers' offload would ask for pinned memory there and fail) and match checkpointing alone."""
    from transformers import LlamaConfig

    conf = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(activation_checkpointing=True, activation_offload=offload), conf, {})
        model.train()
        layers = model.model.layers
        assert all(layer.gradient_checkpointing for layer in layers)
        runs[offload] = _loss_and_grads(model, ids)
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][k], g) for k, g in runs[False][1].items())


def test_the_stage_says_offload_does_nothing_on_cpu_ranks(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys):
    code, out, err = run_entry("train.py", ["--print-config", f"data.datasets.0.path={tiny_dataset}", *TINY_MODEL,
                                            f"output={tmp_path / 'run'}", "model.activation_checkpointing=true",
                                            "model.activation_offload=true"], monkeypatch, capsys)
    assert code == 0, err
    assert "model.activation_offload: no effect on CPU ranks (activations already live in host memory)" in out
    assert check_offload(ModelConfig(activation_checkpointing=True)) == ""  # not asked: nothing said


@pytest.mark.parametrize("script,extra", [("train.py", []), ("finetune.py", ["task=sft"])])
def test_offload_without_checkpointing_is_refused_before_any_work(script, extra, tiny_dataset: Path, tmp_path: Path,
                                                                    monkeypatch, capsys):
    common = [f"output={tmp_path / 'run'}", *extra]
    if script == "train.py":
        common += [f"data.datasets.0.path={tiny_dataset}", *TINY_MODEL]
    code, _, err = run_entry(script, [*common, "model.activation_offload=true"], monkeypatch, capsys)
    assert code == 2, err
    assert "model.activation_offload" in err and "set model.activation_checkpointing=true with it" in err
    # ArcticTraining's name for the same switch points at ours
    code, _, err = run_entry(script, [*common, "model.activation_checkpoint_cpu_offload=true"], monkeypatch, capsys)
    assert code == 2 and "activation_offload" in err, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="activation offload frees GPU memory: needs CUDA")
def test_on_a_gpu_offload_keeps_the_gradients_and_frees_the_layer_inputs():
    """bf16 Llama, 8 layers of hidden 1024, 8,192 tokens: the layer inputs (8 x 16 MiB) leave the GPU."""
    layers, hidden, seq = 8, 1024, 8192
    base = _llama(hidden, layers, "cuda", torch.bfloat16)
    offloaded = copy.deepcopy(base)
    enable_checkpointing(base, offload=False)
    enable_checkpointing(offloaded, offload=True)
    ids = torch.randint(0, 97, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    peaks, results = {}, {}
    for name, model in (("base", base), ("offloaded", offloaded)):
        model.train()
        _loss_and_grads(model, ids)  # warm-up: the caching allocators hold their blocks from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model.zero_grad(set_to_none=True)
        results[name] = _loss_and_grads(model, ids)
        peaks[name] = torch.cuda.max_memory_allocated() - start
    assert results["offloaded"][0] == pytest.approx(results["base"][0], abs=1e-6)
    for k, g in results["base"][1].items():
        assert float((results["offloaded"][1][k] - g).abs().max()) <= 1e-6 * max(float(g.abs().max()), 1.0), k
    layer_input = seq * hidden * 2
    assert peaks["base"] - peaks["offloaded"] >= 0.8 * (layers - 1) * layer_input, peaks

"""Stage 2, pre-train / continue-train a causal LM with DeepSpeed.

    deepspeed --num_gpus N launch/train.py --config FILE [key=value ...]
    torchrun --nproc-per-node N launch/train.py ...      srun launch/train.py ...

Flow: check the config and data -> resolve the DeepSpeed JSON -> start the process group
-> build the model (ZeRO-3: partitioned from the start) -> ``deepspeed.initialize`` ->
resume if a checkpoint exists -> train (:class:`pipeline.trainer.Trainer`) -> checkpoint.

The run directory ``<output>`` holds ``config.yaml``, ``ds_config.json``, ``tensorboard/``
and ``checkpoints/`` (see :mod:`pipeline.checkpoint`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import checkpoint, dist
from pipeline.checkpoint import CheckpointConfig
from pipeline.config import to_dict, to_yaml
from pipeline.data.shards import read_manifest
from pipeline.dist import DistConfig
from pipeline.ds_config import DeepSpeedSection, load_ds_json, locate_ds_config, resolve_ds_config, resolve_precision, summarize, zero_stage
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.model import ModelConfig
from pipeline.monitor import MonitorConfig
from pipeline.trainer import OptimConfig

VERSION = 1


@dataclass
class DatasetEntry:
    path: str = ""
    """A preprocessed dataset directory (output of launch/preprocess.py)."""
    weight: float = 1.0
    """Sampling weight of this dataset relative to the others (its sources keep their own weights within it)."""


@dataclass
class DataConfig:
    datasets: list[DatasetEntry] = field(default_factory=lambda: [DatasetEntry(path="outputs/sample/data")])
    """Preprocessed datasets blended by weight (all tokenized with the same tokenizer)."""
    seq_len: int = 256
    """Tokens per training sequence (each sample reads seq_len + 1 tokens)."""
    verify: Literal["none", "fast", "thorough"] = "fast"
    """Integrity check of the shards at start: none, fast (sizes and offsets) or thorough (sha256)."""

    def check(self) -> list[tuple[str, str]]:
        p = []
        if not self.datasets:
            p.append(("datasets", "no data; give at least one preprocessed dataset (data.datasets.0.path=DIR)"))
        if self.seq_len <= 0:
            p.append(("seq_len", f"must be > 0, got {self.seq_len}"))
        return p


@dataclass
class TrainConfig:
    output: str = "outputs/sample/pretrain"
    """Run directory: config, DeepSpeed JSON, TensorBoard logs and checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: a new one from architecture keys, or model.path to continue training."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: OptimConfig = field(default_factory=OptimConfig)
    """Batch sizes, optimizer, schedule, validation cadence."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """Which DeepSpeed JSON and precision."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group backend and timeout."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Console and TensorBoard logging."""


def resolved_ds(cfg: TrainConfig, world: int, hidden: int | None) -> dict:
    """The DeepSpeed config of this run, every "auto" filled from the recipe."""
    path = locate_ds_config(cfg.deepspeed.config)
    t = cfg.train
    return resolve_ds_config(
        load_ds_json(str(path)), source=str(path), micro_batch=t.micro_batch_size, grad_accum=t.grad_accum,
        global_batch=t.global_batch_size, dp_world=world, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
        weight_decay=t.weight_decay, grad_clip=t.grad_clip, precision=resolve_precision(cfg.deepspeed.precision),
        hidden_size=hidden, nvme_path=cfg.deepspeed.nvme_path, overrides=cfg.deepspeed.overrides,
    )


def describe(cfg: TrainConfig) -> str:
    """Extra ``--print-config`` output: the resolved DeepSpeed JSON for this launch's world size."""
    world = dist.detect().world_size
    ds = resolved_ds(cfg, world, cfg.model.hidden_size if not cfg.model.path else None)
    return f"# DeepSpeed config for {world} rank(s): {summarize(ds)}\n{json.dumps(ds, indent=2)}\n"


def _data_tokenizer(cfg: TrainConfig) -> tuple[dict, str]:
    """The shards' tokenizer info (from the first dataset's manifest) and its directory."""
    first = cfg.data.datasets[0].path
    manifest = read_manifest(first)
    return manifest["tokenizer"], str(Path(first) / manifest["tokenizer"]["dir"])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, local_rank: int | None = None) -> int:
    """Run the stage; returns the process exit code (0, or EXIT_REQUEUE after preemption)."""
    import deepspeed
    import torch

    from pipeline.data.sampler import BlendedSamples, RankLoader, Validation
    from pipeline.model import architecture_fingerprint, build_model, check_tokenizer_match, hf_config, param_groups
    from pipeline.monitor import Monitor, count_params, flops_per_token, peak_flops
    from pipeline.trainer import CausalLMTask, Trainer, evaluate_lm, lr_lambda

    # -- everything a user can get wrong, before any heavy work
    tok_info, tok_dir = _data_tokenizer(cfg)
    conf = hf_config(cfg.model, tok_info["vocab_size"], cfg.data.seq_len, tok_info)
    if cfg.model.path:
        check_tokenizer_match(cfg.model.path, conf, tok_info, cfg.data.datasets[0].path)
    env = dist.detect(local_rank_arg=local_rank)
    hidden = getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", None)
    ds = resolved_ds(cfg, env.world_size, hidden)
    datasets = [(d.path, d.weight) for d in cfg.data.datasets]
    samples = BlendedSamples(datasets, "train", cfg.data.seq_len, cfg.train.seed, verify=cfg.data.verify)
    out = Path(cfg.output)
    root = out / "checkpoints"
    resume_from = checkpoint.find_resume(cfg.checkpoint.resume, root)

    env = dist.init(cfg.dist, local_rank)
    rank, world = env.rank, env.world_size
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
        atomic_write_json(out / "ds_config.json", ds)
    dist.print0(f"train: {world} rank(s), {summarize(ds)}; data {samples.components}")

    seed_everything(cfg.train.seed)
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    model = build_model(cfg.model, conf, ds)  # fp32 master weights; DeepSpeed casts for bf16/fp16
    n_params = count_params(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
    )
    current = {
        "architecture": architecture_fingerprint(conf),
        "model_summary": f"{conf.model_type} {n_params / 1e6:.1f}M params",
        "tokenizer_fingerprint": tok_info["fingerprint"],
        "world_size": world,
        "zero_stage": zero_stage(ds),
    }
    start_step = 0
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        checkpoint.check_compatible(resume_from, meta, current)
        checkpoint.load(engine, resume_from)
        start_step = meta["step"]
        dist.print0(f"resumed from {resume_from} at step {start_step}")
    if start_step >= cfg.train.max_steps:
        dist.print0(f"already trained to step {start_step} (train.max_steps={cfg.train.max_steps}); nothing to do")
        dist.shutdown()
        return 0

    loader = RankLoader(samples, rank, world, micro, accum, start_step=start_step)
    val = Validation(datasets, cfg.data.seq_len, cfg.train.eval_batches, micro, rank=rank, world=world, verify="none") if cfg.train.eval_batches else None
    task = CausalLMTask()
    device = next(engine.module.parameters()).device
    peak = peak_flops(device, precision)[0] if rank == 0 else 0.0  # only rank 0 reports (and measures)
    monitor = Monitor(
        cfg.monitor, out / "tensorboard", enabled=rank == 0, world_size=world,
        flops_per_token=flops_per_token(conf, cfg.data.seq_len, n_params), peak_flops_per_device=peak,
        tokens_per_step=micro * accum * world * cfg.data.seq_len, samples_per_step=micro * accum * world, device=device,
    )
    monitor.log_hparams({**to_dict(cfg), "n_params": n_params, "world_size": world, "precision": precision})

    def save(step: int) -> Path:
        meta = {**current, "version": VERSION, "consumed_samples": step * micro * accum * world, "seq_len": cfg.data.seq_len,
                "global_batch": micro * accum * world, "precision": precision, "n_params": n_params}
        files = {"config.yaml": to_yaml(cfg), "ds_config.json": json.dumps(ds, indent=2) + "\n"}
        conf_path = out / ".hf_config"
        if rank == 0:
            conf.save_pretrained(conf_path)
        return checkpoint.save(engine, root, step, meta, files, {"config.json": conf_path / "config.json", "tokenizer": Path(tok_dir)},
                               cfg.checkpoint.keep_last)

    trainer = Trainer(
        engine=engine, task=task, batches=iter(loader), grad_accum=accum, max_steps=cfg.train.max_steps,
        start_step=start_step, monitor=monitor,
        evaluate=(lambda eng: evaluate_lm(eng, task, val)) if val is not None else None,
        eval_every=cfg.train.eval_every, save=save, save_every=cfg.checkpoint.every,
    )
    try:
        code = trainer.fit()
    finally:
        loader.close()
        monitor.close()
    if rank == 0:
        atomic_write_json(out / "losses.json", {"start_step": start_step, "losses": trainer.history})
    dist.shutdown()
    return code

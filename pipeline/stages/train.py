"""Stage 2, pre-train / continue-train a causal LM with DeepSpeed.

    deepspeed --num_gpus N launch/train.py --config FILE [key=value ...]
    torchrun --nproc-per-node N launch/train.py ...      srun launch/train.py ...

Flow: check the config and data -> resolve the DeepSpeed JSON -> start the process group
-> build the model (ZeRO-3: partitioned from the start) -> ``deepspeed.initialize`` ->
resume if a checkpoint exists -> train (:class:`pipeline.training.trainer.Trainer`) -> checkpoint.

The run directory ``<output>`` holds ``config.yaml``, ``ds_config.json``, ``tensorboard/``
and ``checkpoints/`` (see :mod:`pipeline.training.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipeline import dist
from pipeline.data.shards import read_manifest
from pipeline.dist import DistConfig
from pipeline.eval.tasks.harness import HarnessConfig, in_loop
from pipeline.inputs import check_model
from pipeline.io import atomic_write_json
from pipeline.stages.export import init_model_dir
from pipeline.training.checkpoint import CheckpointConfig
from pipeline.training.ds_config import DeepSpeedSection, summarize
from pipeline.training.engine import Run
from pipeline.training.model import ModelConfig
from pipeline.training.monitor import MonitorConfig
from pipeline.training.sequence_parallel import ParallelConfig
from pipeline.training.trainer import OptimConfig

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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sequence parallelism (long context): ranks that share one sequence."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """lm-evaluation-harness tasks on the live model during training (harness.tasks)."""


def describe(cfg: TrainConfig) -> str:
    """Extra ``--print-config`` output: the DeepSpeed JSON a launch of this world size would use
    (``auto`` resolved by the planner), with its memory estimate."""
    from pipeline.training.resolve import resolve_run

    conf, note = planning_conf(cfg)
    resolved = resolve_run(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm", refuse=False)
    return (f"# {note}\n" if note else "") + resolved.describe()


def _data_tokenizer(cfg: TrainConfig) -> tuple[dict, str]:
    """The shards' tokenizer info (from the first dataset's manifest) and its directory."""
    first = cfg.data.datasets[0].path
    manifest = read_manifest(first)
    return manifest["tokenizer"], str(Path(first) / manifest["tokenizer"]["dir"])


def planning_conf(cfg: TrainConfig, vocab_size: int = 32000) -> tuple[Any, str]:
    """The model's transformers config for the planner and ``--print-config``, which may run before
    the data exists (then with ``vocab_size``, said in the returned note); config.json only."""
    from pipeline.errors import UserError
    from pipeline.training.model import hf_config

    note = ""
    try:
        tok = _data_tokenizer(cfg)[0]
    except (UserError, OSError, KeyError, ValueError):
        tok = {"vocab_size": vocab_size}
        note = f"note: no preprocessed data at {cfg.data.datasets[0].path}; assuming a vocabulary of {vocab_size}"
    return hf_config(cfg.model, tok["vocab_size"], cfg.data.seq_len, tok, weights=False), note


def run(cfg: TrainConfig, local_rank: int | None = None) -> int:
    """Run the stage; returns the process exit code (0, or EXIT_REQUEUE after preemption)."""
    from pipeline.data.sampler import BlendedSamples, RankLoader, Validation
    from pipeline.training.model import architecture_fingerprint, build_model, check_tokenizer_match, hf_config
    from pipeline.training.monitor import count_params, flops_per_token
    from pipeline.training.resolve import resolve_run
    from pipeline.training.tiling import check as check_tiling
    from pipeline.training.tiling import logits_tile_tokens
    from pipeline.training.trainer import CausalLMTask, Trainer, evaluate_lm

    # -- everything a user can get wrong, before any heavy work
    source = check_model(cfg.model.path, "model.path") if cfg.model.path else None
    tok_info, tok_dir = _data_tokenizer(cfg)
    conf = hf_config(cfg.model, tok_info["vocab_size"], cfg.data.seq_len, tok_info, source=source)
    if source is not None:
        check_tokenizer_match(source, conf, tok_info, cfg.data.datasets[0].path)
    check_tiling(conf, cfg.model, head="causal_lm")  # model.tiled_mlp / tiled_logits it cannot run exactly
    # world, precision, the DeepSpeed JSON (auto: the planner's choice), refused if it cannot fit
    resolved = resolve_run(cfg, conf, seq_len=cfg.data.seq_len, head="causal_lm", local_rank=local_rank)
    inputs = [("model.path", cfg.model.path)] + [(f"data.datasets.{i}.path", d.path) for i, d in enumerate(cfg.data.datasets)]
    run_ = Run(cfg, resolved, local_rank=local_rank, inputs=inputs)
    datasets = [(d.path, d.weight) for d in cfg.data.datasets]
    samples = BlendedSamples(datasets, "train", cfg.data.seq_len, cfg.train.seed, verify=cfg.data.verify)
    # the validation split too (too short for data.seq_len is a user error), before the process group
    val = (Validation(datasets, cfg.data.seq_len, cfg.train.eval_batches, run_.micro, rank=run_.dp_rank,
                      world=run_.dp_world, verify="none") if cfg.train.eval_batches else None)
    harness = in_loop(cfg.harness, tok_dir, sp=run_.sp)  # its tasks checked and their data read, before the process group

    run_.start()
    rank, world = run_.rank, run_.world
    for line in resolved.notes:
        dist.print0(line)
    sp_note = f" (data-parallel {run_.dp_world} x sequence-parallel {run_.sp})" if run_.sp > 1 else ""
    dist.print0(f"train: {world} rank(s){sp_note}, {summarize(run_.ds)}; data {samples.components}")
    # continue-training from a pipeline checkpoint starts from its verified export (as fine-tuning does)
    mcfg = replace(cfg.model, path=str(init_model_dir(source, run_.out, run_.rank))) if source is not None else cfg.model
    model = build_model(mcfg, conf, run_.ds)  # fp32 master weights; DeepSpeed casts for bf16/fp16
    n_params = count_params(model)
    run_.attach_sequence_parallel(model)  # parallel.sequence_parallel_size > 1: Ulysses attention
    engine = run_.initialize(model)
    start_step = run_.resume({
        "architecture": architecture_fingerprint(conf),
        "model_summary": f"{conf.model_type} {n_params / 1e6:.1f}M params",
        "tokenizer_fingerprint": tok_info["fingerprint"],
    })
    if start_step >= cfg.train.max_steps:
        dist.print0(f"already trained to step {start_step} (train.max_steps={cfg.train.max_steps}); nothing to do")
        dist.shutdown()
        return 0

    # the members of a sequence-parallel group read the same batches (each keeps its slice: run_.shard)
    loader = RankLoader(samples, run_.dp_rank, run_.dp_world, run_.micro, run_.accum, start_step=start_step,
                        consumed_samples=run_.consumed_samples)
    task = CausalLMTask(logits_tile_tokens(conf.vocab_size, cfg.model.tile_tokens) if cfg.model.tiled_logits else 0)
    monitor = run_.monitor(flops_per_token=flops_per_token(conf, cfg.data.seq_len, n_params), seq_len=cfg.data.seq_len,
                           hparams={"n_params": n_params})
    conf_dir = run_.out / ".hf_config"

    def hf_files() -> dict[str, Path]:
        engine.module.config.save_pretrained(conf_dir)
        return {"config.json": conf_dir / "config.json", "tokenizer": Path(tok_dir)}

    save = run_.saver(hf_files=hf_files, meta={"version": VERSION, "seq_len": cfg.data.seq_len, "n_params": n_params})
    trainer = Trainer(
        engine=engine, task=task, batches=iter(run_.shard(loader)), grad_accum=run_.accum, max_steps=cfg.train.max_steps,
        start_step=start_step, monitor=monitor,
        evaluate=(lambda eng: evaluate_lm(eng, task, run_.shard(val))) if val is not None else None,
        eval_every=cfg.train.eval_every, save=save, save_every=cfg.checkpoint.every, grad_divisor=run_.grad_divisor,
        periodic=[(cfg.harness.every or cfg.train.eval_every, harness)] if harness else [],
    )
    try:
        code = trainer.fit()
    finally:
        loader.close()
        monitor.close()
    if rank == 0:
        atomic_write_json(run_.out / "losses.json", {"start_step": start_step, "losses": trainer.history})
    dist.shutdown()
    return code


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/train.py``: the command line (``--config``, overrides, ``--print-config``); returns the exit code."""
    from pipeline.cli import run_stage

    return run_stage(TrainConfig, lambda cfg, ns: run(cfg, ns.local_rank), prog="launch/train.py", argv=argv,
                     description=description, describe=describe)

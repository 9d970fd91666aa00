"""Stage 3, full-parameter fine-tuning: chat SFT or sequence classification.

    deepspeed --num_gpus N launch/finetune.py --config FILE [key=value ...] [--inspect N]

Starts from a Hugging Face model directory or a checkpoint of this pipeline (exported to a
verified Hugging Face directory inside the run first). Same engine, checkpoints, resume,
preemption and monitoring as pre-training (:mod:`pipeline.training.engine`, :mod:`pipeline.training.trainer`);
what differs per task (data, head, model-config changes, loss, validation, checkpoint
metadata, ``--inspect``) is the task's, from the registry :data:`pipeline.training.tasks.TASKS`:

- ``sft`` (:mod:`pipeline.training.tasks.sft`): conversations rendered with the chat
  template; the loss covers assistant tokens (and the end-of-turn token closing each reply)
  only; examples packed into rows with a block-diagonal attention mask.
- ``classification`` (:mod:`pipeline.training.tasks.classification`):
  ``AutoModelForSequenceClassification`` over text (and optional text pair) with labels
  mapped to ids and saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import dist
from pipeline.data.classification import ClassificationDataConfig
from pipeline.data.sft import SFTDataConfig
from pipeline.dist import DistConfig
from pipeline.eval.tasks.harness import HarnessConfig, in_loop
from pipeline.inputs import ModelSource, check_model, check_positions, data_files
from pipeline.io import atomic_write_json
from pipeline.stages.export import init_model_dir
from pipeline.training.checkpoint import CheckpointConfig
from pipeline.training.ds_config import DeepSpeedSection, summarize
from pipeline.training.engine import Run
from pipeline.training.model import offload_problems
from pipeline.training.monitor import MonitorConfig
from pipeline.training.sequence_parallel import ParallelConfig
from pipeline.training.tasks import TASKS
from pipeline.training.tasks.dpo import DPOConfig
from pipeline.training.trainer import OptimConfig

VERSION = 1
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
"""The ``task`` key's values: every registered task, so the config refuses any other name
with the list (``task: got 'x'; must be one of: sft, classification``)."""


@dataclass
class FinetuneModelConfig:
    path: str = "outputs/sample/pretrain"
    """The model to fine-tune: a Hugging Face model directory, or a checkpoint of this
    pipeline (a step directory, a checkpoints directory or a run directory: its latest)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    activation_offload: bool = False
    """With activation_checkpointing on GPUs: keep each layer's checkpointed input in pinned host
    memory instead of on the GPU (copied back for its recompute). No effect on CPU ranks."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa or eager (packing needs one of these: its block-diagonal mask is 4-D;
    under sequence parallelism sdpa, run per document, or flash_attention_2)."""
    tiled_mlp: bool = False
    """Run each MLP over tiles of the sequence (DeepSpeed's TiledMLP, recomputed in the backward):
    the MLP's intermediate activations of one tile at a time. For long sequences (ALST)."""
    tiled_logits: bool = False
    """task=sft: compute the LM head and the loss over tiles of the sequence, recomputed in the
    backward: the seq x vocab logits never exist whole. For long sequences (ALST)."""
    tile_tokens: int = 0
    """Tokens per tile of tiled_mlp / tiled_logits (0: the hidden size for the MLP, DeepSpeed's rule,
    and as many as keep one tile's fp32 logits within 256 MiB for the head)."""

    def check(self) -> list[tuple[str, str]]:
        problems = offload_problems(self)
        if self.tile_tokens < 0:
            problems.append(("tile_tokens", f"must be >= 0 (0: automatic), got {self.tile_tokens}"))
        return problems


@dataclass
class FinetuneConfig:
    output: str = "outputs/sample/finetune"
    """Run directory: config, DeepSpeed JSON, TensorBoard logs, checkpoints."""
    task: TaskName = "sft"
    """sft: chat/instruction tuning of a causal LM; classification: a sequence classifier; dpo:
    preference tuning on chosen/rejected answer pairs (DPO, IPO, RPO)."""
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    """The starting model."""
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Data for task=sft."""
    classification: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    """Data for task=classification."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Preference pairs and the loss for task=dpo (preference tuning after SFT)."""
    train: OptimConfig = field(default_factory=lambda: OptimConfig(max_steps=100, lr=1e-4, warmup_steps=10, weight_decay=0.0,
                                                                    eval_every=50, eval_batches=10))
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
    """Sequence parallelism (long context, task=sft): ranks that share one sequence."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """task=sft: lm-evaluation-harness tasks on the live model during fine-tuning (harness.tasks)."""

    def check(self) -> list[tuple[str, str]]:
        p = []
        if not self.model.path:
            p.append(("model.path", "give the model to fine-tune (a Hugging Face directory or a pipeline checkpoint)"))
        p.extend(TASKS[self.task](self).check())  # only the chosen task's section must be complete
        return p


def finetune_conf(cfg: FinetuneConfig, source: ModelSource | None = None):
    """The transformers config of a fine-tuning start (a Hugging Face directory or a pipeline
    checkpoint; ``source``: ``model.path`` as the stage already checked it)."""
    from transformers import AutoConfig

    source = source or check_model(cfg.model.path, "model.path", weights=False)
    return AutoConfig.from_pretrained(source.config_dir, local_files_only=True)


def finetune_seq_len(cfg: FinetuneConfig) -> int:
    """Tokens per example of the task (what positions are sized by)."""
    return TASKS[cfg.task](cfg).seq_len


def planning_seq_len(cfg: FinetuneConfig) -> int:
    """What the planner sizes one example's activations by (a preference pair: two rows)."""
    return TASKS[cfg.task](cfg).planning_seq_len


def finetune_head(cfg: FinetuneConfig) -> str:
    """The model head the task trains: ``causal_lm`` or ``classification`` (the planner sizes it)."""
    return TASKS[cfg.task].head


def _inputs(cfg: FinetuneConfig) -> list[tuple[str, str]]:
    return [("model.path", cfg.model.path), *TASKS[cfg.task](cfg).data_files()]


def check_inputs(cfg: FinetuneConfig):
    """The starting model and the data files, checked before any heavy work; returns the model's
    :class:`~pipeline.inputs.ModelSource`."""
    source = check_model(cfg.model.path, "model.path")
    task = TASKS[cfg.task](cfg)
    for key, path in task.data_files():
        data_files(path, key, task.data_what)
    key = task.seq_len_key
    check_positions(source.config, task.seq_len, what=f"the sequence length {key}", fix=f"lower {key}")
    return source


def describe(cfg: FinetuneConfig) -> str:
    """Extra ``--print-config`` output: the DeepSpeed JSON a launch of this world size would use
    (``auto`` resolved by the planner), with its memory estimate."""
    from pipeline.training.resolve import resolve_run

    return resolve_run(cfg, finetune_conf(cfg), seq_len=planning_seq_len(cfg), head=finetune_head(cfg),
                       refuse=False, seq_len_key=TASKS[cfg.task](cfg).seq_len_key).describe()


def inspect(cfg: FinetuneConfig, n: int) -> int:
    """``--inspect N``: print N rendered training examples with the trained tokens marked."""
    from transformers import AutoTokenizer

    check_inputs(cfg)
    tok = AutoTokenizer.from_pretrained(check_model(cfg.model.path, "model.path").tokenizer_dir)
    task = TASKS[cfg.task](cfg)
    task.prepare(tok)
    for block in task.inspect(tok, n):
        print(block)
    print(task.describe())
    return 0


def run(cfg: FinetuneConfig, local_rank: int | None = None) -> int:
    """Run the stage; returns the exit code (0, or EXIT_REQUEUE after preemption)."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.data.tokenizer import tokenizer_fingerprint
    from pipeline.training.model import ModelConfig, architecture_fingerprint, build_model
    from pipeline.training.monitor import count_params, flops_per_token
    from pipeline.training.resolve import resolve_run
    from pipeline.training.tiling import check as check_tiling
    from pipeline.training.trainer import Trainer

    source = check_inputs(cfg)
    model_conf = finetune_conf(cfg, source)
    check_tiling(model_conf, cfg.model, head=finetune_head(cfg))  # model.tiled_mlp / tiled_logits it cannot run exactly
    # Every record read and checked (a bad line, a missing label: file:line) with the starting
    # model's tokenizer before the process group: the export of a checkpoint start (init_model
    # below) carries this same tokenizer.
    tok = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    task = TASKS[cfg.task](cfg)
    task.prepare(tok)
    # harness.tasks: checked and their data read now; scored on the live engine with the run's tokenizer
    harness = in_loop(cfg.harness, tok, sp=cfg.parallel.sequence_parallel_size, head=finetune_head(cfg))
    # world, precision, the DeepSpeed JSON (auto: the planner's choice), refused if it cannot fit
    resolved = resolve_run(cfg, model_conf, seq_len=planning_seq_len(cfg), head=finetune_head(cfg),
                           local_rank=local_rank, seq_len_key=TASKS[cfg.task](cfg).seq_len_key)
    run_ = Run(cfg, resolved, local_rank=local_rank, inputs=_inputs(cfg))
    run_.start()
    for line in resolved.notes:
        dist.print0(line)
    init = init_model_dir(source, run_.out, run_.rank)
    dist.print0(f"finetune: {run_.world} rank(s), {summarize(run_.ds)}; {task.describe()}")
    conf = AutoConfig.from_pretrained(init)
    task.configure(conf, tok)
    mcfg = ModelConfig(path=str(init), activation_checkpointing=cfg.model.activation_checkpointing,
                       activation_offload=cfg.model.activation_offload,
                       attn_implementation=cfg.model.attn_implementation, tiled_mlp=cfg.model.tiled_mlp,
                       tiled_logits=cfg.model.tiled_logits, tile_tokens=cfg.model.tile_tokens)
    model = build_model(mcfg, conf, run_.ds, head=task.head)
    n_params = count_params(model)
    # parallel.sequence_parallel_size > 1: Ulysses attention (packed rows: each document on its own)
    run_.attach_sequence_parallel(model, documents=task.packed)
    engine = run_.initialize(model)
    start_step = run_.resume({
        "architecture": architecture_fingerprint(conf) + f"-{cfg.task}",
        "model_summary": f"{conf.model_type} {cfg.task} {n_params / 1e6:.1f}M params",
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
    }, before_load=lambda: task.setup(run_, engine, init))  # the engine still holds the starting weights
    if start_step >= cfg.train.max_steps:
        dist.print0(f"already trained to step {start_step} (train.max_steps={cfg.train.max_steps}); nothing to do")
        dist.shutdown()
        return 0
    loader, val = task.loaders(run_, start_step)
    evaluate = (lambda eng: task.evaluate(eng, val)) if val is not None else None
    monitor = run_.monitor(flops_per_token=flops_per_token(conf, task.seq_len, n_params, lm_head=task.head == "causal_lm"), seq_len=task.seq_len,
                           hparams={"n_params": n_params})
    hf_dir, tok_dir = run_.out / ".hf_config", run_.out / ".tokenizer"

    def hf_files() -> dict[str, Path]:
        model_conf = engine.module.config
        model_conf.save_pretrained(hf_dir)
        tok.save_pretrained(tok_dir)
        return {"config.json": hf_dir / "config.json", "tokenizer": tok_dir}

    save = run_.saver(hf_files=hf_files, meta={"version": VERSION, "seq_len": task.seq_len, "n_params": n_params, **task.meta()})
    trainer = Trainer(engine=engine, task=task.loss(), batches=iter(loader), grad_accum=run_.accum, max_steps=cfg.train.max_steps,
                      start_step=start_step, monitor=monitor, evaluate=evaluate, eval_every=cfg.train.eval_every,
                      save=save, save_every=cfg.checkpoint.every, grad_divisor=run_.grad_divisor,
                      periodic=[(cfg.harness.every or cfg.train.eval_every, harness)] if harness else [])
    try:
        code = trainer.fit()
    finally:
        monitor.close()
    if run_.rank == 0:
        atomic_write_json(run_.out / "losses.json", {"start_step": start_step, "losses": trainer.history})
    dist.shutdown()
    return code



def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/finetune.py``: the command line (``--config``, overrides, ``--print-config``, ``--inspect N``)."""
    from pipeline.cli import run_stage

    def extra(parser) -> None:
        parser.add_argument("--inspect", type=int, metavar="N", default=0,
                            help="print N rendered training examples with the trained tokens marked, then exit")

    return run_stage(FinetuneConfig, lambda cfg, ns: inspect(cfg, ns.inspect) if ns.inspect else run(cfg, ns.local_rank),
                     prog="launch/finetune.py", argv=argv, description=description, extra=extra, describe=describe)

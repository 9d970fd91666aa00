"""Stage 3, full-parameter fine-tuning: chat SFT or sequence classification.

    deepspeed --num_gpus N launch/finetune.py --config FILE [key=value ...] [--inspect N]

Starts from a Hugging Face model directory or a checkpoint of this pipeline (exported to a
verified Hugging Face directory inside the run first). Same engine, checkpoints, resume,
preemption and monitoring as pre-training (:mod:`pipeline.training.engine`, :mod:`pipeline.training.trainer`);
only the data and the loss differ:

- ``sft``: conversations rendered with the chat template; the loss covers assistant tokens
  (and the end-of-turn token closing each reply) only; examples packed into rows with a
  block-diagonal attention mask (:mod:`pipeline.data.sft`).
- ``classification``: ``AutoModelForSequenceClassification`` over text (and optional text
  pair) with labels mapped to ids and saved with the model (:mod:`pipeline.data.classification`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import dist
from pipeline.data.classification import ClassificationDataConfig
from pipeline.data.sft import SFTDataConfig
from pipeline.dist import DistConfig
from pipeline.inputs import check_data_file, check_model, check_positions
from pipeline.io import atomic_write_json
from pipeline.stages.export import init_model_dir
from pipeline.training.checkpoint import CheckpointConfig
from pipeline.training.ds_config import DeepSpeedSection, summarize
from pipeline.training.engine import Run, describe_ds
from pipeline.training.monitor import MonitorConfig
from pipeline.training.trainer import OptimConfig

VERSION = 1


@dataclass
class FinetuneModelConfig:
    path: str = "outputs/sample/pretrain"
    """The model to fine-tune: a Hugging Face model directory, or a checkpoint of this
    pipeline (a step directory, a checkpoints directory or a run directory: its latest)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa or eager (packing needs one of these: its block-diagonal mask is 4-D)."""


@dataclass
class FinetuneConfig:
    output: str = "outputs/sample/finetune"
    """Run directory: config, DeepSpeed JSON, TensorBoard logs, checkpoints."""
    task: Literal["sft", "classification"] = "sft"
    """sft: chat/instruction tuning of a causal LM; classification: a sequence classifier."""
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    """The starting model."""
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Data for task=sft."""
    classification: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    """Data for task=classification."""
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

    def check(self) -> list[tuple[str, str]]:
        p = []
        if not self.model.path:
            p.append(("model.path", "give the model to fine-tune (a Hugging Face directory or a pipeline checkpoint)"))
        if self.task == "sft" and not self.sft.train.strip():
            p.append(("sft.train", "is empty; set it to a JSONL file of chat examples (messages, or prompt/response)"))
        if self.task == "classification" and not self.classification.train.strip():
            p.append(("classification.train", "is empty; set it to a JSONL or CSV file with text and label fields"))
        if self.task == "sft" and self.sft.packing and self.model.attn_implementation not in ("sdpa", "eager"):
            p.append(("model.attn_implementation", "packing needs sdpa or eager (its block-diagonal mask is 4-D); or set sft.packing=false"))
        return p


class ClassificationTask:
    """Cross-entropy over labels. With class weights the weighted sum is still divided by
    the number of examples (not by the sum of their weights), like every loss here."""

    def __init__(self, weights: list[float] | None):
        self.weights = weights

    def targets(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())  # real tokens, not padding

    @staticmethod
    def inputs(batch: dict, device) -> dict:
        """Model inputs (with BERT-style ``token_type_ids`` when present) on ``device``."""
        return {k: v.to(device) for k, v in batch.items() if k != "labels"}

    def loss(self, model, batch: dict):
        import torch
        import torch.nn.functional as F

        device = next(iter(model.parameters())).device
        logits = model(**self.inputs(batch, device)).logits
        weight = torch.tensor(self.weights, dtype=torch.float32, device=device) if self.weights else None
        labels = batch["labels"].to(device)
        return F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum"), labels.new_tensor(labels.numel())


def evaluate_classification(engine, task: ClassificationTask, batches) -> dict[str, float]:
    """Validation loss and accuracy over ``(batch, real)`` pairs (every rank, equal passes)."""
    import torch

    engine.eval()
    loss_sum = correct = count = 0.0
    device = next(iter(engine.parameters())).device
    with torch.no_grad():
        for batch, real in batches:
            logits = engine(**task.inputs(batch, device)).logits
            if real:
                labels = batch["labels"].to(device)
                loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                correct += float((logits.argmax(-1) == labels).sum())
                count += labels.numel()
    loss_sum, correct, count = (dist.all_reduce_sum_float(x) for x in (loss_sum, correct, count))
    engine.train()
    return {"loss": loss_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0)}


def _hidden_size(path: str) -> int | None:
    """The starting model's hidden size (ZeRO-3 bucket sizes derive from it), read from its config.json."""
    d = check_model(path, "model.path", weights=False).config
    return d.get("hidden_size") or d.get("n_embd") or d.get("d_model")


def finetune_conf(path: str):
    """The transformers config of a fine-tuning start (a Hugging Face directory or a pipeline checkpoint)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(check_model(path, "model.path", weights=False).config_dir, local_files_only=True)


def finetune_seq_len(cfg: FinetuneConfig) -> int:
    """Tokens per example of the task (what activations and positions are sized by)."""
    return cfg.sft.seq_len if cfg.task == "sft" else cfg.classification.max_length


def finetune_head(cfg: FinetuneConfig) -> str:
    return "classification" if cfg.task == "classification" else "causal_lm"


def _data_files(cfg: FinetuneConfig) -> list[tuple[str, str]]:
    """``(key, path)`` of the task's data files that are set."""
    section = "sft" if cfg.task == "sft" else "classification"
    return [(f"{section}.{split}", getattr(getattr(cfg, section), split)) for split in ("train", "val")
            if getattr(getattr(cfg, section), split).strip()]


def _inputs(cfg: FinetuneConfig) -> list[tuple[str, str]]:
    return [("model.path", cfg.model.path), *_data_files(cfg)]


def check_inputs(cfg: FinetuneConfig):
    """The starting model and the data files, checked before any heavy work; returns the model's
    :class:`~pipeline.inputs.ModelSource`."""
    source = check_model(cfg.model.path, "model.path")
    what = ("a JSONL file of chat examples (messages, or prompt/response)" if cfg.task == "sft"
            else "a JSONL or CSV file with text and label fields")
    for key, path in _data_files(cfg):
        check_data_file(path, key, what)
    key = "sft.seq_len" if cfg.task == "sft" else "classification.max_length"
    check_positions(source.config, finetune_seq_len(cfg), what=f"the sequence length {key}", fix=f"lower {key}")
    return source


def describe(cfg: FinetuneConfig) -> str:
    if cfg.deepspeed.config.strip() == "auto":
        from pipeline.training.plan import AUTO_NOTE
        return AUTO_NOTE
    return describe_ds(cfg, _hidden_size(cfg.model.path))


class _Data:
    """The task's loaders, validation batches, loss and what gets saved with the model."""

    def __init__(self, cfg: FinetuneConfig, tokenizer, run: Run | None):
        self.cfg, self.tok = cfg, tokenizer
        self.meta: dict[str, Any] = {"task": cfg.task}
        self.label_names: list[str] = []
        if cfg.task == "sft":
            from pipeline.data.sft import prepare

            self.sft = prepare(cfg.sft, tokenizer)
            self.seq_len = cfg.sft.seq_len
            self.meta.update(eos_token_ids=self.sft.end_of_turn_ids, data=self.sft.stats)
        else:
            from pipeline.data import classification as C

            stats: dict[str, int] = {}
            c = cfg.classification
            train = C.read_examples(c.train, c, "train", stats)
            val = C.read_examples(c.val, c, "val", stats) if c.val else None
            if val is None:
                train, val = C.split_val(train, c.val_fraction)
            self.label_names = C.label_names(c, train)
            self.train_items = C.encode(tokenizer, train, self.label_names, c.max_length, c.train)
            self.val_items = C.encode(tokenizer, val, self.label_names, c.max_length, c.val or c.train)
            self.weights = C.class_weights(self.train_items, len(self.label_names), c.class_weights)
            self.seq_len = c.max_length
            self.meta.update(labels=self.label_names, data={"train": len(self.train_items), "val": len(self.val_items), **stats})

    def describe(self) -> str:
        if self.cfg.task == "sft":
            s = self.sft.stats
            return f"sft: {s['train']['examples']} train / {s['val']['examples']} val examples in {s['train']['rows']} rows"
        return f"classification: {len(self.train_items)} train / {len(self.val_items)} val examples, labels {self.label_names}"

    def loaders(self, run: Run, start_step: int):
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        t = self.cfg.train
        if self.cfg.task == "sft":
            import torch

            from pipeline.data.sft import SFTLoader, ValBatches
            from pipeline.training.trainer import CausalLMTask

            # the 4-D packing mask in the model's compute dtype (bf16 on GPUs: half the memory of fp32)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision, torch.float32)
            kw = {"seq_len": self.seq_len, "pad_id": pad, "packed": self.cfg.sft.packing, "dtype": dtype}
            train = SFTLoader(self.sft.train_rows, run.rank, run.world, run.micro, run.accum, t.seed, start_step,
                              consumed_samples=run.consumed_samples, **kw)
            val = ValBatches(self.sft.val_rows, run.rank, run.world, run.micro, num_batches=t.eval_batches, **kw) if self.sft.val_rows else None
            return train, val, CausalLMTask()
        from pipeline.data.classification import collate
        from pipeline.data.sampler import ExampleLoader, FixedBatches

        fn = lambda items: collate(items, pad)  # noqa: E731
        train = ExampleLoader(self.train_items, run.rank, run.world, run.micro, run.accum, t.seed, start_step, collate=fn, name="cls",
                              consumed_samples=run.consumed_samples)
        val = FixedBatches(self.val_items, run.rank, run.world, run.micro, collate=fn, num_batches=t.eval_batches) if self.val_items else None
        return train, val, ClassificationTask(self.weights)


def inspect(cfg: FinetuneConfig, n: int) -> int:
    """``--inspect N``: print N rendered training examples with the trained tokens marked."""
    from transformers import AutoTokenizer

    check_inputs(cfg)
    tok = AutoTokenizer.from_pretrained(check_model(cfg.model.path, "model.path").tokenizer_dir)
    data = _Data(cfg, tok, None)
    if cfg.task == "sft":
        from pipeline.data.sft import inspect as render

        print(render(tok, data.sft.train, n))
    else:
        for it in data.train_items[:n]:
            print(f"[{data.label_names[it['label']]}] {tok.decode(it['input_ids'])}")
    print(data.describe())
    return 0


def run(cfg: FinetuneConfig, local_rank: int | None = None) -> int:
    """Run the stage; returns the exit code (0, or EXIT_REQUEUE after preemption)."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.data.tokenizer import tokenizer_fingerprint
    from pipeline.training.model import ModelConfig, architecture_fingerprint, build_model
    from pipeline.training.monitor import count_params, flops_per_token
    from pipeline.training.trainer import Trainer, evaluate_lm

    source = check_inputs(cfg)
    from pipeline.training.plan import preflight
    preflight(cfg, finetune_conf(cfg.model.path), seq_len=finetune_seq_len(cfg), head=finetune_head(cfg),  # auto; refuse what cannot fit
              attn=cfg.model.attn_implementation, checkpointing=cfg.model.activation_checkpointing, local_rank=local_rank)
    run_ = Run(cfg, local_rank=local_rank, hidden_size=_hidden_size(cfg.model.path), inputs=_inputs(cfg))
    run_.start()
    init = init_model_dir(source, run_.out, run_.rank)
    tok = AutoTokenizer.from_pretrained(init)
    data = _Data(cfg, tok, run_)
    dist.print0(f"finetune: {run_.world} rank(s), {summarize(run_.ds)}; {data.describe()}")
    conf = AutoConfig.from_pretrained(init)
    head = "causal_lm"
    if cfg.task == "classification":
        head = "classification"
        conf.num_labels = len(data.label_names)
        conf.id2label = dict(enumerate(data.label_names))
        conf.label2id = {n: i for i, n in enumerate(data.label_names)}
        if conf.pad_token_id is None:
            conf.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if cfg.task == "sft":
        tok.chat_template = data.sft.template  # saved with every checkpoint and the export
    mcfg = ModelConfig(path=str(init), activation_checkpointing=cfg.model.activation_checkpointing,
                       attn_implementation=cfg.model.attn_implementation)
    model = build_model(mcfg, conf, run_.ds, head=head)
    n_params = count_params(model)
    engine = run_.initialize(model)
    start_step = run_.resume({
        "architecture": architecture_fingerprint(conf) + f"-{cfg.task}",
        "model_summary": f"{conf.model_type} {cfg.task} {n_params / 1e6:.1f}M params",
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
    })
    if start_step >= cfg.train.max_steps:
        dist.print0(f"already trained to step {start_step} (train.max_steps={cfg.train.max_steps}); nothing to do")
        dist.shutdown()
        return 0
    loader, val, task = data.loaders(run_, start_step)
    if cfg.task == "sft":
        evaluate = (lambda eng: evaluate_lm(eng, task, val)) if val is not None else None
    else:
        evaluate = (lambda eng: evaluate_classification(eng, task, val)) if val is not None else None
    monitor = run_.monitor(flops_per_token=flops_per_token(conf, data.seq_len, n_params, lm_head=cfg.task == "sft"), seq_len=data.seq_len,
                           hparams={"n_params": n_params})
    hf_dir, tok_dir = run_.out / ".hf_config", run_.out / ".tokenizer"

    def hf_files() -> dict[str, Path]:
        model_conf = engine.module.config
        model_conf.save_pretrained(hf_dir)
        tok.save_pretrained(tok_dir)
        return {"config.json": hf_dir / "config.json", "tokenizer": tok_dir}

    save = run_.saver(hf_files=hf_files, meta={"version": VERSION, "seq_len": data.seq_len, "n_params": n_params, **data.meta})
    trainer = Trainer(engine=engine, task=task, batches=iter(loader), grad_accum=run_.accum, max_steps=cfg.train.max_steps,
                      start_step=start_step, monitor=monitor, evaluate=evaluate, eval_every=cfg.train.eval_every,
                      save=save, save_every=cfg.checkpoint.every)
    try:
        code = trainer.fit()
    finally:
        monitor.close()
    if run_.rank == 0:
        atomic_write_json(run_.out / "losses.json", {"start_step": start_step, "losses": trainer.history})
    dist.shutdown()
    return code


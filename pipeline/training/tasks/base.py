"""What a fine-tuning task is: the parts the fine-tune stage composes, one class per task.

The stage (:mod:`pipeline.stages.finetune`) owns the run: inputs checked, the DeepSpeed
engine, resume, monitoring, checkpoints. A task owns everything that differs between tasks:

========================  ==============================================================
config                    ``name`` (the ``task`` key), ``section`` (its data section of
                          the fine-tune config) and ``config_class`` (that section's
                          dataclass), ``check`` (problems only this task has)
inputs                    ``data_files``, ``data_what`` (for messages), ``seq_len`` and
                          ``seq_len_key`` (the planner and the position check read them)
model                     ``head`` (``causal_lm`` or ``classification``), ``configure``
                          (labels, pad id, chat template into the model config and tokenizer)
data                      ``prepare`` (read, encode), ``describe``, ``loaders``, ``inspect``
loss and validation       ``loss`` (a :class:`pipeline.training.trainer.Task`), ``evaluate``
checkpoints               ``meta`` (saved in every ``meta.json``)
========================  ==============================================================

A task object is cheap to make from the config (nothing is read): the config check, the
planner and the input checks use it before any heavy work; :meth:`FinetuneTask.prepare`
then reads and encodes the data once the tokenizer is there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pipeline.training.trainer import Task

SPLITS = ("train", "val")
"""The data files of a task's section, in the order they are checked and recorded."""


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (most causal LMs
    have no pad token; padded positions are masked out of attention and loss either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class FinetuneTask(ABC):
    """One fine-tuning task; subclasses set the class attributes and implement every abstract
    method (a class missing one cannot be instantiated).

    Args:
        cfg: the fine-tune stage config (:class:`pipeline.stages.finetune.FinetuneConfig`);
            the task reads ``cfg.<section>`` for its data, ``cfg.train`` for batch counts and
            the seed, and ``cfg.model`` where its data constrains the model.
    """

    name: ClassVar[str]
    """The value of the config's ``task`` key; also recorded in ``meta.json`` and the resume
    fingerprint."""
    section: ClassVar[str]
    """The fine-tune config's key of this task's data section (``sft``, ``classification``)."""
    config_class: ClassVar[type]
    """The dataclass of that section (a field of the fine-tune config of this type)."""
    head: ClassVar[str]
    """The model head built for it: ``causal_lm`` or ``classification``
    (:func:`pipeline.training.model.build_model`, the planner, the FLOP count)."""
    data_what: ClassVar[str]
    """What one of its data files holds, completing "set it to ..." in messages."""
    seq_len_field: ClassVar[str]
    """The section's field giving the tokens per example (activations and positions are sized by it)."""
    rows_per_example: ClassVar[int] = 1
    """Rows of the forward pass per example (a preference pair is two): the planner sizes
    activations by ``seq_len`` × this."""
    sequence_parallel: ClassVar[bool] = False
    """Whether the task trains under ``parallel.sequence_parallel_size`` > 1 (a loss that is a sum
    over tokens: each rank's slice contributes its part; a head that pools the sequence cannot)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.data_cfg = getattr(cfg, self.section)

    # ------------------------------------------------------------------ from the config alone
    @property
    def packed(self) -> bool:
        """Whether a row holds several examples whose attention must be kept apart."""
        return False

    @property
    def seq_len_key(self) -> str:
        """The dotted config key of the sequence length (named in messages)."""
        return f"{self.section}.{self.seq_len_field}"

    @property
    def seq_len(self) -> int:
        """Tokens per example (or packed row)."""
        return int(getattr(self.data_cfg, self.seq_len_field))

    @property
    def planning_seq_len(self) -> int:
        """What the planner sizes one example's activations by: ``seq_len`` × ``rows_per_example``
        (two rows of T tokens hold what one of 2T does, except attention scores, which sdpa
        does not keep)."""
        return self.seq_len * self.rows_per_example

    def data_files(self) -> list[tuple[str, str]]:
        """``(key, path)`` of the task's data files that are set (``section.train``, ``section.val``)."""
        return [(f"{self.section}.{split}", getattr(self.data_cfg, split)) for split in SPLITS
                if getattr(self.data_cfg, split).strip()]

    def check(self) -> list[tuple[str, str]]:
        """Problems of the fine-tune config that only this task has, as ``(dotted key, problem
        and fix)``; subclasses add theirs to these. The training data must be given."""
        p = []
        if not self.data_cfg.train.strip():
            p.append((f"{self.section}.train", f"is empty; set it to {self.data_what}"))
        sp = getattr(getattr(self.cfg, "parallel", None), "sequence_parallel_size", 1)
        if sp > 1 and not self.sequence_parallel:
            p.append(("parallel.sequence_parallel_size", f"task={self.name} cannot train with sequence parallelism (its "
                      "head reads the whole sequence); set it to 1 (sequence parallelism is for task=sft)"))
        return p

    # ------------------------------------------------------------------ with the tokenizer
    @abstractmethod
    def prepare(self, tokenizer: Any) -> None:
        """Read, split and encode the train and validation data (user errors name file and line)."""

    @abstractmethod
    def describe(self) -> str:
        """One line on the prepared data for the start banner (examples, rows, labels)."""

    @abstractmethod
    def inspect(self, tokenizer: Any, n: int) -> list[str]:
        """``--inspect N``: the text blocks to print for the first ``n`` prepared training examples."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """What is saved in every checkpoint's ``meta.json`` about the task (``task`` first)."""

    @abstractmethod
    def configure(self, conf: Any, tokenizer: Any) -> None:
        """Change the transformers config and the tokenizer in place for this task (both are
        saved with every checkpoint and the export)."""

    # ------------------------------------------------------------------ with the run
    def setup(self, run: Any, engine: Any, init: Any) -> None:
        """Work on the starting model before a checkpoint is loaded into ``engine`` (which holds
        the weights of ``init``, the starting model's directory), e.g. DPO's reference
        log-probs. Nothing by default."""

    @abstractmethod
    def loaders(self, run: Any, start_step: int) -> tuple[Any, Any | None]:
        """``(train, val)``: this rank's endless, resumable training micro-batches from
        ``start_step`` (:class:`pipeline.training.engine.Run` gives rank, world, batch sizes,
        precision, consumed samples) and the fixed validation batches, or None without any."""

    @abstractmethod
    def loss(self) -> Task:
        """The loss the trainer minimises: ``(sum of losses, number of targets)`` per micro-batch."""

    @abstractmethod
    def evaluate(self, engine: Any, batches: Any) -> dict[str, float]:
        """Validation metrics (``loss`` first) over ``batches`` from :meth:`loaders`, run by every rank."""

"""The models an evaluation runs: resolved before any weight is read, then loaded plain or ZeRO-3.

:func:`resolve_model` checks a path (a Hugging Face directory or a pipeline checkpoint) and reads
its name, step and config without weights, so every user error is found before the heavy work.
:func:`load` gives a :class:`Loaded` model ready for forward passes: in one process through
:func:`pipeline.training.hf_model.load_model`, or partitioned with ZeRO-3 over the ranks of a
deepspeed/torchrun/srun launch (a model too big for one device).
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import dist, precision
from pipeline.errors import UserError
from pipeline.inputs import check_model


@dataclass
class ModelRef:
    """A model to evaluate, resolved before any weight is read."""

    role: str  # "model" or "compare_to": the config key it came from
    path: str
    name: str
    checkpoint: str | None  # the resolved step directory of a pipeline checkpoint
    step: int  # the checkpoint's step, else 0
    config: Any  # transformers config (labels, positions), or None when unreadable


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def resolve_model(path: str, role: str, name: str) -> ModelRef:
    """Check that ``path`` exists and find its name, step and config (no weights loaded).

    Args:
        path: a Hugging Face model directory or a pipeline checkpoint (step, checkpoints or run
            directory).
        role: the config key ``path`` came from, for messages.
        name: display name ("": ``<run>-step<N>`` for a checkpoint, else the directory name).

    Raises:
        UserError: ``path`` is neither kind of model.
    """
    from transformers import AutoConfig

    source = check_model(path, role)
    checkpoint, step, config_dir = None, 0, source.config_dir
    if source.kind == "checkpoint":
        step_dir = source.step_dir
        checkpoint = str(step_dir)
        try:
            step = int(json.loads((step_dir / "meta.json").read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            m = re.search(r"step-(\d+)", step_dir.name)
            step = int(m.group(1)) if m else 0
        run = step_dir.parent.parent.name if step_dir.parent.name == "checkpoints" else step_dir.parent.name
        default = f"{run}-step{step}"
    else:
        p = source.path
        default = p.resolve().name
        try:  # an export of a checkpoint (launch/export.py) records the step it came from
            step = int(json.loads((p / "export_meta.json").read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = 0
    try:
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except Exception:  # noqa: BLE001 -- read again (with the loader's error) when the weights load
        config = None
    return ModelRef(role, path, _safe_name(name or default), checkpoint, step, config)


def check_kind(ref: ModelRef, classes: list[str], task: str, head: str) -> None:
    """Refuse a causal LM where a task needs a sequence classifier, and the reverse.

    Args:
        ref: the model, for the message.
        classes: its architecture class names (config ``architectures``, or the loaded class).
        task: the task's name, for the message.
        head: what the task needs: ``"classification"`` or ``"causal_lm"``.

    Raises:
        UserError: the model has the other head.
    """
    classifier = any(c.endswith("ForSequenceClassification") for c in classes)
    if classes and classifier != (head == "classification"):
        need = ("a *ForSequenceClassification model with id2label in its config.json" if head == "classification"
                else "a causal language model (*ForCausalLM)")
        raise UserError(f"{ref.role} '{ref.path}' is a {', '.join(classes)}; task={task} needs {need}")


class Loaded:
    """A model ready for forward passes: plain (one process) or a ZeRO-3 engine's module."""

    def __init__(self, ref: ModelRef, model: Any, tokenizer: Any, engine: Any = None):
        self.ref, self.model, self.tokenizer, self.engine = ref, model, tokenizer, engine
        self.device = next(iter(model.parameters())).device

    def close(self) -> None:
        """Free the weights (and the engine's partitions) before the next model loads."""
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.model = self.engine = None
        gc.collect()


def load(ref: ModelRef, task: str, head: str, precision_name: str, zero3: bool, work: Path) -> Loaded:
    """Load ``ref`` for a task, plain or partitioned with ZeRO-3.

    Args:
        ref: the resolved model.
        task: the task's name, for messages.
        head: the head the task needs (``"classification"`` or ``"causal_lm"``).
        precision_name: weights dtype, ``fp32``/``bf16``/``fp16``.
        zero3: partition over the ranks of the launch (a process group must be up).
        work: the output's working directory: a checkpoint is consolidated there for ZeRO-3.

    Raises:
        UserError: the model cannot be loaded or has the other head.
    """
    import torch

    from pipeline.training.hf_model import load_model

    dtype = precision.torch_dtype(precision_name)
    if not zero3:
        model, tok = load_model(ref.path, dtype=dtype)  # picks the head class from config.json
        model.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
        loaded = Loaded(ref, model, tok)
    else:
        loaded = _load_zero3(ref, head, precision_name, work, dtype)
    try:
        check_kind(ref, [type(loaded.model).__name__], task, head)
    except UserError:
        loaded.close()
        raise
    loaded.model.eval()
    if head != "classification":
        loaded.model.config.use_cache = True  # training saves use_cache=false; generation wants the cache
    return loaded


def zero3_ds_config(precision_name: str) -> dict:
    """DeepSpeed config of the inference engine: ZeRO-3 partitioned parameters, no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; unused without training
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        **precision.ds_flags(precision_name),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _load_hf(path: str, head: str, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _load_zero3(ref: ModelRef, head: str, precision_name: str, work: Path, dtype: Any) -> Loaded:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.training.hf_model import load_model

    source = ref.path
    if ref.checkpoint is not None:
        # Consolidate once on rank 0 into a Hugging Face directory every rank then reads
        # partitioned (rank 0 holds the whole model in CPU memory while doing so).
        source = str(work / f"_consolidated-{ref.role}")
        if dist.is_main():
            model, tok = load_model(ref.path, dtype=dtype)
            model.save_pretrained(source)
            tok.save_pretrained(source)
            del model
            gc.collect()
        dist.barrier()
    ds = zero3_ds_config(precision_name)
    keep = HfDeepSpeedConfig(ds)  # makes from_pretrained load each weight into its partitions
    model, tok = _load_hf(source, head, dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    del keep
    if source != ref.path:
        dist.barrier()  # every rank has read its partitions
        if dist.is_main():
            shutil.rmtree(source, ignore_errors=True)
    return Loaded(ref, engine.module, tok, engine)

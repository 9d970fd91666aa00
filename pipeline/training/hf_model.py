"""Load a model for inference: a Hugging Face directory or a pipeline checkpoint, as a plain model.

:func:`load_model` is what the evaluate stage (and tests) read models with; the export stage
builds its verified Hugging Face directory from the same parts (:func:`consolidate`,
:func:`checkpoint_config`, :func:`model_from_state_dict`, :func:`hf_tokenizer`). It lives
below the stages so evaluation code (``pipeline.eval``) can load models without importing a
stage; ``pipeline.stages.export`` re-exports what it used to define.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline import precision
from pipeline.checkpoint_paths import is_pipeline_checkpoint, read_meta, resolve_checkpoint, zero_stage
from pipeline.errors import UserError
from pipeline.training.consolidate import consolidate_step


@contextlib.contextmanager
def plain_quiet() -> Iterator[None]:
    """Plain (unpartitioned) models even while a ZeRO-3 ``HfDeepSpeedConfig`` is alive in the
    process (a fine-tune rank exporting its starting checkpoint), and transformers' progress bars
    only where ours draw (:func:`pipeline.progress.progress_bar`: a terminal)."""
    from transformers.integrations import deepspeed as hf_ds
    from transformers.utils import logging as hf_logging

    from pipeline.progress import progress_bar

    saved, bars = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None), hf_logging.is_progress_bar_enabled()
    with progress_bar(total=0, delay=1e9, leave=False) as bar:  # never drawn: only asks whether bars are on
        if bars and bar.disable:
            hf_logging.disable_progress_bar()
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
        if bars:
            hf_logging.enable_progress_bar()


def consolidate(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 state dict, keyed by the training module's parameter names.

    Any ZeRO stage, any number of ranks (:func:`pipeline.training.consolidate.consolidate_step`), a tensor
    at a time; tied parameters stay one shared tensor. Peak: about one fp32 model copy.

    Args:
        step_dir: a step, checkpoints or run directory (see :func:`resolve_checkpoint`).

    Raises:
        UserError: not a checkpoint, or shards missing/damaged.
    """
    step = resolve_checkpoint(step_dir)
    return consolidate_step(step, zero_stage(step, read_meta(step)))


# ---------------------------------------------------------------------------- models


def model_head(conf: Any, where: str) -> str:
    """``"classification"`` or ``"causal_lm"``: the head ``conf.architectures`` names.

    Raises:
        UserError: an architecture of neither kind (``where`` names the model).
    """
    archs = list(getattr(conf, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    if not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    raise UserError(f"{where}: architectures {archs} is neither a causal LM (*ForCausalLM) nor a sequence classifier "
                    "(*ForSequenceClassification), the two kinds of model this pipeline trains and exports")


def auto_class(head: str):
    """The transformers auto class that builds a model with ``head``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM


def read_config(hf_dir: Path):
    """``hf_dir``'s transformers config; a damaged one is a UserError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {hf_dir / 'config.json'} ({type(e).__name__}: {e}); the checkpoint is damaged") from None


def checkpoint_config(step: Path, meta: dict):
    """``hf/config.json`` of a checkpoint, with the label names fine-tuning records in ``meta.json``."""
    conf = read_config(step / "hf")
    labels = meta.get("labels")
    if model_head(conf, str(step)) == "classification" and isinstance(labels, list) and len(labels) == conf.num_labels:
        conf.id2label = {i: str(n) for i, n in enumerate(labels)}
        conf.label2id = {str(n): i for i, n in enumerate(labels)}
    return conf


def hf_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``; missing files are a UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in '{directory}' ({e}); the model needs its tokenizer files") from None


def model_from_state_dict(conf: Any, state: dict[str, torch.Tensor], where: str):
    """A plain eval-mode fp32 model built from ``conf`` on the tensors of ``state`` (not copied).

    transformers' own loader handles meta-device construction, tied weights, non-persistent
    buffers (rotary tables) and key conversions; every missing, unexpected or misshapen key is an
    error (a checkpoint whose ``hf/config.json`` does not describe its weights)."""
    auto = auto_class(model_head(conf, where))
    try:
        cls = auto._model_mapping[type(conf)]
    except KeyError:
        raise UserError(f"{where}: transformers has no {auto.__name__} for model type '{conf.model_type}'") from None
    with plain_quiet():
        model, info = cls.from_pretrained(None, config=conf, state_dict=state, dtype=torch.float32, output_loading_info=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    problems = [f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for what, keys in (
        ("missing", sorted(set(info.get("missing_keys") or ()) - tied)),
        ("unexpected", sorted(info.get("unexpected_keys") or ())),
        ("wrong shape", sorted(str(k) for k in info.get("mismatched_keys") or ()))) if keys]
    if problems:
        raise UserError(f"{where}: the consolidated weights do not fit the model of hf/config.json ({'; '.join(problems)}); "
                        "the checkpoint's hf/ does not belong to its weights")
    return model.eval()


def load_model(path: str | os.PathLike, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """Load a model for inference from a Hugging Face directory or a pipeline checkpoint.

    Args:
        path: a Hugging Face model directory (config.json + weights), or a step/checkpoints/run
            directory of this pipeline (consolidated in memory; nothing is written).
        dtype: weights dtype: a torch dtype, or fp32/bf16/fp16 (any spelling :mod:`pipeline.precision` knows).

    Returns:
        ``(model, tokenizer)``: an eval-mode ``AutoModelForCausalLM`` or
        ``AutoModelForSequenceClassification`` (by ``architectures``) on CPU with ``use_cache``
        on, and its ``AutoTokenizer`` (the directory's, or the checkpoint's ``hf/tokenizer``).

    Raises:
        UserError: neither kind of directory, or a damaged one.
    """
    p = Path(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else precision.torch_dtype(precision.parse(dtype, "dtype"))
    if is_pipeline_checkpoint(p):
        step = resolve_checkpoint(p)
        model = model_from_state_dict(checkpoint_config(step, read_meta(step)), consolidate(step), str(step)).to(torch_dtype)
        tok_dir = step / "hf" / "tokenizer"
    elif (p / "config.json").is_file():
        auto = auto_class(model_head(read_config(p), str(p)))
        try:
            with plain_quiet():
                model = auto.from_pretrained(str(p), dtype=torch_dtype, local_files_only=True)
        except OSError as e:
            raise UserError(f"cannot load the Hugging Face model in '{p}' ({e}); it needs config.json and its weights") from None
        tok_dir = p
    else:
        try:
            resolve_checkpoint(p)
        except UserError as e:  # the precise reason it is not a usable checkpoint
            raise UserError(f"'{p}' is not a Hugging Face model directory (no config.json) nor a usable checkpoint: "
                            f"{e}") from None
    model.eval()
    model.config.use_cache = True  # training saves use_cache=false; inference wants the KV cache
    return model, hf_tokenizer(tok_dir)

"""Stage 4, export: a ZeRO checkpoint of this pipeline -> a verified Hugging Face model directory.

    python launch/export.py --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR [--dtype ...] [--overwrite]

Flow: resolve the step directory (complete for its ZeRO stage) -> consolidate the ZeRO shards (any
stage, any number of ranks) into one fp32 state dict, a tensor at a time (:mod:`pipeline.training.consolidate`:
DeepSpeed's ``zero_to_fp32`` in lazy mode for ZeRO-1/2/3, the mapped model states for ZeRO-0) -> a
model built from ``hf/config.json`` on those tensors -> reference logits on a fixed batch -> cast
and write safetensors, config, generation config, tokenizer and chat template into
``<output>.tmp-<pid>`` -> free the model, reload the written directory with transformers, compare
logits -> ``export_meta.json`` -> publish atomically. Nothing is published when verification fails.
Peak memory: about one fp32 copy of the model, any ZeRO stage (docs/export.md).

Loading a model for inference (:func:`load_model`, :func:`consolidate` and the parts the export
builds on) lives in :mod:`pipeline.training.hf_model`, below the stages, and is re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import faults, precision
from pipeline.checkpoint_paths import is_pipeline_checkpoint, read_meta, resolve_checkpoint  # noqa: F401 -- re-exported
from pipeline.errors import UserError
from pipeline.inputs import ModelSource
from pipeline.io import atomic_write_json, publish_dir, sha256_file
from pipeline.training.consolidate import PageOut, free_memory
from pipeline.training.hf_model import auto_class as _auto_class
from pipeline.training.hf_model import checkpoint_config as _checkpoint_config
from pipeline.training.hf_model import consolidate, load_model  # noqa: F401 -- re-exported for callers of this path
from pipeline.training.hf_model import hf_tokenizer as _tokenizer
from pipeline.training.hf_model import model_from_state_dict as _model_from_state_dict
from pipeline.training.hf_model import model_head as _head
from pipeline.training.hf_model import plain_quiet as _plain_quiet

DEFAULT_TOLERANCE_FP32 = 1e-4
"""Default tolerance on max |Δlogit| of fp32 exports (the written weights are the same numbers)."""
RELATIVE_TOLERANCE = {"bf16": 2.0 ** -4, "fp16": 2.0 ** -6}
"""Default tolerance of half-precision exports, as a fraction of max(1, max |reference logit|):
rounding the weights to bf16 (8 significant bits) or fp16 (11) moved the logits by up to 0.0084
(bf16) and 0.0013 (fp16) of that scale in the measurements of docs/export.md; margin 8x and 12x."""
VERIFY_BATCH, VERIFY_LEN, VERIFY_SEED = 4, 32, 0  # sequences x tokens of the verification batch
_WRITTEN = {"config.json", "generation_config.json", "export_meta.json", "model.safetensors", "model.safetensors.index.json"}


class ExportVerificationError(Exception):
    """The written model's logits differ from the checkpoint's beyond the tolerance (exit code 1)."""

    exit_code = 1


# ---------------------------------------------------------------------------- export


def parse_size(text: str | int) -> int:
    """Bytes of ``"2GB"``, ``"500MB"``, ``"64KiB"``, ``"1000"`` (decimal units; ``*iB`` binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"max shard size '{text}' is not a size; write e.g. 2GB, 500MB or 64KiB")
    unit = (m.group(2) or "B").upper()
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0]))


def verification_batch(tokenizer: Any, conf: Any) -> torch.Tensor:
    """The fixed batch the logits are compared on: ``VERIFY_BATCH`` sequences of ``VERIFY_LEN``
    tokens (fewer when the model has fewer positions), drawn with a fixed seed from the
    vocabulary without special tokens (so a classifier reads every sequence to its end)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(i for i in (conf.pad_token_id, tokenizer.pad_token_id) if i is not None)
    vocab = min(len(tokenizer), int(conf.vocab_size))
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    positions = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None) or VERIFY_LEN
    g = torch.Generator().manual_seed(VERIFY_SEED)
    return allowed[torch.randint(len(allowed), (VERIFY_BATCH, min(VERIFY_LEN, int(positions))), generator=g)]


def _logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()


def default_tolerance(dtype: str, reference: torch.Tensor) -> float:
    """The tolerance on max |Δlogit| when none is given (see :data:`RELATIVE_TOLERANCE`)."""
    if dtype == "fp32":
        return DEFAULT_TOLERANCE_FP32
    scale = float(reference.abs().max()) if reference.numel() else 1.0
    return RELATIVE_TOLERANCE[dtype] * max(1.0, scale if math.isfinite(scale) else 1.0)


def stop_token_ids(tok: Any, conf: Any, meta: dict) -> list[int]:
    """Generation stop tokens: ``meta.json``'s ``eos_token_ids`` when the checkpoint records them
    (fine-tuning does); else, with a chat template, its end-of-turn token and the tokenizer's EOS
    (:func:`pipeline.data.chat.end_of_turn_ids`); else the tokenizer's (or the config's) EOS."""
    if meta.get("eos_token_ids"):
        return list(dict.fromkeys(int(i) for i in meta["eos_token_ids"]))
    template = getattr(tok, "chat_template", None)
    template = template.get("default") if isinstance(template, dict) else template
    if isinstance(template, str) and template.strip():
        from pipeline.data.chat import end_of_turn_ids

        if ids := end_of_turn_ids(tok, template):
            return ids
    eos = tok.eos_token_id if tok.eos_token_id is not None else conf.eos_token_id
    return [int(i) for i in eos] if isinstance(eos, (list, tuple)) else [int(eos)] if eos is not None else []


def _prepare_config(model: Any, tok: Any, meta: dict, head: str, torch_dtype: torch.dtype) -> list[int]:
    """What the written config and generation config say; returns the stop tokens."""
    from transformers import GenerationConfig

    conf = model.config
    eos = stop_token_ids(tok, conf, meta)
    pad = next((i for i in (tok.pad_token_id, conf.pad_token_id) if i is not None), eos[0] if eos else None)
    if conf.pad_token_id is None:
        conf.pad_token_id = pad
    conf.use_cache, conf.dtype = True, torch_dtype
    if head == "causal_lm":
        bos = tok.bos_token_id if tok.bos_token_id is not None else conf.bos_token_id
        model.generation_config = GenerationConfig(bos_token_id=bos, pad_token_id=pad,
                                                   eos_token_id=eos[0] if len(eos) == 1 else eos or None)
    return eos


def _copy_tokenizer(step: Path, dest: Path) -> None:
    """The tokenizer files (and chat template) of ``hf/tokenizer`` (and ``hf/``) beside the weights."""
    hf = step / "hf"
    sources = [p for p in sorted((hf / "tokenizer").iterdir()) if p.name not in _WRITTEN and not p.name.startswith("model-")]
    sources += [p for p in (hf / "chat_template.jinja",) if p.is_file() and not (hf / "tokenizer" / p.name).exists()]
    for src in sources:
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / src.name)


def _reload_as_fp32(directory: Path, head: str, torch_dtype: torch.dtype):
    """The written directory loaded by transformers, weights upcast to fp32 for the comparison.

    transformers maps the safetensors and keeps weights of the file's dtype in the mapping; they
    are upcast one at a time and their pages handed back, so the peak stays one fp32 copy."""
    with _plain_quiet():
        model = _auto_class(head).from_pretrained(str(directory), dtype=torch_dtype, local_files_only=True)
    if torch_dtype != torch.float32:
        with PageOut(directory.glob("*.safetensors")) as pager, torch.no_grad():
            for p in model.parameters():
                pager.add(p.data.nbytes)
                p.data = p.data.float()
        model.float()  # buffers
    return model.eval()


def export(checkpoint: str | os.PathLike, output: str | os.PathLike, *, max_shard_size: str | int = "2GB",
           dtype: str = "auto", tolerance: float | None = None, overwrite: bool = False, log=print) -> dict:
    """Export a checkpoint as a verified Hugging Face directory (see the module docstring).

    Args:
        checkpoint: a step, checkpoints or run directory.
        output: the directory to publish (written as ``<output>.tmp-<pid>`` first).
        max_shard_size: safetensors files are split above this size (``"2GB"``, or bytes).
        dtype: ``auto`` (the training precision in meta.json), ``fp32``, ``bf16`` or ``fp16`` (or another spelling
            :mod:`pipeline.precision` knows, e.g. ``bfloat16``).
        tolerance: largest allowed max |Δlogit| (None: :func:`default_tolerance`).
        overwrite: replace an existing ``output``, once the new one is verified.
        log: where the progress lines go.

    Returns:
        The summary written as ``export_meta.json``, plus ``output``.

    Raises:
        UserError: bad checkpoint, output or arguments (exit 2).
        ExportVerificationError: logits beyond the tolerance; nothing published (exit 1).
    """
    t0 = time.time()
    from pipeline.inputs import check_model, check_output

    step = check_model(checkpoint, "--checkpoint", hf=False).step_dir
    # an output holding the checkpoint would be deleted by --overwrite
    out = check_output(output, "--output", inputs=[("--checkpoint", str(checkpoint)), ("its step directory", str(step))])
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite to replace it (the old one stays until the new "
                        "export is verified), or choose another --output")
    meta = read_meta(step)
    dtype = precision.parse(dtype, "--dtype", ("auto", *precision.NAMES))
    if dtype == "auto":
        dtype = meta.get("precision") if meta.get("precision") in precision.HALF else "fp32"
    if tolerance is not None and not tolerance >= 0:
        raise UserError(f"--tolerance must be a number >= 0, got {tolerance}")
    shard_bytes, torch_dtype = parse_size(max_shard_size), precision.torch_dtype(dtype)
    conf = _checkpoint_config(step, meta)
    head, tok = _head(conf, str(step)), _tokenizer(step / "hf" / "tokenizer")
    if conf.pad_token_id is None and head == "classification":  # a classifier batches by the pad id
        conf.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    log(f"export: {step} (step {meta.get('step')}, ZeRO-{meta.get('zero_stage', '?')}, {meta.get('world_size', '?')} "
        f"rank(s), trained in {meta.get('precision', '?')}) -> {out} as {dtype}")
    state = consolidate(step)
    model = _model_from_state_dict(conf, state, str(step))
    del state
    n_params = sum(p.numel() for p in model.parameters())
    batch = verification_batch(tok, model.config)
    reference = _logits(model, batch)
    tol = float(tolerance) if tolerance is not None else default_tolerance(dtype, reference)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        eos = _prepare_config(model, tok, meta, head, torch_dtype)
        model.to(torch_dtype)
        faults.corrupt_export(model)  # a test's damaged weight, which verification must catch (pipeline/faults.py)
        log(f"export: writing {n_params / 1e6:.1f}M parameters as {dtype} safetensors (shards up to {max_shard_size})")
        with _plain_quiet():
            model.save_pretrained(str(tmp), max_shard_size=shard_bytes)
        del model
        free_memory()
        _copy_tokenizer(step, tmp)
        conf_json = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        conf_json["dtype"] = conf_json["torch_dtype"] = str(torch_dtype).removeprefix("torch.")  # transformers 5 and 4 keys
        atomic_write_json(tmp / "config.json", conf_json)

        written = _reload_as_fp32(tmp, head, torch_dtype)
        _tokenizer(tmp)
        diff = float((_logits(written, batch) - reference).abs().max())
        del written
        free_memory()
        log(f"export: verification on {batch.shape[0]}x{batch.shape[1]} tokens: max |Δlogit| = {diff:.3g} (tolerance {tol:.3g})")
        if not diff <= tol:  # NaN fails too
            hint = "" if math.isfinite(diff) else (
                " (non-finite logits: weights beyond the fp16 range? export with --dtype bf16 or fp32)" if dtype == "fp16"
                else " (non-finite logits: the checkpoint's weights hold NaN/inf)")
            raise ExportVerificationError(
                f"export verification failed: max |Δlogit| = {diff:.6g} > tolerance {tol:.6g} (the {dtype} export of {step} "
                f"reloaded with transformers vs the checkpoint's consolidated fp32 weights){hint}; nothing was published to {out}")
        summary = {
            "source_checkpoint": str(step.resolve()), "step": meta.get("step"), "tag": step.name,
            "zero_stage": meta.get("zero_stage"), "world_size": meta.get("world_size"),
            "trained_precision": meta.get("precision"), "dtype": dtype, "n_params": n_params,
            "architecture": (conf_json.get("architectures") or [None])[0], "eos_token_ids": eos,
            "max_abs_logit_diff": diff, "tolerance": tol, "max_shard_size": str(max_shard_size),
            "verification": {"batch": list(batch.shape), "seed": VERIFY_SEED, "compute_dtype": "float32",
                             "reference": "consolidated fp32 state dict in a model built from hf/config.json"},
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        atomic_write_json(tmp / "export_meta.json", summary)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    log(f"export: published {out} ({len(summary['files'])} files, {time.time() - t0:.1f} s)")
    return {**summary, "output": str(out)}


def init_model_dir(source: ModelSource, out: Path, rank: int) -> Path:
    """A Hugging Face directory to build a training stage's starting model from: the given one, or
    the pipeline checkpoint exported (and verified) into ``<out>/init_model`` by rank 0 (every rank
    waits for it).

    The export is redone when ``init_model`` came from another checkpoint (a relaunch that names a
    newer step), and reused on a resume of the same start.
    """
    from pipeline import dist

    if source.kind == "hf":
        return source.path
    dest = out / "init_model"
    if rank == 0:
        try:
            made_from = json.loads((dest / "export_meta.json").read_text(encoding="utf-8"))["source_checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            made_from = None
        if made_from != str(source.step_dir.resolve()):
            export(source.path, dest, dtype="fp32", overwrite=True)
    dist.barrier()
    return dest


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/export.py``: parse the arguments, export and verify; 0 published, 1 verification failed, 2 user error."""
    import argparse

    from pipeline.cli import report_errors

    p = argparse.ArgumentParser(prog="launch/export.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="step, checkpoints/ or run directory")
    p.add_argument("--output", required=True, metavar="DIR", help="Hugging Face model directory to publish")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="split safetensors files above this size, e.g. 2GB, 500MB, 64KiB (default 2GB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the written weights; auto (default) = the training precision in meta.json")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="largest max |Δlogit| accepted (default: 1e-4 for fp32; for bf16 / fp16 2^-4 / 2^-6 "
                        "x max(1, max |reference logit|))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output, once the new one is verified")
    ns = p.parse_args(argv)
    return report_errors(lambda: export(ns.checkpoint, ns.output, max_shard_size=ns.max_shard_size, dtype=ns.dtype,
                                        tolerance=ns.tolerance, overwrite=ns.overwrite) and 0, ExportVerificationError)

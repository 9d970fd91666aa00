"""Stage 4, export: a ZeRO checkpoint of this pipeline -> a verified Hugging Face model directory.

    python launch/export.py --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR
                            [--dtype auto|fp32|bf16|fp16] [--max-shard-size 2GB] [--tolerance X] [--overwrite]

Flow: resolve the step directory -> consolidate the ZeRO shards (any stage, any number of
ranks) into one fp32 state dict with DeepSpeed's own ``zero_to_fp32`` (lazy mode, one tensor at
a time) -> load it into a model built from ``hf/config.json`` -> reference logits on a fixed,
seeded batch -> cast to the export dtype and write safetensors (sharded), config, generation
config, tokenizer and chat template into ``<output>.tmp-<pid>`` -> free the model, reload the
written directory with transformers and compare logits -> ``export_meta.json`` -> publish
atomically (:func:`pipeline.io.publish_dir`). Nothing is published when verification fails.

The evaluate and fine-tune stages use the loaders here: :func:`resolve_checkpoint`,
:func:`is_pipeline_checkpoint`, :func:`consolidate` and :func:`load_model`.

Memory: about one fp32 copy of the model. DeepSpeed memory-maps the optimizer shards; the
pages of the fp32 master weights it reads are handed back to the kernel as the consolidation
goes (``madvise(MADV_PAGEOUT)``, Linux), the reference model is built on the consolidated
tensors without copying them, and it is freed before the written directory is reloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import io
import json
import math
import mmap
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, publish_dir, sha256_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
DEFAULT_TOLERANCE_FP32 = 1e-4
"""Absolute default tolerance on max |Δlogit| for fp32 exports (the written weights are the same numbers)."""
RELATIVE_TOLERANCE = {"bf16": 2.0 ** -4, "fp16": 2.0 ** -7}
"""Default tolerance of half-precision exports, as a fraction of max(1, max |reference logit|):
rounding every weight to bf16 (8 significant bits) or fp16 (11) moves the logits by a few
units of that precision relative to their scale; the factor leaves a margin of about 8x over
what was measured (docs/export.md)."""
VERIFY_BATCH, VERIFY_LEN, VERIFY_SEED = 4, 32, 0  # sequences x tokens of the verification batch
CORRUPT_ENV = "PIPELINE_TEST_CORRUPT_EXPORT"
"""Test aid: when set to 1, a weight is perturbed after the reference logits and before writing,
so that verification must fail."""
EXIT_VERIFY_FAILED = 1
_STEP_TAG = re.compile(r"^step-\d{8}$")
_EXPECTED = ("a step directory of this pipeline (step-NNNNNNNN/ holding meta.json, hf/config.json and DeepSpeed's "
             "*_model_states.pt / *_optim_states.pt), a checkpoints/ directory with a `latest` file, or a training "
             "run directory holding checkpoints/latest")
_RESERVED = {"config.json", "generation_config.json", "export_meta.json", "model.safetensors", "model.safetensors.index.json"}


class ExportVerificationError(Exception):
    """The written model's logits differ from the checkpoint's beyond the tolerance (exit code 1)."""

    exit_code = EXIT_VERIFY_FAILED


# ---------------------------------------------------------------------------- checkpoints


def _read_latest(ckpt_root: Path) -> Path:
    marker = ckpt_root / "latest"
    tag = marker.read_text(encoding="utf-8").strip()
    step = ckpt_root / tag
    if not _STEP_TAG.match(tag) or not step.is_dir():
        found = sorted(p.name for p in ckpt_root.glob("step-*") if _STEP_TAG.match(p.name))
        raise UserError(f"{marker} names '{tag}', which is not a complete checkpoint; export a step directory instead "
                        f"(present: {', '.join(found) or 'none'})")
    return step


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory a user's checkpoint path means.

    Args:
        path: a step directory, a ``checkpoints/`` directory (its ``latest``) or a run
            directory (``<run>/checkpoints/latest``).

    Raises:
        UserError: a missing path, a directory that is not a checkpoint of this pipeline, or an
            incomplete checkpoint; the message says what was expected.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint '{p}' does not exist; give {_EXPECTED}")
    if not p.is_dir():
        raise UserError(f"checkpoint '{p}' is a file, not a directory; give {_EXPECTED}")
    if (p / "latest").is_file():
        step = _read_latest(p)
    elif (p / "checkpoints" / "latest").is_file():
        step = _read_latest(p / "checkpoints")
    elif (p / "checkpoints").is_dir():
        raise UserError(f"'{p}' is a run directory without a complete checkpoint (no checkpoints/latest); train until a "
                        "checkpoint is saved, or give a step directory")
    else:
        step = p
    if step.name.endswith(".tmp"):
        raise UserError(f"'{step}' is a checkpoint whose save did not finish (.tmp); export a complete step directory")
    if not (step / "meta.json").is_file():
        raise UserError(f"'{p}' is not a checkpoint of this pipeline (no meta.json); give {_EXPECTED}")
    missing = [name for name, ok in (("hf/config.json", (step / "hf" / "config.json").is_file()),
                                      ("*_model_states.pt", any(step.glob("*_model_states.pt"))),
                                      ("*_optim_states.pt", any(step.glob("*_optim_states.pt")))) if not ok]
    if missing:
        raise UserError(f"checkpoint '{step}' is incomplete (missing {', '.join(missing)}); export another step, "
                        f"or give {_EXPECTED}")
    return step


def is_pipeline_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves to a complete checkpoint of this pipeline (never raises)."""
    try:
        resolve_checkpoint(path)
    except (UserError, OSError):
        return False
    return True


def _meta(step: Path) -> dict:
    try:
        return json.loads((step / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {step / 'meta.json'} ({e}); the checkpoint is damaged, export another step") from None


# ---------------------------------------------------------------------------- consolidation


def _progress_enabled() -> bool:
    from pipeline.progress import progress_bar

    with progress_bar(total=0) as bar:
        return not bar.disable


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """transformers' own progress bars only on a terminal (like :func:`pipeline.progress.progress_bar`)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not _progress_enabled():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _plain_init() -> Iterator[None]:
    """Build plain (unpartitioned) models even while a ZeRO-3 ``HfDeepSpeedConfig`` is alive in the
    process (a fine-tune rank exporting its starting checkpoint)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def _quiet_deepspeed(z) -> Iterator[None]:
    """DeepSpeed's consolidation prints and draws bars unconditionally: keep its prints out of the
    log and its bars to terminals."""
    from pipeline.progress import progress_bar

    saved = z.tqdm
    z.tqdm = lambda iterable=None, **kw: progress_bar(iterable=iterable, leave=False, **kw)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        z.tqdm = saved


class _PageOut:
    """While open, hands the resident pages of this process's memory mappings of ``files`` back
    to the kernel (``madvise(MADV_PAGEOUT)``): from a background thread every ``interval``
    seconds, and on :meth:`add` every ``every`` bytes processed.

    DeepSpeed reads the optimizer shards with ``torch.load(mmap=True)``, and transformers the
    safetensors files the same way: every page read stays mapped in this process (and in its
    RSS) until the file is closed, which would add a second copy of the model to the peak (the
    ZeRO-1/2 merge inside DeepSpeed reads the whole fp32 partition that way). ``MADV_PAGEOUT``
    reclaims clean file pages and never discards data (a page touched again is read back from
    the file), so it is safe whatever the mapping holds. Not Linux, or a kernel < 5.4: no-op.
    """

    MADV_PAGEOUT = 21

    def __init__(self, files: Iterable[str | os.PathLike], interval: float = 0.1):
        import threading

        self.files = {os.path.realpath(f) for f in files}
        size = sum(os.path.getsize(f) for f in self.files if os.path.exists(f))
        # a synchronous pass every 1/128 of the mapped bytes (at least 16 MiB) processed
        self.every, self.pending, self.interval = max(16 << 20, size // 128), 0, interval
        self.lock, self.stop, self.thread = threading.Lock(), threading.Event(), None
        self.libc = None
        if self.files and sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.libc = libc
            self.thread = threading.Thread(target=self._loop, name="pageout", daemon=True) if self.libc else None

    def _ranges(self) -> list[tuple[int, int]]:
        out = []
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] in self.files:
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
        return out

    def run_pass(self) -> None:
        with self.lock:
            self.pending = 0
            if self.libc is None:
                return
            for lo, hi in self._ranges():
                if self.libc.madvise(lo, hi - lo, self.MADV_PAGEOUT) != 0 and ctypes.get_errno() == 22:
                    self.libc = None  # EINVAL: this kernel has no MADV_PAGEOUT
                    return

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            self.run_pass()

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.run_pass()

    def __enter__(self) -> _PageOut:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
        self.run_pass()


def _free_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS (glibc ``malloc_trim``): the
    tensors of a freed model are mostly heap blocks that glibc would otherwise keep, and the
    next model loaded would come on top of them."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)


def _lazy_state_dict(step: Path) -> dict[str, Any]:
    """DeepSpeed's consolidated state dict of ``step`` in lazy mode (ZeRO-3: tensors gathered on
    ``.contiguous()``; ZeRO-1/2: views of the merged fp32 partitions)."""
    from deepspeed.utils import zero_to_fp32 as z

    try:
        with _quiet_deepspeed(z):
            return z.get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag=step.name, lazy_mode=True)
    except (FileNotFoundError, ValueError, KeyError, EOFError, RuntimeError) as e:
        raise UserError(f"DeepSpeed cannot consolidate '{step}' ({type(e).__name__}: {e}); the checkpoint is incomplete or "
                        "damaged (every rank's *_model_states.pt and *_optim_states.pt must be there): export another "
                        "step") from None


def consolidate(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 state dict, keyed by the training module's parameter names.

    Uses DeepSpeed's ``zero_to_fp32`` (any ZeRO stage, any number of ranks) in lazy mode and
    materialises one tensor at a time; tied parameters stay one shared tensor. Peak memory is
    about one fp32 copy of the model (see the module docstring).

    Args:
        step_dir: a step, checkpoints or run directory (see :func:`resolve_checkpoint`).

    Raises:
        UserError: not a checkpoint, or shards missing/damaged.
    """
    from pipeline.progress import progress_bar

    step = resolve_checkpoint(step_dir)
    out: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}  # id of a lazy tensor -> first name: shared (tied) entries stay shared
    with _PageOut(step.glob("*_optim_states.pt")) as pager:
        lazy = _lazy_state_dict(step)
        gc.collect()  # the loaded optimizer dicts hold reference cycles; free what DeepSpeed let go
        with progress_bar(total=len(lazy), desc="consolidate", unit="tensor") as bar:
            for name in list(lazy):
                t = lazy.pop(name)
                if id(t) in first:
                    out[name] = out[first[id(t)]]
                else:
                    first[id(t)] = name
                    v = t.contiguous()
                    out[name] = v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
                    pager.add(v.numel() * v.element_size())
                bar.update()
        del lazy, t
    gc.collect()
    return out


# ---------------------------------------------------------------------------- models


def _head(conf: Any, where: str) -> str:
    archs = list(getattr(conf, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    if not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    raise UserError(f"{where}: architectures {archs} is neither a causal LM (*ForCausalLM) nor a sequence classifier "
                    "(*ForSequenceClassification), the two kinds of model this pipeline trains and exports")


def _auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM


def _read_config(hf_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {hf_dir / 'config.json'} ({type(e).__name__}: {e}); the checkpoint is damaged") from None


def _model_from_state_dict(conf: Any, state: dict[str, torch.Tensor], where: str):
    """A plain eval-mode fp32 model built from ``conf`` on the tensors of ``state`` (not copied)."""
    head = _head(conf, where)
    auto = _auto_class(head)
    try:
        cls = auto._model_mapping[type(conf)]
    except KeyError:
        raise UserError(f"{where}: transformers has no {auto.__name__} for model type '{conf.model_type}'") from None
    with _plain_init(), _quiet_hf():
        model, info = cls.from_pretrained(None, config=conf, state_dict=state, dtype=torch.float32, output_loading_info=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    problems = [f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for what, keys in (
        ("missing", missing), ("unexpected", sorted(info.get("unexpected_keys") or ())),
        ("wrong shape", sorted(str(k) for k in info.get("mismatched_keys") or ()))) if keys]
    if problems:
        raise UserError(f"{where}: the consolidated weights do not fit the model of hf/config.json ({'; '.join(problems)}); "
                        "the checkpoint's hf/ does not belong to its weights")
    model.eval()
    return model


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).removeprefix("torch."), str(dtype))
    if name not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of fp32, bf16, fp16")
    return DTYPES[name]


def load_model(path: str | os.PathLike, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """Load a model for inference from a Hugging Face directory or a pipeline checkpoint.

    Args:
        path: a Hugging Face model directory (config.json + weights), or a step/checkpoints/run
            directory of this pipeline (consolidated in memory, nothing written).
        dtype: torch dtype (or fp32/bf16/fp16) of the returned model's weights.

    Returns:
        ``(model, tokenizer)``: an eval-mode ``AutoModelForCausalLM`` or
        ``AutoModelForSequenceClassification`` (by ``architectures``) on CPU, with
        ``use_cache`` on, and its ``AutoTokenizer`` (the directory's, or ``hf/tokenizer``).

    Raises:
        UserError: neither kind of directory, or a damaged one.
    """
    from transformers import AutoTokenizer

    p, torch_dtype = Path(path), _as_dtype(dtype)
    if is_pipeline_checkpoint(p):
        step = resolve_checkpoint(p)
        conf = _read_config(step / "hf")
        model = _model_from_state_dict(conf, consolidate(step), str(step))
        tok_dir = step / "hf" / "tokenizer"
        if torch_dtype != torch.float32:
            model.to(torch_dtype)
    elif (p / "config.json").is_file():
        conf = _read_config(p)
        try:
            with _plain_init(), _quiet_hf():
                model = _auto_class(_head(conf, str(p))).from_pretrained(str(p), dtype=torch_dtype, local_files_only=True)
        except OSError as e:
            raise UserError(f"cannot load the Hugging Face model in '{p}' ({e}); it needs config.json and its weights "
                            "(*.safetensors)") from None
        tok_dir = p
    else:
        if p.is_dir() and (p / "meta.json").is_file() or (p / "checkpoints").is_dir() or (p / "latest").is_file():
            resolve_checkpoint(p)  # raises the precise reason it is not a usable checkpoint
        raise UserError(f"'{p}' is neither a Hugging Face model directory (config.json + weights) nor {_EXPECTED}")
    model.eval()
    model.config.use_cache = True  # training saves use_cache=false; inference wants the KV cache
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in '{tok_dir}' ({e}); the model directory needs its tokenizer files") from None
    return model, tok


# ---------------------------------------------------------------------------- export


def parse_size(text: str | int) -> int:
    """Bytes of ``"2GB"``, ``"500MB"``, ``"64KiB"``, ``"1000"`` (decimal units; ``*iB`` binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"max shard size '{text}' is not a size; write e.g. 2GB, 500MB or 64KiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def verification_batch(tokenizer: Any, conf: Any) -> torch.Tensor:
    """The fixed batch the logits are compared on: ``VERIFY_BATCH`` sequences of ``VERIFY_LEN``
    tokens (fewer when the model has fewer positions), drawn with a fixed seed from the
    vocabulary without special tokens (so a classifier reads every sequence to its end)."""
    vocab = min(len(tokenizer), int(conf.vocab_size))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(i for i in (conf.pad_token_id, getattr(tokenizer, "pad_token_id", None)) if i is not None)
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


def _chat_template(tok: Any) -> str | None:
    tpl = getattr(tok, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def stop_token_ids(tok: Any, conf: Any, meta: dict) -> list[int]:
    """Generation stop tokens: ``meta.json``'s ``eos_token_ids`` when the checkpoint records them
    (fine-tuning does), else the chat template's end-of-turn token (when it has one) and the
    tokenizer's EOS, else the config's EOS."""
    if meta.get("eos_token_ids"):
        return list(dict.fromkeys(int(i) for i in meta["eos_token_ids"]))
    template = _chat_template(tok)
    if template is not None:
        from pipeline.data.chat import end_of_turn_ids

        ids = end_of_turn_ids(tok, template)
        if ids:
            return ids
    eos = tok.eos_token_id if tok.eos_token_id is not None else conf.eos_token_id
    if isinstance(eos, (list, tuple)):
        return [int(i) for i in eos]
    return [int(eos)] if eos is not None else []


def _prepare_config(model: Any, tok: Any, meta: dict, head: str, torch_dtype: torch.dtype) -> list[int]:
    """Set what the exported config and generation config say; returns the stop tokens."""
    from transformers import GenerationConfig

    conf = model.config
    eos = stop_token_ids(tok, conf, meta)
    pad = next((i for i in (tok.pad_token_id, conf.pad_token_id) if i is not None), eos[0] if eos else None)
    if conf.pad_token_id is None:
        conf.pad_token_id = pad
    conf.use_cache = True
    conf.dtype = torch_dtype
    labels = meta.get("labels")
    if head == "classification" and isinstance(labels, list) and len(labels) == conf.num_labels:
        conf.id2label = {i: str(n) for i, n in enumerate(labels)}
        conf.label2id = {str(n): i for i, n in enumerate(labels)}
    if head == "causal_lm":
        bos = tok.bos_token_id if tok.bos_token_id is not None else conf.bos_token_id
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos or None,
                                                   pad_token_id=pad)
    return eos


def _copy_tokenizer(step: Path, dest: Path) -> None:
    """Tokenizer files (and any chat template) from ``hf/tokenizer`` next to the weights."""
    sources = [p for p in sorted((step / "hf" / "tokenizer").iterdir()) if p.name not in _RESERVED and not p.name.startswith("model-")]
    sources += [p for p in (step / "hf" / "chat_template.jinja",) if p.is_file() and not (dest / p.name).exists()]
    for src in sources:
        if src.is_dir():
            shutil.copytree(src, dest / src.name)
        else:
            shutil.copy2(src, dest / src.name)


def _reload_as_fp32(directory: Path, head: str, torch_dtype: torch.dtype):
    """The written directory loaded by transformers, weights upcast to fp32 for the comparison.

    transformers memory-maps the safetensors and keeps weights of the loaded dtype in the
    mapping; they are upcast one at a time and their pages handed back, so the peak stays
    about one fp32 copy (not fp32 + the mapped half-precision file)."""
    with _plain_init(), _quiet_hf():
        model = _auto_class(head).from_pretrained(str(directory), dtype=torch_dtype, local_files_only=True)
    if torch_dtype != torch.float32:
        with _PageOut(directory.glob("*.safetensors")) as pager, torch.no_grad():
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
        output: the directory to publish; written as ``<output>.tmp-<pid>`` first.
        max_shard_size: safetensors files are split above this size (``"2GB"``, bytes).
        dtype: ``auto`` (the training precision in meta.json), ``fp32``, ``bf16`` or ``fp16``.
        tolerance: largest allowed max |Δlogit| (None: :func:`default_tolerance`).
        overwrite: replace an existing ``output`` (only once the new one is verified).
        log: where progress lines go.

    Returns:
        The summary also written as ``export_meta.json``.

    Raises:
        UserError: bad checkpoint/output/arguments (exit 2).
        ExportVerificationError: logits beyond the tolerance; nothing published (exit 1).
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    step = resolve_checkpoint(checkpoint)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; choose another --output")
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite to replace it (the old one stays until the new "
                        "export is verified), or choose another --output")
    meta = _meta(step)
    if dtype == "auto":
        dtype = {"bf16": "bf16", "fp16": "fp16"}.get(str(meta.get("precision", "fp32")), "fp32")
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise UserError(f"--dtype '{dtype}' is not one of auto, fp32, bf16, fp16")
    if tolerance is not None and not tolerance >= 0:
        raise UserError(f"--tolerance must be a number >= 0, got {tolerance}")
    shard_bytes = parse_size(max_shard_size)
    torch_dtype = DTYPES[dtype]
    conf = _read_config(step / "hf")
    head = _head(conf, str(step))
    try:
        tok = AutoTokenizer.from_pretrained(str(step / "hf" / "tokenizer"), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the checkpoint's tokenizer in {step / 'hf' / 'tokenizer'} ({e}); the checkpoint is damaged") from None
    if conf.pad_token_id is None and head == "classification":
        conf.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    log(f"export: {step} (step {meta.get('step')}, ZeRO-{meta.get('zero_stage', '?')}, {meta.get('world_size', '?')} rank(s), "
        f"trained in {meta.get('precision', '?')}) -> {out} as {dtype}")
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
    published = False
    try:
        eos = _prepare_config(model, tok, meta, head, torch_dtype)
        model.to(torch_dtype)
        if os.environ.get(CORRUPT_ENV) == "1":
            with torch.no_grad():
                model.get_input_embeddings().weight.add_(1.0)
        log(f"export: writing {n_params / 1e6:.1f}M parameters as {dtype} safetensors (shards up to {max_shard_size})")
        with _quiet_hf():
            model.save_pretrained(str(tmp), max_shard_size=shard_bytes)
        del model
        _free_memory()
        _copy_tokenizer(step, tmp)
        conf_json = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        conf_json["dtype"] = conf_json["torch_dtype"] = str(torch_dtype).removeprefix("torch.")  # transformers 5 and 4 keys
        atomic_write_json(tmp / "config.json", conf_json)

        written = _reload_as_fp32(tmp, head, torch_dtype)
        AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        diff = float((_logits(written, batch) - reference).abs().max())
        del written
        _free_memory()
        log(f"export: verification on {batch.shape[0]}x{batch.shape[1]} tokens: max |Δlogit| = {diff:.3g} "
            f"(tolerance {tol:.3g})")
        if not diff <= tol:  # NaN fails too
            raise ExportVerificationError(
                f"export verification failed: max |Δlogit| = {diff:.6g} > tolerance {tol:.6g} (the {dtype} export of "
                f"{step} reloaded with transformers vs the checkpoint's consolidated fp32 weights); nothing was written "
                f"to {out}")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        summary = {
            "source_checkpoint": str(step.resolve()),
            "step": meta.get("step"),
            "tag": step.name,
            "zero_stage": meta.get("zero_stage"),
            "world_size": meta.get("world_size"),
            "trained_precision": meta.get("precision"),
            "dtype": dtype,
            "architecture": (conf_json.get("architectures") or [None])[0],
            "n_params": n_params,
            "max_abs_logit_diff": diff,
            "tolerance": tol,
            "verification": {"batch": list(batch.shape), "seed": VERIFY_SEED, "compute_dtype": "float32",
                             "reference": "consolidated fp32 state dict in a model built from hf/config.json"},
            "eos_token_ids": eos,
            "max_shard_size": str(max_shard_size),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        atomic_write_json(tmp / "export_meta.json", summary)
        publish_dir(tmp, out)
        published = True
    finally:
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"export: published {out} ({len(summary['files'])} files, {time.time() - t0:.1f} s)")
    return {**summary, "output": str(out)}


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="step, checkpoints/ or run directory")
    p.add_argument("--output", required=True, metavar="DIR", help="Hugging Face model directory to publish")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="split safetensors above this size (default 2GB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights dtype; auto = the training precision (meta.json)")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help=f"largest max |Δlogit| accepted (default {DEFAULT_TOLERANCE_FP32:g} for fp32; bf16/fp16: "
                        "2^-4 / 2^-7 x max(1, max |logit|))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output once the new one is verified")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0, 1 verification failed, 2 user error)."""
    ns = build_parser().parse_args(argv)
    try:
        export(ns.checkpoint, ns.output, max_shard_size=ns.max_shard_size, dtype=ns.dtype, tolerance=ns.tolerance,
               overwrite=ns.overwrite)
        return 0
    except (UserError, ExportVerificationError) as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

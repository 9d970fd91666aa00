"""Stage 4, export: a ZeRO checkpoint of this pipeline -> a verified Hugging Face model directory.

    python launch/export.py --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR [--dtype ...] [--overwrite]

Flow: resolve the step directory -> consolidate the ZeRO shards (any stage, any number of ranks)
into one fp32 state dict with DeepSpeed's ``zero_to_fp32`` (lazy mode, a tensor at a time) -> a
model built from ``hf/config.json`` on those tensors -> reference logits on a fixed batch -> cast
and write safetensors, config, generation config, tokenizer and chat template into
``<output>.tmp-<pid>`` -> free the model, reload the written directory with transformers, compare
logits -> ``export_meta.json`` -> publish atomically. Nothing is published when verification fails.
Peak memory: about one fp32 copy of the model, any ZeRO stage (docs/export.md).

The evaluate and fine-tune stages use :func:`resolve_checkpoint`, :func:`is_pipeline_checkpoint`,
:func:`consolidate` and :func:`load_model`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import io
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, publish_dir, sha256_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEFAULT_TOLERANCE_FP32 = 1e-4
"""Default tolerance on max |Δlogit| of fp32 exports (the written weights are the same numbers)."""
RELATIVE_TOLERANCE = {"bf16": 2.0 ** -4, "fp16": 2.0 ** -6}
"""Default tolerance of half-precision exports, as a fraction of max(1, max |reference logit|):
rounding the weights to bf16 (8 significant bits) or fp16 (11) moved the logits by up to 0.0084
(bf16) and 0.0013 (fp16) of that scale in the measurements of docs/export.md; margin 8x and 12x."""
VERIFY_BATCH, VERIFY_LEN, VERIFY_SEED = 4, 32, 0  # sequences x tokens of the verification batch
CORRUPT_ENV = "PIPELINE_TEST_CORRUPT_EXPORT"
"""Test aid: set to 1, a weight is perturbed after the reference logits and before writing, so
verification must fail."""
_STEP_TAG = re.compile(r"^step-\d{8}$")
_EXPECTED = ("a step directory of this pipeline (step-NNNNNNNN/ holding meta.json, hf/config.json and DeepSpeed's "
             "*_model_states.pt / *_optim_states.pt), a checkpoints/ directory with a `latest` file, or a training "
             "run directory holding checkpoints/latest")
_WRITTEN = {"config.json", "generation_config.json", "export_meta.json", "model.safetensors", "model.safetensors.index.json"}


class ExportVerificationError(Exception):
    """The written model's logits differ from the checkpoint's beyond the tolerance (exit code 1)."""

    exit_code = 1


# ---------------------------------------------------------------------------- checkpoints


def _read_latest(root: Path) -> Path:
    tag = (root / "latest").read_text(encoding="utf-8").strip()
    if not _STEP_TAG.match(tag) or not (root / tag).is_dir():
        found = sorted(p.name for p in root.glob("step-*") if _STEP_TAG.match(p.name))
        raise UserError(f"{root / 'latest'} names '{tag}', which is not a complete checkpoint; export a step directory "
                        f"instead (present: {', '.join(found) or 'none'})")
    return root / tag


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory a checkpoint path means.

    Args:
        path: a step directory, a ``checkpoints/`` directory (its ``latest``) or a run directory
            (``<run>/checkpoints/latest``).

    Raises:
        UserError: a missing path, a directory that is not a checkpoint of this pipeline, or an
            incomplete checkpoint; the message says what was expected.
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint '{p}' {'is a file' if p.exists() else 'does not exist'}; give {_EXPECTED}")
    if (p / "latest").is_file():
        step = _read_latest(p)
    elif (p / "checkpoints" / "latest").is_file():
        step = _read_latest(p / "checkpoints")
    elif (p / "checkpoints").is_dir():
        raise UserError(f"'{p}' is a run directory without a complete checkpoint (no checkpoints/latest); train until "
                        "a checkpoint is saved, or give a step directory")
    else:
        step = p
    if step.name.endswith(".tmp"):
        raise UserError(f"'{step}' is a checkpoint whose save did not finish (.tmp); export a complete step directory")
    if not (step / "meta.json").is_file():
        hint = " (it looks like a Hugging Face model directory, which needs no export)" if (p / "config.json").is_file() else ""
        raise UserError(f"'{p}' is not a checkpoint of this pipeline (no meta.json){hint}; give {_EXPECTED}")
    if (step / "zero").is_dir() and not any(step.glob("*_optim_states.pt")):  # launch/convert_checkpoint.py's output
        raise UserError(f"'{step}' is a DeepSpeed universal checkpoint (for resuming on another number of ranks), which "
                        "export does not read; export the regular checkpoint it was converted from (converted_from in "
                        "its meta.json) or one the resumed run wrote")
    missing = [name for name in ("hf/config.json", "*_model_states.pt", "*_optim_states.pt")
               if not ((step / name).is_file() if "*" not in name else any(step.glob(name)))]
    if missing:
        raise UserError(f"checkpoint '{step}' is incomplete (missing {', '.join(missing)}); export another step")
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


@contextlib.contextmanager
def _plain_quiet() -> Iterator[None]:
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


class _PageOut:
    """While open, hands this process's resident pages of memory-mapped ``files`` back to the
    kernel (``madvise(MADV_PAGEOUT)``), from a thread every 0.1 s and on :meth:`add`.

    DeepSpeed reads the optimizer shards with ``torch.load(mmap=True)`` (transformers the
    safetensors likewise): every page read stays in this process's RSS until the file is closed,
    a second copy of the model at the peak. ``MADV_PAGEOUT`` reclaims clean file pages and never
    discards data (a page touched again is read back), so it is safe on any mapping. Not Linux,
    or a kernel < 5.4: a no-op."""

    MADV_PAGEOUT, EINVAL = 21, 22

    def __init__(self, files: Iterable[str | os.PathLike]):
        self.files = {os.path.realpath(f) for f in files}
        # a synchronous pass every 1/128 of the mapped bytes (at least 16 MiB) processed
        self.every, self.pending = max(16 << 20, sum(os.path.getsize(f) for f in self.files) // 128), 0
        self.lock, self.stop, self.libc = threading.Lock(), threading.Event(), None
        if self.files and sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                self.libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.thread = threading.Thread(target=self._loop, name="pageout", daemon=True) if self.libc else None

    def run_pass(self) -> None:
        with self.lock:
            self.pending = 0
            if self.libc is None:
                return
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                ranges = [parts[0].split("-") for parts in (line.rstrip("\n").split(maxsplit=5) for line in f)
                          if len(parts) == 6 and parts[5] in self.files]
            for lo, hi in ((int(a, 16), int(b, 16)) for a, b in ranges):
                if self.libc.madvise(lo, hi - lo, self.MADV_PAGEOUT) and ctypes.get_errno() == self.EINVAL:
                    self.libc = None  # this kernel has no MADV_PAGEOUT
                    return

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            self.run_pass()

    def _loop(self) -> None:
        while not self.stop.wait(0.1):
            self.run_pass()

    def __enter__(self) -> _PageOut:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.run_pass()


def _free_memory() -> None:
    """Collect garbage and give freed heap back to the OS (glibc ``malloc_trim``): a freed model's
    tensors are mostly heap blocks glibc would keep, and the next model would come on top."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)


class _Zero2Slice:
    """One parameter of a ZeRO-1/2 checkpoint, read on :meth:`contiguous` from the (memory-mapped)
    fp32 partitions of its parameter group: the lazy counterpart of DeepSpeed's ZeRO-3
    ``GatheredTensor`` that ``zero_to_fp32`` lacks for stages 1/2."""

    def __init__(self, partitions: list[torch.Tensor], offset: int, numel: int, shape: torch.Size):
        self.partitions, self.offset, self.numel, self.shape = partitions, offset, numel, torch.Size(shape)
        self.dtype = torch.float32

    def contiguous(self) -> torch.Tensor:
        """The parameter as its own fp32 tensor: the pieces of the partitions it spans, copied."""
        out, start, filled = torch.empty(self.numel, dtype=torch.float32), 0, 0
        for part in self.partitions:  # rank order = the order DeepSpeed concatenates them in
            lo, hi = max(self.offset, start), min(self.offset + self.numel, start + part.numel())
            if lo < hi:
                out[lo - self.offset:hi - self.offset].copy_(part[lo - start:hi - start])
                filled += hi - lo
            start += part.numel()
        if filled != self.numel:
            raise ValueError(f"the fp32 partitions hold {filled} of a parameter's {self.numel} elements")
        return out.view(self.shape)


def _zero2_lazy_merge(state_dict, world_size, fp32_flat_groups, zero_model_states, param_alignment_paddings=None):
    """Stand-in for ``zero_to_fp32._zero2_merge_trainable_params`` (same arguments, same layout
    rules and sanity check): DeepSpeed's version ``torch.cat``s each group's partitions into one
    fp32 vector and returns views of it, which holds a whole copy of the model that cannot be freed
    piecewise (2x the fp32 size at the export's peak); this one puts a :class:`_Zero2Slice` per
    parameter, so a parameter is read from the mapped shards only when it is materialised."""
    for group, shapes in enumerate(zero_model_states[0].param_shapes):
        partitions = [ranks[group] for ranks in fp32_flat_groups]
        avail = sum(p.numel() for p in partitions)
        paddings = param_alignment_paddings[group] if param_alignment_paddings is not None else None
        if paddings is not None and len(paddings) != len(shapes):
            raise ValueError(f"expected {len(shapes)} parameter alignment paddings for group {group}, found {len(paddings)}")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            state_dict[name] = _Zero2Slice(partitions, offset, numel, shape)
            offset += numel + (paddings[i] if paddings is not None else 0)
        align = 2 * world_size  # DeepSpeed pads each group to a multiple of 2 x world size (its check)
        if align * math.ceil(offset / align) != align * math.ceil(avail / align):
            raise ValueError(f"consumed {offset} numels out of {avail} in parameter group {group}")


def _lazy_state_dict(step: Path) -> dict[str, Any]:
    """DeepSpeed's consolidated state dict in lazy mode: values whose ``.contiguous()`` makes the
    tensor (ZeRO-3: DeepSpeed's gather; ZeRO-1/2: :func:`_zero2_lazy_merge` in place of DeepSpeed's
    merge). Its prints are dropped, its bars follow ours."""
    from deepspeed.utils import zero_to_fp32 as z

    from pipeline.progress import progress_bar

    saved, saved_merge = z.tqdm, z._zero2_merge_trainable_params
    z.tqdm = lambda iterable=None, **kw: progress_bar(iterable=iterable, leave=False, **kw)
    z._zero2_merge_trainable_params = _zero2_lazy_merge
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return z.get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag=step.name, lazy_mode=True)
    except (FileNotFoundError, ValueError, KeyError, EOFError, RuntimeError) as e:
        raise UserError(f"DeepSpeed cannot consolidate '{step}' ({type(e).__name__}: {e}); the checkpoint is incomplete "
                        "or damaged (every rank's *_model_states.pt and *_optim_states.pt must be there): export another "
                        "step") from None
    finally:
        z.tqdm, z._zero2_merge_trainable_params = saved, saved_merge


def consolidate(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 state dict, keyed by the training module's parameter names.

    DeepSpeed's ``zero_to_fp32`` (any ZeRO stage, any number of ranks) in lazy mode, materialised
    a tensor at a time; tied parameters stay one shared tensor. Peak: about one fp32 model copy.

    Args:
        step_dir: a step, checkpoints or run directory (see :func:`resolve_checkpoint`).

    Raises:
        UserError: not a checkpoint, or shards missing/damaged.
    """
    from pipeline.progress import progress_bar

    step = resolve_checkpoint(step_dir)
    out: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}  # id of a lazy value (all alive from the start) -> its first name: ties stay ties
    with _PageOut(step.glob("*_optim_states.pt")) as pager:
        lazy = _lazy_state_dict(step)
        gc.collect()  # the loaded optimizer dicts hold reference cycles; free what DeepSpeed let go
        with progress_bar(total=len(lazy), desc="consolidate", unit="tensor") as bar:
            while lazy:
                name, t = next(iter(lazy.items()))
                del lazy[name]  # the last reference to a ZeRO-3 lazy tensor keeps the shards mapped
                if id(t) in first:
                    out[name] = out[first[id(t)]]
                else:
                    first[id(t)] = name
                    v = t.contiguous()
                    out[name] = v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
                    pager.add(v.numel() * v.element_size())
                bar.update()
        t = v = None
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


def _checkpoint_config(step: Path, meta: dict):
    """``hf/config.json`` of a checkpoint, with the label names fine-tuning records in ``meta.json``."""
    conf = _read_config(step / "hf")
    labels = meta.get("labels")
    if _head(conf, str(step)) == "classification" and isinstance(labels, list) and len(labels) == conf.num_labels:
        conf.id2label = {i: str(n) for i, n in enumerate(labels)}
        conf.label2id = {str(n): i for i, n in enumerate(labels)}
    return conf


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in '{directory}' ({e}); the model needs its tokenizer files") from None


def _model_from_state_dict(conf: Any, state: dict[str, torch.Tensor], where: str):
    """A plain eval-mode fp32 model built from ``conf`` on the tensors of ``state`` (not copied).

    transformers' own loader handles meta-device construction, tied weights, non-persistent
    buffers (rotary tables) and key conversions; every missing, unexpected or misshapen key is an
    error (a checkpoint whose ``hf/config.json`` does not describe its weights)."""
    auto = _auto_class(_head(conf, where))
    try:
        cls = auto._model_mapping[type(conf)]
    except KeyError:
        raise UserError(f"{where}: transformers has no {auto.__name__} for model type '{conf.model_type}'") from None
    with _plain_quiet():
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
        dtype: weights dtype: a torch dtype, or fp32/bf16/fp16.

    Returns:
        ``(model, tokenizer)``: an eval-mode ``AutoModelForCausalLM`` or
        ``AutoModelForSequenceClassification`` (by ``architectures``) on CPU with ``use_cache``
        on, and its ``AutoTokenizer`` (the directory's, or the checkpoint's ``hf/tokenizer``).

    Raises:
        UserError: neither kind of directory, or a damaged one.
    """
    p = Path(path)
    name = _ALIASES.get(str(dtype).removeprefix("torch."), str(dtype))
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(name)
    if torch_dtype is None:
        raise UserError(f"dtype '{dtype}' is not one of fp32, bf16, fp16")
    if is_pipeline_checkpoint(p):
        step = resolve_checkpoint(p)
        model = _model_from_state_dict(_checkpoint_config(step, _meta(step)), consolidate(step), str(step)).to(torch_dtype)
        tok_dir = step / "hf" / "tokenizer"
    elif (p / "config.json").is_file():
        auto = _auto_class(_head(_read_config(p), str(p)))
        try:
            with _plain_quiet():
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
    return model, _tokenizer(tok_dir)


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
        output: the directory to publish (written as ``<output>.tmp-<pid>`` first).
        max_shard_size: safetensors files are split above this size (``"2GB"``, or bytes).
        dtype: ``auto`` (the training precision in meta.json), ``fp32``, ``bf16`` or ``fp16``.
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
    step, out = resolve_checkpoint(checkpoint), Path(output)
    if out.resolve() == step.resolve() or out.resolve() in step.resolve().parents:  # --overwrite would delete it
        raise UserError(f"output '{out}' holds the checkpoint {step}; choose an --output outside the training run")
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; choose another --output")
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite to replace it (the old one stays until the new "
                        "export is verified), or choose another --output")
    meta = _meta(step)
    if dtype == "auto":
        dtype = meta.get("precision") if meta.get("precision") in ("bf16", "fp16") else "fp32"
    dtype = _ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise UserError(f"--dtype '{dtype}' is not one of auto, fp32, bf16, fp16")
    if tolerance is not None and not tolerance >= 0:
        raise UserError(f"--tolerance must be a number >= 0, got {tolerance}")
    shard_bytes, torch_dtype = parse_size(max_shard_size), DTYPES[dtype]
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
        if os.environ.get(CORRUPT_ENV) == "1":
            with torch.no_grad():
                model.get_input_embeddings().weight.add_(1.0)
        log(f"export: writing {n_params / 1e6:.1f}M parameters as {dtype} safetensors (shards up to {max_shard_size})")
        with _plain_quiet():
            model.save_pretrained(str(tmp), max_shard_size=shard_bytes)
        del model
        _free_memory()
        _copy_tokenizer(step, tmp)
        conf_json = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        conf_json["dtype"] = conf_json["torch_dtype"] = str(torch_dtype).removeprefix("torch.")  # transformers 5 and 4 keys
        atomic_write_json(tmp / "config.json", conf_json)

        written = _reload_as_fp32(tmp, head, torch_dtype)
        _tokenizer(tmp)
        diff = float((_logits(written, batch) - reference).abs().max())
        del written
        _free_memory()
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

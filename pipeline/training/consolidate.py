"""ZeRO checkpoints -> one fp32 state dict, a tensor at a time: the reader behind the export stage
(and, through it, evaluate and fine-tune starting from a checkpoint).

What a complete step directory holds depends on the ZeRO stage it was trained with (``meta.json``'s
``zero_stage``, else ``ds_config.json``'s, else the files present; R = every rank 0..world-1)::

    stage 0     mp_rank_00_model_states.pt: the module's state dict (weights in the training dtype)
                and the optimizer's state. Trained in bf16/fp16, DeepSpeed's FP16 optimizer keeps
                the fp32 master weights there too: ``fp32_groups_flat`` (one flat tensor per
                parameter group) or, with a non-fused optimizer, ``fp32_groups`` (one per parameter).
    stage 1, 2  mp_rank_00_model_states.pt (names, shapes, no optimizer) and
                [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt (each rank's fp32 partition)
    stage 3     zero_pp_rank_R_mp_rank_00_model_states.pt and [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt

Stages 1-3 go through DeepSpeed's ``zero_to_fp32`` in lazy mode; stage 0, which ``zero_to_fp32``
does not read, is read here from the memory-mapped model states. Either way a tensor is copied out
of the mapped files only when it is consolidated and the pages read are handed back
(:class:`PageOut`): the peak is about one fp32 copy of the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import io
import math
import os
import pickle
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.checkpoint_paths import MODEL_STATES
from pipeline.errors import UserError

# ---------------------------------------------------------------------------- memory


class PageOut:
    """While open, hands this process's resident pages of memory-mapped ``files`` back to the
    kernel (``madvise(MADV_PAGEOUT)``), from a thread every 0.1 s and on :meth:`add`.

    The checkpoint files are read with ``torch.load(mmap=True)`` (DeepSpeed's for the optimizer
    shards, ours for ZeRO-0's model states; transformers maps the safetensors likewise): every page read stays in this process's RSS until the file is closed,
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

    def __enter__(self) -> PageOut:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.run_pass()


def free_memory() -> None:
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


# ---------------------------------------------------------------------------- ZeRO-0


def _storage_key(t: torch.Tensor) -> tuple:
    """Equal for the names of one tied weight (torch.save stores a shared storage once)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())


class _Copy:
    """A tensor of a ZeRO-0 checkpoint, copied out of the mapped file by :meth:`contiguous`.
    ``rounded``: the module's half-precision weight, which an fp32 master weight must round to
    exactly (DeepSpeed's FP16 optimizers copy master -> module after every step): a check that
    the master weights were matched to the right names."""

    def __init__(self, src: torch.Tensor, rounded: torch.Tensor | None = None, where: str = ""):
        self.src, self.rounded, self.where = src, rounded, where

    def contiguous(self) -> torch.Tensor:
        src = self.src.detach()  # master weights are saved as requires_grad leaves
        out = src.to(torch.float32 if src.is_floating_point() else src.dtype, copy=True)
        if self.rounded is not None and not torch.equal(out.to(self.rounded.dtype), self.rounded):
            raise UserError(f"{self.where}: an fp32 master weight does not round to the module's {self.rounded.dtype} "
                            "weight, so the master weights are not in the order this pipeline trains them; the "
                            "checkpoint was not written by this pipeline's training: export another step")
        return out


def _optimizer_groups(params: dict[str, torch.Tensor]) -> list[list[list[str]]]:
    """How the optimizer may have grouped ``params`` (names, in named_parameters order): this
    pipeline's AdamW groups (:func:`pipeline.training.model.param_groups` on stand-ins; DeepSpeed drops
    empty groups), then one group (an optimizer given ``model.parameters()``)."""
    from pipeline.training.model import param_groups

    stand_ins = {n: torch.nn.Parameter(torch.empty(t.shape, device="meta")) for n, t in params.items()}
    name = {id(p): n for n, p in stand_ins.items()}
    ours = [[name[id(p)] for p in g["params"]] for g in param_groups(SimpleNamespace(named_parameters=stand_ins.items), 0.0)]
    return [[g for g in ours if g], [list(params)]]


def _zero0_masters(module: dict, buffers: set[str], opt: dict, where: str) -> dict[str, torch.Tensor]:
    """name -> the fp32 master weight, for a checkpoint trained in bf16/fp16 (else empty: trained in
    fp32, the module's weights are the ones the optimizer updates)."""
    flat, per_param = opt.get("fp32_groups_flat"), opt.get("fp32_groups")
    if flat is None and per_param is None:
        return {}
    params, seen = {}, set()  # trainable parameters as named_parameters lists them: tied ones once
    for n, t in module.items():
        if n not in buffers and _storage_key(t) not in seen:
            seen.add(_storage_key(t))
            params[n] = t
    for groups in _optimizer_groups(params):
        if flat is not None and [sum(params[n].numel() for n in g) for g in groups] == [f.numel() for f in flat]:
            out = {}
            for names, f in zip(groups, flat):  # concatenated in group order, no padding (FP16_Optimizer)
                offset = 0
                for n in names:
                    out[n] = f[offset:offset + params[n].numel()].view(params[n].shape)
                    offset += params[n].numel()
            return out
        if per_param is not None and [[params[n].shape for n in g] for g in groups] == [[t.shape for t in g] for g in per_param]:
            return {n: t for names, g in zip(groups, per_param) for n, t in zip(names, g)}
    sizes = [f.numel() for f in flat] if flat is not None else [sum(t.numel() for t in g) for g in per_param]
    raise UserError(f"{where}: its fp32 master weights ({len(sizes)} group(s) of {sizes} elements) do not match the "
                    f"parameter groups of this pipeline's optimizer over the {len(params)} weights of its module; the "
                    "checkpoint was not written by this pipeline's training: export another step")


def _zero0_state_dict(step: Path) -> dict[str, Any]:
    """The ZeRO-0 counterpart of :func:`_lazy_state_dict`: every entry of the module's state dict
    (tied names share one value), the fp32 master weight in place of a half-precision one."""
    path = step / MODEL_STATES
    try:  # mapped, not read: the optimizer's moments beside the weights are never touched
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        module, opt = sd["module"], sd.get("optimizer") or {}
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is damaged: export another step") from None
    masters = _zero0_masters(module, set(sd.get("buffer_names") or ()), opt if isinstance(opt, dict) else {}, str(path))
    lazy, by_storage = {}, {}
    for n, t in module.items():
        key = _storage_key(t)
        if key not in by_storage:
            by_storage[key] = _Copy(masters[n], t, str(path)) if n in masters else _Copy(t)
        lazy[n] = by_storage[key]
    return lazy


def consolidate_step(step: Path, stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the (resolved, complete) step directory ``step`` of ZeRO ``stage``,
    keyed by the training module's names; tied weights stay one shared tensor. Peak: about one
    fp32 model copy (see the module docstring)."""
    from pipeline.progress import progress_bar

    out: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}  # id of a lazy value (all alive from the start) -> its first name: ties stay ties
    with PageOut(step.glob("*_states.pt")) as pager:
        lazy = _zero0_state_dict(step) if stage == 0 else _lazy_state_dict(step)
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

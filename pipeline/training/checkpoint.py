"""Checkpoints: step-tagged directories, an atomic ``latest``, resume checks.

Layout of ``<output>/checkpoints``::

    latest                 "step-00000200" (replaced atomically, only after every rank wrote)
    step-00000200/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed's own files)
        meta.json          step, consumed samples, world size, ZeRO stage, fingerprints
        config.yaml        the resolved stage config
        ds_config.json     the resolved DeepSpeed config
        hf/                config.json + tokenizer files (what export needs besides weights)
        rng/rank-00000.pt  each rank's RNG states

A checkpoint is written as ``step-N.tmp`` and renamed once complete, so a directory without
the suffix is always whole; ``*.tmp`` directories (a crash during a save) are never loaded
and are removed by the next save.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist, faults
from pipeline.checkpoint_paths import LATEST, STEP_TAG, latest, read_meta, tag_for
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, atomic_write_text, disk_full_error, fsync_dir, is_disk_full


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save a checkpoint every this many optimizer steps (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (0: keep all)."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in <output>/checkpoints if there is one;
    never: start fresh (refused if checkpoints exist, to protect them); or a path to a
    step directory to start from."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.every < 0:
            problems.append(("every", f"must be >= 0 (0: only at the end), got {self.every}"))
        if self.keep_last < 0:
            problems.append(("keep_last", f"must be >= 0 (0: keep all), got {self.keep_last}"))
        return problems


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, meta: dict, files: dict[str, str], hf_files: dict[str, Path], keep_last: int) -> Path:
    """Write checkpoint ``step`` collectively (every rank calls this); returns its directory.

    Args:
        meta: written as ``meta.json`` (rank 0).
        files: name -> text content written into the checkpoint (rank 0).
        hf_files: name -> source path copied into ``hf/`` (files or directories; rank 0).
    """
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    rank = dist.rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    tmp = root / tmp_tag
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)  # ends with a barrier
        faults.pause_in_save(step, tag)  # a test kills the ranks here, mid-write (pipeline/faults.py)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        rng_path = tmp / "rng" / f"rank-{rank:05d}.pt"
        torch.save(_rng_state(), str(rng_path) + ".part")
        os.replace(str(rng_path) + ".part", rng_path)
        if rank == 0:
            for name, text in files.items():
                atomic_write_text(tmp / name, text)
            hf = tmp / "hf"
            hf.mkdir(exist_ok=True)
            for name, src in hf_files.items():
                if Path(src).is_dir():
                    shutil.copytree(src, hf / name, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, hf / name)
            atomic_write_json(tmp / "meta.json", {**meta, "step": step, "tag": tag})
    except (OSError, RuntimeError) as e:
        # The partial directory is never loaded (no rename); free its space, and say plainly
        # when the disk is full (torch.save reports that as a bare RuntimeError). The other
        # ranks wait in a barrier: the launcher stops them when this rank exits.
        full = is_disk_full(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full_error(tmp, f"checkpoint {tag}", fix="set output= to a directory on another filesystem") from None
        raise
    dist.barrier()  # every rank's files are in place
    if rank == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, tag)
        _prune(root, keep_last)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.iterdir() if STEP_TAG.match(p.name))
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)


def find_resume(resume: str, root: Path) -> Path | None:
    """Resolve ``checkpoint.resume`` to a checkpoint directory (or None for a fresh start)."""
    if resume == "auto":
        return latest(root, use="set checkpoint.resume to")
    if resume == "never":
        if (root / LATEST).exists():
            raise UserError(
                f"checkpoint.resume=never but {root} already holds checkpoints; choose another output, "
                "delete them, or use checkpoint.resume=auto to continue"
            )
        return None
    path = Path(resume)
    if (path / LATEST).exists():
        return latest(path, use="set checkpoint.resume to")
    if not (path / "meta.json").exists():
        raise UserError(
            f"checkpoint.resume='{resume}' "
            f"{'does not exist' if not path.exists() else 'is not a checkpoint of this pipeline (no meta.json)'}; "
            "give a step-NNNNNNNN directory, a checkpoints directory, auto or never"
        )
    return path


def check_compatible(path: Path, meta: dict, current: dict) -> None:
    """Refuse a checkpoint that this run cannot continue, naming what differs and what to do."""
    problems = []
    if meta.get("architecture") != current["architecture"]:
        problems.append(f"the model architecture differs (checkpoint {meta.get('model_summary')}, this run {current['model_summary']})")
    if meta.get("tokenizer_fingerprint") != current["tokenizer_fingerprint"]:
        problems.append("the data was tokenized with another tokenizer")
    check_world_size(path, meta, current["world_size"])  # a universal checkpoint resumes on any number of ranks
    if meta.get("zero_stage") != current["zero_stage"]:
        problems.append(f"it uses ZeRO stage {meta.get('zero_stage')} and this run stage {current['zero_stage']}; use the same ds_config")
    if problems:
        raise UserError(f"cannot resume from {path}: " + "; ".join(problems))


def load(engine, path: Path, universal: bool = False) -> None:
    """Load DeepSpeed state and this rank's RNG state from checkpoint ``path``.

    Args:
        universal: ``path`` is a universal checkpoint (:func:`to_universal`); the engine was
            initialised with ``checkpoint.load_universal`` (:func:`ds_overrides_for`).
    """
    opt = getattr(engine, "optimizer", None)
    decay = [g.get("weight_decay") for g in getattr(opt, "param_groups", [])]
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load {path}; the checkpoint is incomplete or damaged")
    if universal:
        # DeepSpeed's ZeRO-3 universal load copies the hyperparameters of the first parameter
        # group onto every group, which would put weight decay on biases and norms; the groups
        # are this run's own (pipeline.training.model.param_groups), so their decay is restored.
        for group, wd in zip(opt.param_groups, decay):
            group["weight_decay"] = wd
    rng = path / "rng" / f"rank-{dist.rank():05d}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))


# ---------------------------------------------------------------------------- world-size changes
UNIVERSAL_SUFFIX = "-universal"
CONVERT_SCRIPT = "launch/convert_checkpoint.py"


def convert_command(path: Path) -> str:
    """The command that converts checkpoint ``path`` for a different number of ranks."""
    return f"python {CONVERT_SCRIPT} --checkpoint {path}"


def universal_path(path: Path) -> Path:
    """Where :func:`to_universal` writes the universal form of step directory ``path`` by default."""
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def check_world_size(path: Path, meta: dict, world: int) -> bool:
    """Whether resuming from ``path`` needs DeepSpeed's universal loading (a converted checkpoint).

    A regular checkpoint resumes only with the number of data-parallel ranks that wrote it: ZeRO
    partitions the optimizer state (and under ZeRO-3 the weights) per rank. A universal
    checkpoint holds every parameter's state whole and resumes with any number of ranks.

    Raises:
        UserError: a regular checkpoint of another world size; the message gives the command
            that converts it and the resume key to use after.
    """
    if meta.get("universal"):
        return True
    written = meta.get("world_size")
    if written is None or int(written) == int(world):
        return False
    target = universal_path(path)
    raise UserError(
        f"cannot resume from {path}: it was written by {written} data-parallel rank(s) and this run has {world}; "
        f"ZeRO partitions the optimizer state per rank. Either rerun with {written} rank(s), or convert it once to a "
        f"DeepSpeed universal checkpoint (any number of ranks; the original is left as it is) with `{convert_command(path)}` "
        f"and resume from that with checkpoint.resume={target}")


def to_universal(path: Path, output: Path | None = None, log=print) -> Path:
    """Convert a step directory into a universal checkpoint that resumes on any number of ranks.

    DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) writes every parameter's
    fp32 weight and Adam moments whole; this pipeline's files (``meta.json`` marked
    ``"universal": true``, ``config.yaml``, ``ds_config.json``, ``hf/``) go beside them. Written as
    ``.<output>.tmp-<pid>/<output>`` and renamed once complete; ``path`` is only read.

    Args:
        path: a complete step directory (``step-NNNNNNNN``) of this pipeline.
        output: the directory to create (default ``<path>-universal`` beside it); must not exist.

    Raises:
        UserError: ``path`` is not a complete regular checkpoint, or ``output`` exists.
    """
    import argparse
    import contextlib
    import io

    path = Path(path)
    meta = read_meta(path) if (path / "meta.json").is_file() else None
    if meta is None or not any(path.glob("*_optim_states.pt")) or path.name.endswith(".tmp"):
        raise UserError(f"'{path}' is not a complete checkpoint of this pipeline (a step-NNNNNNNN directory with meta.json "
                        "and DeepSpeed's *_optim_states.pt); give one such directory")
    if meta.get("universal"):
        raise UserError(f"'{path}' is a universal checkpoint already; resume from it with checkpoint.resume={path}")
    out = Path(output) if output is not None else universal_path(path)
    if out.exists():
        raise UserError(f"'{out}' already exists; resume from it (checkpoint.resume={out}) or delete it to convert again")
    # DeepSpeed writes a `latest_universal` file beside its output folder: a private staging
    # directory keeps it (and any partial output) out of the checkpoints directory
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tmp = staging / out.name
    from deepspeed.checkpoint import ds_to_universal

    # one worker each: DeepSpeed's process pools would fork a copy of this process per worker
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    t0 = time.time()
    log(f"convert: {path} (ZeRO-{meta.get('zero_stage')}, {meta.get('world_size')} rank(s)) -> universal checkpoint {out}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        for name in ("config.yaml", "ds_config.json"):
            if (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
        if (path / "hf").is_dir():
            shutil.copytree(path / "hf", tmp / "hf")
        atomic_write_json(tmp / "meta.json", {**meta, "universal": True, "converted_from": str(path.resolve())})
        fsync_dir(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        if is_disk_full(e, out.parent):
            raise disk_full_error(staging, f"universal checkpoint {out}", fix="free space or give another --output") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"convert: wrote {out} ({time.time() - t0:.1f} s); resume with checkpoint.resume={out} and any number of ranks")
    return out

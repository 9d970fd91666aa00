"""Where a checkpoint of this pipeline lies on disk and when it is complete: paths only, no torch.

A training run writes (:mod:`pipeline.training.checkpoint`)::

    <run>/checkpoints/latest                 the tag of the newest complete step, replaced atomically
    <run>/checkpoints/step-NNNNNNNN/         meta.json, hf/config.json, hf/tokenizer/, DeepSpeed's files
    <run>/checkpoints/step-NNNNNNNN.tmp/     a save in progress: never read

One reader of that layout for every stage: resume (train, finetune), export, evaluate and the
model-directory check (:mod:`pipeline.inputs`). DeepSpeed's files a complete step holds depend
on its ZeRO stage (R = every rank 0..world-1)::

    ZeRO-0      mp_rank_00_model_states.pt (module weights; bf16/fp16 runs keep the fp32 masters there too)
    ZeRO-1/2    mp_rank_00_model_states.pt and [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt
    ZeRO-3      zero_pp_rank_R_mp_rank_00_model_states.pt and [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from pipeline.errors import UserError

LATEST = "latest"
STEP_TAG = re.compile(r"^step-(\d{8})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
"""The model states of ZeRO-0/1/2 (a ZeRO-3 rank writes ``zero_pp_rank_R_mp_rank_00_model_states.pt``)."""
_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
EXPECTED = ("a step directory of this pipeline (step-NNNNNNNN/ holding meta.json, hf/config.json and DeepSpeed's "
            "*_model_states.pt, plus its *_optim_states.pt under ZeRO-1/2/3), a checkpoints/ directory with a `latest` "
            "file, or a training run directory holding checkpoints/latest")
NO_CHECKPOINT_YET = ("train it until a checkpoint is saved (one every checkpoint.every steps, and one when it reaches "
                     "train.max_steps or is preempted), or give the step directory of another run")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_steps(root: Path) -> list[Path]:
    """The complete step directories under a ``checkpoints/`` directory, oldest first."""
    return sorted(p for p in root.glob("step-*") if STEP_TAG.match(p.name) and (p / "meta.json").is_file())


def latest(root: Path, *, use: str = "give") -> Path | None:
    """The step directory ``root/latest`` names; None when there is no ``latest`` yet.

    Args:
        use: how the message tells the user to name a step instead (``"give"``,
            ``"set checkpoint.resume to"``).

    Raises:
        UserError: ``latest`` names a step that is not complete (or not there).
    """
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text(encoding="utf-8").strip()
    if STEP_TAG.match(tag) and (root / tag / "meta.json").is_file():
        return root / tag
    found = complete_steps(root)
    fix = (f"{use} one of its step directories instead ({', '.join(str(p) for p in found[-3:])})" if found
           else f"it holds no complete step directory yet: {NO_CHECKPOINT_YET}")
    raise UserError(f"{marker} names '{tag}', which is not a complete checkpoint; {fix}")


def read_meta(step: Path) -> dict:
    """A step's ``meta.json`` (a damaged one is the user's to replace: another step)."""
    try:
        return json.loads((step / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {step / 'meta.json'} ({e}); the checkpoint is damaged: use another step "
                        "directory of the run") from None


def zero_stage(step: Path, meta: dict) -> int:
    """The ZeRO stage ``step`` was trained with: ``meta.json``'s, else ``ds_config.json``'s, else
    what the files say (per-rank model states: 3; per-rank optimizer shards: 1/2; neither: 0)."""
    stage = meta.get("zero_stage")
    if not isinstance(stage, int) or isinstance(stage, bool):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            ds = json.loads((step / "ds_config.json").read_text(encoding="utf-8"))
            stage = (ds.get("zero_optimization") or {}).get("stage", 0)  # DeepSpeed's default: 0
    if isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3:
        return stage
    kinds = {m[2] for m in map(_SHARD.match, os.listdir(step)) if m}
    return 3 if "model" in kinds else 2 if "optim" in kinds else 0


def missing_files(step: Path, meta: dict, stage: int) -> list[str]:
    """The files a complete checkpoint of ZeRO ``stage`` needs that ``step`` lacks, by name and rank
    (the ranks: ``meta.json``'s ``world_size``, else those the files present number)."""
    names = set(os.listdir(step))
    have = {(m[2], int(m[1])) for m in map(_SHARD.match, names) if m}
    world = meta.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        world = 1 + max((rank for _, rank in have), default=0)
    prefix = "bf16_" if meta.get("precision") == "bf16" else ""  # DeepSpeed names a bf16 run's shards so
    missing = [] if (step / "hf" / "config.json").is_file() else ["hf/config.json"]
    if stage == 3:
        missing += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world) if ("model", r) not in have]
    elif MODEL_STATES not in names:
        missing.append(MODEL_STATES)
    if stage >= 1:
        missing += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world) if ("optim", r) not in have]
    return missing


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete step directory a checkpoint path means.

    Args:
        path: a step directory, a ``checkpoints/`` directory (its ``latest``) or a run directory
            (``<run>/checkpoints/latest``).

    Raises:
        UserError: a missing path, a directory that is not a checkpoint of this pipeline, or an
            incomplete checkpoint; the message says what was expected.
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint '{p}' {'is a file' if p.exists() else 'does not exist'}; give {EXPECTED}")
    if (p / LATEST).is_file():
        step = latest(p)
    elif (p / "checkpoints" / LATEST).is_file():
        step = latest(p / "checkpoints")
    elif (p / "checkpoints").is_dir():
        raise UserError(f"'{p}' is a run directory without a complete checkpoint (no checkpoints/latest); {NO_CHECKPOINT_YET}")
    else:
        step = p
    if step.name.endswith(".tmp"):
        raise UserError(f"'{step}' is a checkpoint whose save did not finish (.tmp); give a complete step directory")
    if not (step / "meta.json").is_file():
        hint = " (it looks like a Hugging Face model directory, which needs no export)" if (p / "config.json").is_file() else ""
        raise UserError(f"'{p}' is not a checkpoint of this pipeline (no meta.json){hint}; give {EXPECTED}")
    if (step / "zero").is_dir() and not any(step.glob("*_optim_states.pt")):  # launch/convert_checkpoint.py's output
        raise UserError(f"'{step}' is a DeepSpeed universal checkpoint (for resuming on another number of ranks), which "
                        "only a resume reads; give the regular checkpoint it was converted from (converted_from in "
                        "its meta.json) or one the resumed run wrote")
    meta = read_meta(step)
    stage = zero_stage(step, meta)
    if missing := missing_files(step, meta, stage):
        world = meta.get("world_size")
        ranks = f", {world} rank{'s' * (world != 1)}" if isinstance(world, int) else ""
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UserError(f"checkpoint '{step}' (ZeRO-{stage}{ranks}) is incomplete (missing {shown}); give another step "
                        "directory of the run")
    return step


def is_pipeline_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves to a complete checkpoint of this pipeline (never raises)."""
    try:
        resolve_checkpoint(path)
    except (UserError, OSError):
        return False
    return True

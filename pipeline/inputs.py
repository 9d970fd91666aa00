"""One check per kind of input the stages share: a model directory, an output directory, a
data file. Every stage calls these before any heavy work (no torch import, no process
group), so the same input gets the same answer from train, finetune, evaluate, export and
plan, and a stage's message names the config key the user typed.

Each check raises one :class:`~pipeline.errors.UserError` that says what is wrong with the
path and how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.checkpoint_paths import resolve_checkpoint
from pipeline.errors import UserError

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
"""Index files of sharded Hugging Face weights (their ``weight_map`` names the shard files)."""
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.txt", "vocab.json")
_CHECKPOINT_MARKS = ("meta.json", "latest", "checkpoints")  # a step, checkpoints/ or run directory of this pipeline
CHECKPOINT = "a checkpoint of this pipeline (a run directory, its checkpoints/ or a step-NNNNNNNN/ directory)"
HF_OR_CHECKPOINT = ("a Hugging Face model directory (config.json and its weights) or a checkpoint of this pipeline "
                    "(a run directory, its checkpoints/ or a step-NNNNNNNN/ directory)")


@dataclass(frozen=True)
class ModelSource:
    """What a model path turned out to be."""

    kind: Literal["hf", "checkpoint"]
    path: Path
    """The path as given."""
    config_dir: Path
    """The directory holding config.json (a checkpoint's ``step-N/hf``)."""
    tokenizer_dir: Path
    """Where the tokenizer files are (a checkpoint's ``step-N/hf/tokenizer``)."""
    step_dir: Path | None = None
    """The resolved step directory of a checkpoint (None for a Hugging Face directory)."""

    @property
    def config(self) -> dict:
        """config.json as a dict (checked readable by :func:`check_model`)."""
        return json.loads((self.config_dir / "config.json").read_text(encoding="utf-8"))


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is laid out as a checkpoint of this pipeline (complete or not)."""
    p = Path(path)
    return any((p / m).exists() for m in _CHECKPOINT_MARKS)


def _read_config(config: Path, key: str, shown: str) -> dict:
    try:
        d = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{key} '{shown}': cannot read {config} ({type(e).__name__}: {e}); the model directory is "
                        "damaged: copy its config.json again") from None
    if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
        raise UserError(f"{key} '{shown}': {config} has no model_type, so transformers cannot build the model; "
                        "give a config.json written by save_pretrained")
    return d


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face directory (what from_pretrained would read)."""
    d = Path(directory)
    found = {p for g in _WEIGHT_GLOBS for p in d.glob(g) if p.is_file()}
    return sorted(found)


def _check_weights(d: Path, key: str, shown: str) -> None:
    for index in WEIGHT_INDEXES:
        if (d / index).is_file():
            try:
                shards = set(json.loads((d / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{key} '{shown}': cannot read {d / index} ({type(e).__name__}: {e}); copy the model's "
                                "weight index again") from None
            missing = sorted(s for s in shards if not (d / s).is_file())
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise UserError(f"{key} '{shown}' lacks weight shard(s) {', '.join(missing[:3])}{more} named in {index}; "
                                "copy or download the missing files into that directory")
            return
    if not weight_files(d):
        raise UserError(f"{key} '{shown}' has config.json but no weights (no *.safetensors or *.bin file); copy or "
                        "download the model's weight files into it, or give another model directory")


def check_model(path: str | os.PathLike, key: str, *, checkpoint: bool = True, hf: bool = True,
                weights: bool = True) -> ModelSource:
    """Check a model path: a Hugging Face directory (with ``hf``) or a pipeline checkpoint (with
    ``checkpoint``).

    Args:
        path: what the user gave.
        key: the config key or flag it came from (``model.path``, ``--checkpoint``), named in errors.
        checkpoint: whether a checkpoint of this pipeline is accepted here.
        hf: whether a Hugging Face model directory is accepted here (export takes checkpoints only).
        weights: whether the weights must be present (the planner reads only config.json).

    Raises:
        UserError: a missing path, a file, a directory that is neither kind, a damaged
            config.json, missing weights or shards, or an incomplete checkpoint.
    """
    shown = str(path)
    expected = HF_OR_CHECKPOINT if checkpoint and hf else CHECKPOINT if checkpoint else "a Hugging Face model directory"
    if not shown.strip():
        raise UserError(f"{key} is empty; give {expected}")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key} '{shown}' does not exist; give {expected}")
    if not p.is_dir():
        raise UserError(f"{key} '{shown}' is a file; give {expected}")
    if (p / "config.json").is_file() and not (p / "meta.json").is_file():
        if not hf:
            raise UserError(f"{key} '{shown}' is a Hugging Face model directory, which needs no export; give {expected}")
        _read_config(p / "config.json", key, shown)
        if weights:
            _check_weights(p, key, shown)
        return ModelSource("hf", p, p, p)
    if looks_like_checkpoint(p):
        try:
            step = resolve_checkpoint(p)
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
        if not checkpoint:
            raise UserError(f"{key} '{shown}' is a checkpoint of this pipeline; this stage reads Hugging Face model "
                            f"directories: export it first (python launch/export.py --checkpoint {shown} --output DIR)")
        _read_config(step / "hf" / "config.json", key, shown)
        return ModelSource("checkpoint", p, step / "hf", step / "hf" / "tokenizer", step)
    raise UserError(f"{key} '{shown}' is neither a Hugging Face model directory (no config.json) nor a checkpoint of "
                    f"this pipeline (no meta.json, checkpoints/ or latest); give {expected}")


def max_positions(config: Any) -> int | None:
    """Longest sequence a model accepts in tokens, when its config (object or dict) says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(config: Any, seq_len: int, *, what: str, fix: str) -> None:
    """Refuse a sequence longer than the model's positions.

    Learned position tables (GPT-2) cannot index past their size, and a RoPE model's config
    would advertise fewer positions than it was trained on, so both are refused alike.

    Args:
        what: the sequence length's setting and the model, e.g. ``"data.seq_len=128 ... model.path 'X'"``.
        fix: what to change.
    """
    positions = max_positions(config)
    if positions is not None and seq_len > positions:
        raise UserError(f"{what}={seq_len} is beyond the model's {positions} positions; {fix}")


def check_output(path: str | os.PathLike, key: str = "output", *, inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Path:
    """Check an output directory before anything is written.

    Refuses an empty path, an existing regular file, a path under a file, and an output
    that is one of the run's inputs or holds one (replacing the output would delete it).

    Args:
        key: the setting it came from (``output``, ``--output``).
        inputs: ``(key, path)`` of the stage's inputs.
    """
    shown = str(path)
    if not shown.strip():
        raise UserError(f"{key} is empty; give the directory to write to")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{key} '{shown}' is an existing file, not a directory; choose another {key} (this stage "
                        "writes a directory there)")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{key} '{shown}' lies under '{parent}', which is a file; choose another {key}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key} '{shown}': no permission to write in '{parent}'; choose a {key} where you can write")
    resolved = out.resolve()
    for in_key, in_path in inputs:
        if not str(in_path).strip():
            continue
        src = Path(in_path).resolve()
        if src == resolved or resolved in src.parents:
            raise UserError(f"{key} '{shown}' {'is' if src == resolved else 'holds'} {in_key} '{in_path}': the run would "
                            f"write over its own input; choose another {key}")
    return out


def check_data_file(path: str | os.PathLike, key: str, what: str) -> Path:
    """Check a data file the stage reads as a whole (JSONL/CSV records).

    Args:
        key: the setting (``sft.train``).
        what: what it should hold, for the fix (``"a JSONL file of chat examples"``).
    """
    shown = str(path)
    if not shown.strip():
        raise UserError(f"{key} is empty; set it to {what}")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key} '{shown}' does not exist; set it to {what}")
    if p.is_dir():
        raise UserError(f"{key} '{shown}' is a directory; set it to {what}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{key} '{shown}' is not readable (permission denied); fix its permissions or copy it")
    if p.stat().st_size == 0:
        raise UserError(f"{key} '{shown}' is empty; set it to {what}")
    return p


def data_files(spec: str, key: str, what: str, *, suffixes: tuple[str, ...] = (".jsonl", ".jsonl.gz")) -> list[Path]:
    """The files a data setting names, each checked by :func:`check_data_file`.

    ``spec`` is one or more parts separated by commas; a part is a file, a glob (``data/*.jsonl``,
    ``**`` allowed) or a directory (its files ending in one of ``suffixes``, recursively,
    hidden ones skipped). Every part must name at least one file.

    Args:
        key: the setting (``sft.train``), named in errors.
        what: what it should hold, for the fix (``"a JSONL file of chat examples"``).
        suffixes: the files a directory contributes.
    """
    import glob

    out: list[Path] = []
    for part in (s.strip() for s in str(spec).split(",")):
        if not part:
            continue
        if glob.has_magic(part):
            found = [Path(f) for f in sorted(glob.glob(part, recursive=True)) if Path(f).is_file()]
            if not found:
                raise UserError(f"{key}: no file matches '{part}'; set it to {what}")
        elif Path(part).is_dir():
            found = sorted(f for f in Path(part).rglob("*") if f.is_file() and f.name.endswith(suffixes)
                           and not any(x.startswith(".") for x in f.relative_to(part).parts))
            if not found:
                raise UserError(f"{key} '{part}' is a directory without {' or '.join('*' + x for x in suffixes)} files; "
                                f"set it to {what}")
        else:
            found = [Path(part)]
        out.extend(check_data_file(f, key, what) for f in found if f not in out)
    if not out:
        raise UserError(f"{key} is empty; set it to {what}")
    return out

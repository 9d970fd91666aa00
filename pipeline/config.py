"""One config system for every stage: typed dataclasses, YAML files, dotted overrides.

A stage config is a dataclass whose fields each carry a docstring (a string literal on the
line after the field). It is built from, in order of precedence:

1. the dataclass defaults,
2. a YAML file (``--config FILE``): mappings merge into the defaults, lists replace them,
3. dotted ``key=value`` overrides (``data.seq_len=512``, ``sources.0.weight=2``); values
   are parsed as YAML, so ``sources=[{path: a.txt}]`` replaces a whole list -- except that a
   text field takes the text as typed (``name=007`` is "007", not 7; ``name=null`` is None
   only where the field may be null).

Every unknown key, wrong type and inconsistent value (a dataclass's ``check()``) is
collected into ONE :class:`~pipeline.errors.ConfigError` naming each key and the fix. An
unknown key that another tool spells differently (``learning_rate``, ``max_seq_length``) or that
belongs to another section is pointed at its name here (:data:`_ALIASES`); a DeepSpeed JSON given
as ``--config`` is one problem saying where it goes, not one per key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from pipeline.errors import ConfigError, UserError

Problems = list[tuple[str, str]]


# ---------------------------------------------------------------------------- docs


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field of dataclass ``cls`` (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """A short human-readable name of a field type (``int``, ``bpe | unigram``, ...)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def describe_keys(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """Every leaf key of ``cls`` as ``(dotted key, type name, default, doc)``.

    Lists of dataclasses are described through a generic element (``sources.N.path``).
    ``defaults`` is the instance whose values are shown (a parent's default may differ from
    the nested class's own).
    """
    rows: list[tuple[str, str, Any, str]] = []
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, key + ".", default))
            continue
        elem = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if elem is not None and dataclasses.is_dataclass(elem):
            shown = to_dict(default)
            rows.append((key, f"list of {elem.__name__}", shown, docs.get(f.name, "")))
            rows.extend(describe_keys(elem, key + ".N."))
            continue
        rows.append((key, type_name(tp), to_dict(default), docs.get(f.name, "")))
    return rows


def help_text(cls: type) -> str:
    """``--help`` body: every key with its type, default and docstring."""
    out = []
    for key, tname, default, doc in describe_keys(cls):
        out.append(f"  {key}  ({tname}; default: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()})")
        for line in textwrap.wrap(doc, 88) or ["(undocumented)"]:
            out.append(f"      {line}")
    return "\n".join(out)


# ---------------------------------------------------------------------------- to/from dict


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data for a config object (recursively)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    """YAML text of a config that loads back to the same values (``--print-config``, saved runs).

    Non-ASCII text is written as is where PyYAML reads it back unchanged; it is not for a
    NEL (U+0085) inside single quotes, which reads back as a space, so then every non-ASCII
    character is escaped instead.
    """
    data = to_dict(obj)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != data:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False)
    return text


# Names users bring from other tools -> (names here, a note where the meaning differs). From the
# Hugging Face Trainer (TrainingArguments) and TRL, DeepSpeed JSON, Megatron-LM / GPT-NeoX and
# nanoGPT. A name here is a leaf key, or a dotted tail of one (``tokenizer.path``); the first one
# the stage's config has wins, in the section the key was written in, else anywhere in the config.
# tests/test_config.py checks that every name here exists in some stage's config.
_STEPS_NOT_EPOCHS = "training length is counted in optimizer steps here, not epochs"
_ALIASES: dict[str, tuple[tuple[str, ...], str]] = {
    "learning_rate": (("lr",), ""),
    "per_device_train_batch_size": (("micro_batch_size",), ""),
    "train_micro_batch_size_per_gpu": (("micro_batch_size",), ""),
    "gradient_accumulation_steps": (("grad_accum",), ""),
    "train_batch_size": (("global_batch_size",), ""),
    "num_train_epochs": (("max_steps",), _STEPS_NOT_EPOCHS),
    "epochs": (("max_steps",), _STEPS_NOT_EPOCHS),
    "train_iters": (("max_steps",), ""),
    "max_iters": (("max_steps",), ""),
    "warmup_ratio": (("warmup_steps",), "warm-up is counted in optimizer steps here, not as a fraction"),
    "warmup_iters": (("warmup_steps",), ""),
    "lr_warmup_iters": (("warmup_steps",), ""),
    "lr_scheduler_type": (("schedule",), ""),
    "lr_decay_style": (("schedule",), ""),
    "min_lr": (("min_lr_ratio",), "a fraction of lr here, not a learning rate"),
    "max_grad_norm": (("grad_clip",), ""),
    "gradient_clipping": (("grad_clip",), ""),
    "clip_grad": (("grad_clip",), ""),
    "adam_beta1": (("beta1",), ""),
    "adam_beta2": (("beta2",), ""),
    "adam_epsilon": (("eps",), ""),
    "adam_eps": (("eps",), ""),
    "max_seq_length": (("seq_len",), ""),
    "max_seq_len": (("seq_len",), ""),
    "seq_length": (("seq_len",), ""),
    "block_size": (("seq_len",), ""),
    "context_length": (("seq_len",), ""),
    "output_dir": (("output",), ""),
    "save_steps": (("checkpoint.every",), ""),
    "save_interval": (("checkpoint.every",), ""),
    "save_total_limit": (("keep_last",), ""),
    "logging_steps": (("log_every",), ""),
    "log_interval": (("log_every",), ""),
    "eval_steps": (("eval_every",), ""),
    "eval_interval": (("eval_every",), ""),
    "eval_iters": (("eval_batches",), ""),
    "per_device_eval_batch_size": (("batch_size",), ""),
    "limit": (("max_batches",), "lm-evaluation-harness's limit: documents per task"),
    "gradient_checkpointing": (("activation_checkpointing",), ""),
    "checkpoint_activations": (("activation_checkpointing",), ""),
    "tiled_mlp_compute": (("tiled_mlp",), ""),  # ArcticTraining's name
    "activation_checkpoint_cpu_offload": (("activation_offload",), ""),  # ArcticTraining's name
    "min_doc_tokens": (("min_tokens",), ""),
    "sp_size": (("sequence_parallel_size",), ""),
    "ulysses_degree": (("sequence_parallel_size",), ""),
    "bf16": (("precision",), "one key: precision=bf16"),
    "fp16": (("precision",), "one key: precision=fp16"),
    "model_name_or_path": (("model.path", "model"), ""),
    "tokenizer_name_or_path": (("tokenizer.path",), ""),
    "tokenizer_name": (("tokenizer.path",), ""),
    "deepspeed_config": (("deepspeed.config",), ""),
    "dataset_text_field": (("text_field",), ""),
    "num_hidden_layers": (("num_layers",), ""),
    "n_layer": (("num_layers",), ""),
    "num_attention_heads": (("num_heads",), ""),
    "n_head": (("num_heads",), ""),
    "num_key_value_heads": (("num_kv_heads",), ""),
    "n_embd": (("hidden_size",), ""),
    "d_model": (("hidden_size",), ""),
    "ffn_hidden_size": (("intermediate_size",), ""),
    "n_positions": (("max_position_embeddings",), ""),
}


@lru_cache(maxsize=None)
def leaf_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every leaf key of dataclass ``cls``, dotted (``data.seq_len``; list elements as ``sources.N.path``)."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp, key = _hints(cls)[f.name], f"{prefix}{f.name}"
        elem = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            out.extend(leaf_keys(tp, key + "."))
        elif elem is not None and dataclasses.is_dataclass(elem):
            out.extend(leaf_keys(elem, key + ".N."))
        else:
            out.append(key)
    return tuple(out)


def _suggest(name: str, valid: list[str], root: type | None = None) -> str:
    """The message for unknown key ``name`` among ``valid``: another tool's name for one of them
    (:data:`_ALIASES`), a key of that name in another section of ``root``, else a close spelling."""
    names, note = _ALIASES.get(name, ((), ""))
    hint = ""
    for target in (*names, name):
        if target in valid:
            hint = f"'{target}'"
        elif root is not None:
            found = [k for k in leaf_keys(root) if k == target or k.endswith("." + target)]
            hint = " or ".join(f"'{k}'" for k in found)
        if hint:
            hint = f"did you mean {hint}? " + (f"({note}) " if note and target in names else "")
            break
    if not hint:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}valid keys here: {', '.join(valid)}"


# Top-level keys of a DeepSpeed JSON; the first three appear in no stage recipe and mark one.
_DEEPSPEED_MARKS = ("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size")
_DEEPSPEED_KEYS = {
    *_DEEPSPEED_MARKS, "gradient_accumulation_steps", "optimizer", "scheduler", "fp16", "bf16", "amp", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "flops_profiler", "comms_logger", "aio", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "data_types", "sparse_attention", "elasticity",
    "tensorboard", "wandb", "csv_monitor", "memory_breakdown", "sequence_parallel_size", "checkpoint",
    "compression_training", "dump_state", "data_efficiency", "autotuning",
}


def _deepspeed_problem(cls: type, config_file: str, loaded: dict) -> str | None:
    """The one problem to report when ``loaded`` is a DeepSpeed JSON rather than a ``cls`` recipe."""
    keys = {str(k) for k in loaded if not str(k).startswith("_")}  # "_comment": stripped by the pipeline
    ds = keys & _DEEPSPEED_KEYS
    if not ds & set(_DEEPSPEED_MARKS) or len(ds) <= len(keys - ds):
        return None
    ordered = [k for k in _DEEPSPEED_MARKS if k in ds] + sorted(ds - set(_DEEPSPEED_MARKS))
    shown = ", ".join(ordered[:3]) + (", ..." if len(ds) > 3 else "")
    where = (f"pass it as deepspeed.config={config_file} and give --config a recipe for this stage (or none)"
             if "deepspeed.config" in leaf_keys(cls) else
             "this stage takes no DeepSpeed config (the training stages take one as deepspeed.config=FILE); give "
             "--config a recipe for this stage (see --help)")
    return f"'{config_file}' is a DeepSpeed config ({shown}), not a recipe: {where}"


_NULLS = ("null", "Null", "NULL", "~")


class _Override:
    """A value given on the command line: its YAML value and the text it was parsed from.

    A text field takes the text as typed (``name=007``, ``name=yes``, ``name=0x1F``,
    ``output=C:`` stay text instead of becoming 7, True, 31 and a mapping); every other field
    takes the YAML value.
    """

    __slots__ = ("value", "text")

    def __init__(self, value: Any, text: str):
        self.value, self.text = value, text


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, _Override) else value


def _plain(value: Any) -> Any:
    """``value`` with every :class:`_Override` inside replaced by its YAML value."""
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str, problems: Problems, root: type | None = None) -> Any:
    """Convert ``value`` to type ``tp`` or record a problem and return ``None``.

    ``root``: the stage's config class, for unknown keys that belong to another section.
    """
    origin, args = get_origin(tp), get_args(tp)
    text = value.text if isinstance(value, _Override) else None  # the override as typed
    if origin in (Union, types.UnionType):
        # null as a word (not "#...", a YAML comment, nor "" for a text field)
        if type(None) in args and (text.strip() in _NULLS if text is not None else value is None):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, problems, root)
        problems.append((key, f"unsupported union type {type_name(tp)}"))
        return None
    if text is not None and (tp is str or (origin is Literal and text in args)):
        return text
    value = _unwrap(value)  # containers keep their elements' text, for the elements' types
    if tp is Any:
        return _plain(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems, root)
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, (int, float, bool)) and str(value) == str(choice)):
                return choice
        problems.append((key, f"got {_plain(value)!r}; must be one of: {', '.join(map(str, args))}"))
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append((key, f"expected a list, got {_plain(value)!r}"))
            return None
        return [_coerce(v, args[0], f"{key}.{i}", problems, root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append((key, f"expected a mapping, got {_plain(value)!r}"))
            return None
        return {str(k): _coerce(v, args[1], f"{key}.{k}", problems, root) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        problems.append((key, f"expected true or false, got {_plain(value)!r}"))
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:  # accept 1e6 and "1e6" when integral
            f = float(value) if not isinstance(value, bool) else math.nan
            if f.is_integer():
                return int(f)
        except (TypeError, ValueError):
            pass
        problems.append((key, f"expected an integer, got {_plain(value)!r}"))
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads 3e-4 as a string
            return float(value) if isinstance(value, str) else _fail()
        except (TypeError, ValueError):
            problems.append((key, f"expected a number, got {_plain(value)!r}"))
            return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append((key, f"expected a string, got {_plain(value)!r}"))
        return None
    if tp is Any:
        return value
    raise TypeError(f"config field {key} has unsupported type {tp!r}")  # a bug in a config class


def _fail() -> Any:
    raise ValueError


def _build(cls: type, data: Any, prefix: str, problems: Problems, root: type | None = None) -> Any:
    root = root or cls
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append((prefix, f"expected a mapping of keys for {where}, got {_plain(data)!r}"))
        return cls()
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            problems.append((f"{prefix}.{k}" if prefix else str(k), _suggest(str(k), names, root)))
    kwargs = {}
    before = len(problems)
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], _hints(cls)[f.name], key, problems, root)
    if len(problems) > before:
        # Build with defaults for broken fields so later checks still run on the rest.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        reported = {k for k, _ in problems[before:]}
        for key, msg in obj.check():
            full = f"{prefix}.{key}" if prefix and key else (key or prefix)
            # A field that failed to parse holds its default: its checks would mislead.
            if not any(full == r or full.startswith(r + ".") for r in reported):
                problems.append((full, msg))
    return obj


# ---------------------------------------------------------------------------- merging


def _merge(base: Any, new: Any) -> Any:
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return new


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``3``, ``true``, ``[a, b]``); fall back to the raw string."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _set_dotted(data: dict, key: str, value: Any, problems: Problems) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                problems.append((key, f"'{part}' is not a valid index into a list of {len(node)} (use 0..{len(node)})"))
                return
            idx = int(part)
            if idx == len(node):  # one past the end appends a new element
                node.append({} if not last else None)
            if last:
                node[idx] = value
                return
            node[idx] = _unwrap(node[idx])  # an earlier override's list or mapping, entered now
            if node[idx] is None:
                node[idx] = {}
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            node[part] = _unwrap(node.get(part))
            if not isinstance(node[part], (dict, list)):
                node[part] = {}
            node = node[part]
        else:
            problems.append((key, f"'{'.'.join(parts[:i])}' is not a mapping or list"))
            return


def load_config(cls: type, config_file: str | None = None, overrides: list[str] | None = None) -> Any:
    """Build a ``cls`` config from defaults, a YAML file and dotted overrides.

    Raises:
        ConfigError: with every problem found (unknown keys, types, checks).
        UserError: when the YAML file cannot be read or parsed.
    """
    data = to_dict(cls())
    problems: Problems = []
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"cannot read config file '{config_file}': {e.strerror}. Check the --config path.") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file '{config_file}' is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file '{config_file}' must hold a mapping of keys, not {type(loaded).__name__}")
        ds_problem = _deepspeed_problem(cls, config_file, loaded) if loaded else None
        if ds_problem:
            problems.append(("--config", ds_problem))  # its keys are not merged: one line, not one per key
        else:
            data = _merge(data, loaded or {})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append((item, "an override must look like key=value (e.g. data.seq_len=512)"))
            continue
        _set_dotted(data, key.strip(), _Override(parse_value(raw), raw), problems)
    cfg = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg

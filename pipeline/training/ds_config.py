"""DeepSpeed JSON configs: find one, load it, and fill the values the pipeline derives.

The project ships recognisable DeepSpeed files in ``ds_configs/`` (``zero1.json`` ...
``zero3_offload_nvme.json``). Values the pipeline owns are written as ``"auto"`` there and
filled by :func:`resolve_ds_config` from the recipe:

* batch: ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
  ``train_batch_size`` (``micro × accum × data-parallel size``);
* ``gradient_clipping`` and ``optimizer.params.{lr, betas, eps, weight_decay}``;
* precision: ``bf16.enabled`` / ``fp16.enabled``;
* ZeRO bucket sizes from the model's hidden size ``h`` (:func:`bucket_sizes`):
  ``reduce_bucket_size = max(h², 5e7)``, ``stage3_prefetch_bucket_size = 0.9·h²``,
  ``stage3_param_persistence_threshold = 10·h`` (all in elements): Hugging Face's formula, but a
  reduce bucket never below 5e7 elements (issue 16: measured in ``docs/benchmarks.md``, the why
  in ``docs/deepspeed.md``).

A number instead of ``"auto"`` for a recipe-owned key must agree with the recipe, else the
run stops naming the file, the key and both values. An ``"auto"`` the resolver does not know
is an error too (DeepSpeed would silently drop it and use its own default).

Conventions of the JSON files:

* keys starting with ``_`` are comments (``"_comment": [...]``); they are stripped at every
  depth before DeepSpeed sees the config. DeepSpeed ignores unknown top-level keys but its
  nested sections (``zero_optimization``, ``fp16``, ...) reject unknown keys, so comments
  would otherwise only be possible at the top level.
* no ``scheduler`` section: the training stage passes its own LR scheduler to
  ``deepspeed.initialize``, which then ignores the JSON's; one found is an error rather than
  a silently ignored setting.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import precision as precisions
from pipeline.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # pipeline/training/ds_config.py -> the repository
"""The repository directory holding ``ds_configs/`` (relative config paths fall back to it)."""

SHIPPED_DIR = PROJECT_ROOT / "ds_configs"

PRECISIONS = ("auto", *precisions.NAMES)

# Recipe-owned keys: overriding them through `deepspeed.overrides` would bypass the recipe.
_RECIPE_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "the recipe's gradient clipping (grad_clip)",
    "optimizer.params.lr": "the recipe's learning rate (lr)",
    "optimizer.params.betas": "the recipe's Adam betas",
    "optimizer.params.eps": "the recipe's Adam eps",
    "optimizer.params.weight_decay": "the recipe's weight decay",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}
_BUCKET_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)
REDUCE_BUCKET_FLOOR = 50_000_000
"""Elements: ``reduce_bucket_size`` is never filled below this (a tenth of DeepSpeed's 5e8 default).
HF's ``h²`` (65,536 for ``h`` = 256) reduces the gradients of a small model in dozens of tiny
collectives per step; 5e7 reduces a model of up to 50M parameters in one, at 100 MB (bf16) per GPU
for the bucket DeepSpeed allocates whole (its default: 1 GB), up to 200 MB per CPU rank (fp32)."""


def bucket_sizes(hidden: int) -> tuple[int, int, int]:
    """The ``"auto"`` values of ``(reduce_bucket_size, stage3_prefetch_bucket_size,
    stage3_param_persistence_threshold)`` for a model of hidden size ``hidden``, in elements.

    HF's formula (``h²``, ``0.9·h²``, ``10·h``) with the reduce bucket raised to
    :data:`REDUCE_BUCKET_FLOOR`: of the three keys, the reduce bucket alone gave DeepSpeed's
    defaults their speed over the formula on small models (measured one key at a time: issue 16,
    ``docs/benchmarks.md``); the prefetch bucket and the persistence threshold at DeepSpeed's
    defaults were not faster, and DeepSpeed's 5e8-element reduce bucket costs 1 GB per GPU (bf16)
    and up to 8 bytes per parameter on CPU ranks. The planner counts what is filled
    (:mod:`pipeline.training.plan_zero`).
    """
    return max(hidden * hidden, REDUCE_BUCKET_FLOOR), int(0.9 * hidden * hidden), 10 * hidden


@dataclass
class DeepSpeedSection:
    """Which DeepSpeed JSON to use and how to adjust it."""

    config: str = "ds_configs/zero3_offload.json"
    """DeepSpeed JSON file, or auto. A relative path is looked up first from the current directory, then from the
    project root (shipped: ds_configs/zero0.json, zero1.json, zero2.json, zero2_offload.json, zero3.json,
    zero3_offload.json, zero3_offload_nvme.json). Its "auto" values are filled from the recipe. auto: the memory
    planner picks the fastest shipped config that fits the detected memory (see docs/deepspeed.md)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision. auto: bf16 on GPUs that support it, fp16 with dynamic loss scaling on older GPUs, fp32 on
    CPU. bf16/fp16 need a CUDA GPU."""
    nvme_path: str = ""
    """Directory on a fast local NVMe disk (on every node) replacing the JSON's offload nvme_path; only for configs that
    offload to NVMe (ds_configs/zero3_offload_nvme.json). Empty: keep the JSON's value."""
    memory_check: bool = True
    """Before starting, estimate the memory per GPU (per rank on CPU) and per node and stop with an error naming the
    numbers and a config that fits when this one cannot (python launch/plan.py prints the table). false: start
    anyway (for those who know better; auto then takes the fastest config without checking)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed keys set verbatim after everything else, dotted for nesting, e.g.
    {"zero_optimization.overlap_comm": false, "zero_optimization.reduce_bucket_size": 200000000}; a nested object
    ({"zero_optimization": {"overlap_comm": false}}) sets the same keys, it never replaces a whole section. Keys the
    recipe owns (batch sizes, optimizer hyper-parameters, gradient clipping, precision) cannot be set here."""

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.config.strip():
            problems.append(("config", "is empty; name a DeepSpeed JSON file, e.g. ds_configs/zero3_offload.json"))
        if self.precision not in PRECISIONS:
            problems.append(("precision", f"got {self.precision!r}; must be one of: {', '.join(PRECISIONS)}"))
        problems.extend(("overrides" + (f".{k}" if k else ""), msg) for k, msg in override_problems(flat_overrides(self.overrides)))
        return problems


# ---------------------------------------------------------------------------- precision


def _bf16_supported() -> bool:
    import torch

    try:  # emulated bf16 (pre-Ampere) is far too slow to train with: ask for native support
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def _gpu_name() -> str:
    import torch

    try:
        return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - only used to decorate a message
        return "this GPU"


def resolve_precision(requested: str) -> str:
    """The precision to train in on this machine.

    Args:
        requested: ``auto``, ``bf16``, ``fp16`` or ``fp32`` (``deepspeed.precision``; other
            spellings as :func:`pipeline.precision.parse` reads them).

    Returns:
        ``"bf16"``, ``"fp16"`` or ``"fp32"``. ``auto`` picks bf16 on GPUs with native bf16,
        fp16 (dynamic loss scaling) on older GPUs and fp32 without CUDA.

    Raises:
        UserError: a half precision requested where it cannot run (no GPU, or bf16 on a GPU
            without native bf16), or an unknown value.
    """
    import torch

    requested = precisions.parse(requested, "deepspeed.precision", PRECISIONS)
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if _bf16_supported() else "fp16"
    if requested == "fp32":
        return "fp32"
    if not cuda:
        if requested == "bf16":
            raise UserError(
                "deepspeed.precision=bf16 but no CUDA GPU is visible: bf16 on this CPU is orders of magnitude slower "
                "than fp32; use precision=fp32 or auto (or run on a GPU node)."
            )
        raise UserError(
            "deepspeed.precision=fp16 but no CUDA GPU is visible: fp16 training with loss scaling needs a GPU; "
            "use precision=fp32 or auto (or run on a GPU node)."
        )
    if requested == "bf16" and not _bf16_supported():
        raise UserError(
            f"deepspeed.precision=bf16 but {_gpu_name()} has no native bf16 support (it needs Ampere or newer); "
            "use precision=fp16 or auto."
        )
    return requested


# ---------------------------------------------------------------------------- loading


def locate_ds_config(path: str) -> Path:
    """The file a ``deepspeed.config`` value names: as given, else relative to the project root.

    Raises:
        UserError: no such file, listing the places tried and the shipped configs.
    """
    p = Path(path).expanduser()
    tried = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for cand in tried:
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(f"ds_configs/{f.name}" for f in SHIPPED_DIR.glob("*.json"))) or "none found"
    raise UserError(
        f"DeepSpeed config '{path}' not found (looked at {', '.join(str(t) for t in tried)}); set deepspeed.config to an "
        f"existing JSON file, e.g. one shipped with the project: {shipped}."
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def load_ds_json(path: str) -> dict:
    """Read a DeepSpeed JSON file (located with :func:`locate_ds_config`), comments included.

    Raises:
        UserError: naming the file when it is missing, unreadable, not valid JSON, has a
            duplicate key (DeepSpeed rejects those) or does not hold a JSON object.
    """
    file = locate_ds_config(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read DeepSpeed config '{file}': {e}. Check deepspeed.config.") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise UserError(
            f"DeepSpeed config '{file}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the file (JSON has no comments or trailing commas; use \"_comment\" keys for notes)."
        ) from None
    except _DuplicateKey as e:
        raise UserError(f"DeepSpeed config '{file}' has the key '{e.args[0]}' twice in one object; keep one.") from None
    if not isinstance(data, dict):
        raise UserError(f"DeepSpeed config '{file}' must hold a JSON object {{...}}, not {type(data).__name__}.")
    return data


# ---------------------------------------------------------------------------- helpers


def _strip_comments(node: Any) -> Any:
    """A deep copy of ``node`` without dict keys starting with ``_``."""
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(node, list):
        return [_strip_comments(v) for v in node]
    return copy.deepcopy(node)


_MISSING = object()


def _get(ds: dict, key: str) -> Any:
    node: Any = ds
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(ds: dict, key: str, value: Any, what: str) -> None:
    parts = key.split(".")
    node = ds
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(
                f"{what}: cannot set '{key}' because '{'.'.join(parts[:i + 1])}' is {nxt!r}, not an object; "
                "fix the key or that value."
            )
        node = nxt
    node[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _covered(key: str, overrides: dict) -> bool:
    return any(key == k or key.startswith(k + ".") for k in overrides)


def flat_overrides(overrides: dict[str, Any] | None) -> dict[Any, Any]:
    """``deepspeed.overrides`` as dotted keys of leaf values: a nested object (YAML's natural form,
    or ``deepspeed.overrides.zero_optimization.reduce_bucket_size=N`` on the command line) sets its
    keys one by one, as the dotted form does. Set verbatim, ``{"zero_optimization": {...}}`` replaced
    the whole section: the stage and offload of the shipped JSON were dropped and the run silently
    trained under ZeRO-0."""
    out: dict[Any, Any] = {}
    for key, value in (overrides or {}).items():
        if isinstance(key, str) and isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in flat_overrides(value).items()})
        else:
            out[key] = value
    return out


def override_problems(overrides: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(override key, problem)`` pairs for ``deepspeed.overrides`` (malformed or recipe-owned keys)."""
    problems = []
    for key in overrides or {}:
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            problems.append((str(key), "is not a dotted DeepSpeed key like zero_optimization.overlap_comm; fix the name"))
            continue
        owned = [k for k in _RECIPE_KEYS if k == key or k.startswith(key + ".")]
        if owned:
            where = sorted({_RECIPE_KEYS[k] for k in owned})
            problems.append((key, f"sets {', '.join(owned)}, which the pipeline derives from the recipe; "
                                  f"set {' / '.join(where)} instead and remove this override"))
    return problems


# ---------------------------------------------------------------------------- batch arithmetic


def batch_sizes(micro_batch: int, grad_accum: int, global_batch: int, dp_world: int) -> tuple[int, int, int]:
    """``(micro, accum, global)`` from the recipe; ``0`` for accum or global means derive it.

    Raises:
        UserError: non-positive micro batch, negative values, or values that do not satisfy
            ``global = micro × accum × data-parallel size`` (the message gives valid values).
    """
    if dp_world < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp_world}")  # computed by the launcher: a bug
    if micro_batch < 1:
        raise UserError(f"train.micro_batch_size={micro_batch} must be >= 1 (sequences per GPU per forward pass).")
    if grad_accum < 0 or global_batch < 0:
        raise UserError(
            f"train.grad_accum={grad_accum} and train.global_batch_size={global_batch} must be >= 0 (0 = derive from the "
            "other)."
        )
    step = micro_batch * dp_world  # sequences per micro step over all data-parallel ranks
    if global_batch == 0:
        accum = grad_accum or 1
        return micro_batch, accum, step * accum
    if grad_accum and step * grad_accum != global_batch:
        fix = f", or grad_accum={global_batch // step}" if global_batch % step == 0 else (
            f"; global_batch_size must be a multiple of micro_batch_size × data-parallel size (={step})")
        raise UserError(
            f"train.global_batch_size={global_batch} != micro_batch_size {micro_batch} × grad_accum {grad_accum} × "
            f"data-parallel size {dp_world} (={step * grad_accum}); set global_batch_size={step * grad_accum}{fix}"
        )
    if global_batch % step:
        below, above = global_batch // step * step, (global_batch // step + 1) * step
        nearest = f"{below} or {above}" if below else f"{above}"
        raise UserError(
            f"train.global_batch_size={global_batch} is not a multiple of micro_batch_size {micro_batch} × data-parallel "
            f"size {dp_world} (={step}); set global_batch_size={nearest}, or change micro_batch_size."
        )
    if grad_accum == 0:
        return micro_batch, global_batch // step, global_batch
    return micro_batch, grad_accum, global_batch


# ---------------------------------------------------------------------------- resolution


def resolve_ds_config(
    raw: dict,
    *,
    source: str,
    micro_batch: int,
    grad_accum: int,
    global_batch: int,
    dp_world: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    grad_clip: float,
    precision: str,
    hidden_size: int | None,
    nvme_path: str = "",
    overrides: dict | None = None,
) -> dict:
    """The DeepSpeed config dict to pass to ``deepspeed.initialize``: every ``"auto"`` filled.

    Args:
        raw: the JSON as loaded by :func:`load_ds_json` (not modified).
        source: the JSON's path, used in error messages.
        micro_batch, grad_accum, global_batch: the recipe's batch sizes (sequences);
            ``0`` for accum or global means derive it (both 0: accum 1).
        dp_world: data-parallel size (ranks that each see different data).
        lr, betas, eps, weight_decay: optimizer hyper-parameters (filled into
            ``optimizer.params`` when the JSON has an ``optimizer`` section).
        grad_clip: max gradient norm, 0 = no clipping.
        precision: ``bf16``, ``fp16`` or ``fp32`` (``auto`` is resolved with
            :func:`resolve_precision`).
        hidden_size: the model's hidden size, for ``"auto"`` ZeRO bucket sizes; ``None`` when
            unknown (then those keys must be numbers or set in ``overrides``).
        nvme_path: replaces ``nvme_path`` in every offload section whose device is ``nvme``.
        overrides: dotted keys set verbatim, last.

    Raises:
        UserError: batch sizes inconsistent, a JSON number disagreeing with the recipe, an
            unknown ``"auto"``, a ``scheduler`` section, a recipe-owned override, or an
            ``nvme_path`` for a config without NVMe offload.
    """
    overrides = flat_overrides(overrides)
    ds = _strip_comments(raw)
    if "scheduler" in ds:
        raise UserError(
            f"{source}: remove the 'scheduler' section; the pipeline passes its own LR scheduler (built from the recipe) "
            "to DeepSpeed, which would silently ignore this one."
        )
    bad = override_problems(overrides)
    if bad:
        raise UserError("deepspeed.overrides: " + "; ".join(f"'{k}' {m}" for k, m in bad) + ".")
    if precision == "auto":
        precision = resolve_precision("auto")
    if precision not in precisions.NAMES:
        raise ValueError(f"precision must be bf16, fp16 or fp32 after resolution, got {precision!r}")
    micro, accum, total = batch_sizes(micro_batch, grad_accum, global_batch, dp_world)

    def fill(key: str, value: Any, why: str) -> None:
        have = _get(ds, key)
        if have is _MISSING or have == "auto":
            _set(ds, key, value, source)
        elif not _same(have, value):
            raise UserError(
                f"{source}: {key} is {json.dumps(have)} but {why} gives {json.dumps(value)}; set it to \"auto\" in the "
                f"JSON (the pipeline fills it) or change the recipe so both agree."
            )

    fill("train_micro_batch_size_per_gpu", micro, f"the recipe (train.micro_batch_size={micro})")
    fill("gradient_accumulation_steps", accum,
         f"the recipe (train.grad_accum={accum})" if grad_accum else "the recipe (train.grad_accum, derived)")
    fill("train_batch_size", total, f"the recipe (train.global_batch_size = micro {micro} × accum {accum} × dp {dp_world})")
    fill("gradient_clipping", float(grad_clip), "the recipe's grad_clip")
    if "optimizer" in ds:
        fill("optimizer.params.lr", float(lr), "the recipe's lr")
        fill("optimizer.params.betas", [float(b) for b in betas], "the recipe's betas")
        fill("optimizer.params.eps", float(eps), "the recipe's eps")
        fill("optimizer.params.weight_decay", float(weight_decay), "the recipe's weight_decay")
    for half, section in precisions.ds_flags(precision).items():
        fill(f"{half}.enabled", section["enabled"], f"deepspeed.precision (resolved: {precision})")

    if hidden_size is not None:
        for key, value in zip(_BUCKET_KEYS, bucket_sizes(hidden_size)):
            if _get(ds, key) == "auto":
                _set(ds, key, value, source)
    else:
        for key in _BUCKET_KEYS:
            if _get(ds, key) == "auto" and not _covered(key, overrides):
                raise UserError(
                    f"{source}: {key} is \"auto\" but the model's hidden size is unknown, so it cannot be derived; put a "
                    f"number in the JSON or set deepspeed.overrides {{\"{key}\": N}}."
                )

    if nvme_path:
        sections = [s for s in ("offload_optimizer", "offload_param") if _get(ds, f"zero_optimization.{s}.device") == "nvme"]
        if not sections:
            raise UserError(
                f"deepspeed.nvme_path={nvme_path!r} is set but {source} offloads nothing to NVMe; use "
                "ds_configs/zero3_offload_nvme.json (or a config with \"device\": \"nvme\") or clear deepspeed.nvme_path."
            )
        for s in sections:
            ds["zero_optimization"][s]["nvme_path"] = nvme_path

    for key, value in overrides.items():
        _set(ds, key, copy.deepcopy(value), "deepspeed.overrides")

    left = _autos(ds)
    if left:
        raise UserError(
            f"{source}: {', '.join(left)} {'is' if len(left) == 1 else 'are'} \"auto\", which the pipeline does not fill "
            f"(it fills: {', '.join(list(_RECIPE_KEYS) + list(_BUCKET_KEYS))}); put a value there, or remove the key to "
            "use DeepSpeed's default."
        )
    return ds


def resolve_for_recipe(cfg: Any, config: str, *, world: int, precision: str, hidden: int | None, strict_nvme: bool = True,
                       micro: int | None = None, grad_accum: int | None = None, global_batch: int | None = None,
                       sp: int = 1) -> dict:
    """The DeepSpeed JSON ``config`` resolved for a stage recipe (``cfg`` has ``train`` and
    ``deepspeed`` sections): the one way the stage, ``--print-config`` and the planner fill it.

    Args:
        world: data-parallel ranks (groups, with sequence parallelism); precision: resolved (bf16, fp16, fp32).
        sp: sequence-parallel degree, written as ``sequence_parallel_size`` when above 1 (DeepSpeed
            then counts ``world / sp`` data-parallel ranks in its batch check, as ``world`` here).
        hidden: the model's hidden size (``"auto"`` bucket sizes), None if unknown.
        strict_nvme: pass ``deepspeed.nvme_path`` whatever the config (a config without NVMe
            offload is then refused); False: only to a config that offloads to NVMe (the
            planner's candidates, and ``auto``'s choice).
        micro, grad_accum, global_batch: batch sizes other than the recipe's (the planner's
            smaller micro batches); None: the recipe's.
    """
    t, d = cfg.train, cfg.deepspeed
    raw = load_ds_json(config)
    nvme_path = d.nvme_path if strict_nvme or "nvme" in offload(raw).values() else ""
    if sp > 1:
        raw = {**raw, "sequence_parallel_size": sp}
    return resolve_ds_config(
        raw, source=config, micro_batch=t.micro_batch_size if micro is None else micro,
        grad_accum=t.grad_accum if grad_accum is None else grad_accum,
        global_batch=t.global_batch_size if global_batch is None else global_batch, dp_world=world, lr=t.lr,
        betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay, grad_clip=t.grad_clip, precision=precision,
        hidden_size=hidden, nvme_path=nvme_path, overrides=d.overrides,
    )


def _autos(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys (list items by index) whose value is the string ``"auto"``."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return [prefix] if node == "auto" else []
    out: list[str] = []
    for k, v in items:
        out.extend(_autos(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# ---------------------------------------------------------------------------- descriptions


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when there is no ``zero_optimization``)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def offload(ds: dict) -> dict:
    """Offload devices: ``{"optimizer": "none"|"cpu"|"nvme", "param": ...}``."""
    zero = ds.get("zero_optimization") or {}
    return {
        what: str((zero.get(f"offload_{what}") or {}).get("device", "none") or "none")
        for what in ("optimizer", "param")
    }


def summarize(ds: dict) -> str:
    """One line for logs, e.g. ``ZeRO-3, optimizer offload cpu, param offload cpu, fp32, micro 4 × accum 2 × dp 2 = 16``."""
    stage = zero_stage(ds)
    parts = [f"ZeRO-{stage}" if stage else "no ZeRO"]
    zero = ds.get("zero_optimization") or {}
    devices = offload(ds)
    for what, dev in devices.items():
        if dev == "nvme":
            parts.append(f"{what} offload nvme ({zero[f'offload_{what}'].get('nvme_path', '?')})")
        elif dev != "none":
            parts.append(f"{what} offload {dev}")
    if all(d == "none" for d in devices.values()):
        parts.append("no offload")
    parts.append(precisions.of_ds_config(ds))
    micro, accum, total = (ds.get(k, "?") for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                     "train_batch_size"))
    if all(isinstance(v, int) and v > 0 for v in (micro, accum, total)):
        parts.append(f"micro {micro} × accum {accum} × dp {total // (micro * accum)} = {total}")
    else:
        parts.append(f"micro {micro} × accum {accum}, global {total}")
    return ", ".join(parts)

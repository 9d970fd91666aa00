"""Precision names, their spellings and their torch dtypes: the one map every stage uses.

A precision has one canonical name everywhere in the pipeline (configs, ``meta.json``, logs,
``export_meta.json``): ``bf16``, ``fp16`` or ``fp32`` (:data:`NAMES`). Users and libraries
spell them in other ways (``bfloat16``, ``torch.float16``, ``half``, Lightning's ``16`` or
``bf16-mixed``); :func:`canonical` maps every known spelling to the name, :func:`parse` does
the same for a value a user typed and stops with one message naming the key and the
choices, :func:`torch_dtype` gives the tensor type, :func:`of_ds_config` reads the precision
a resolved DeepSpeed JSON trains in and :func:`ds_flags` writes it.

``tf32`` is known as well: fp32 tensors whose matmuls run on TF32 tensor cores. It is a
compute mode, not a storage type, so no stage accepts it from a user (it is not in
:data:`NAMES`); the MFU peak table (:mod:`pipeline.training.peak`) counts it separately.

torch is imported only by :func:`torch_dtype`, so config checks can use this module before
the heavy imports.
"""

from __future__ import annotations

from typing import Any

NAMES = ("bf16", "fp16", "fp32")
"""Precisions a model is trained, evaluated or stored in, by their canonical names."""

HALF = ("bf16", "fp16")
"""The 16-bit precisions (DeepSpeed's ``bf16`` / ``fp16`` sections; half the bytes of fp32)."""

_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "tf32": "float32"}
# attribute of the torch module per name; tf32 tensors are float32 (only the matmul differs)

ALIASES = {
    "bfloat16": "bf16", "bf16-mixed": "bf16",
    "float16": "fp16", "half": "fp16", "16": "fp16", "fp16-mixed": "fp16",
    "float32": "fp32", "float": "fp32", "32": "fp32",
}
"""Other spellings (lower case) of the names: torch's dtype names (also with ``torch.``
in front, as ``str(torch.bfloat16)`` writes them) and PyTorch Lightning's precision flags."""


def canonical(spelling: Any) -> str | None:
    """The canonical name of a precision written any known way, or ``None`` for an unknown one.

    Args:
        spelling: a name (``"bf16"``), an alias (``"bfloat16"``, ``"torch.float16"``,
            ``"half"``, ``16``), case-insensitive, or a ``torch.dtype``.

    Returns:
        ``"bf16"``, ``"fp16"``, ``"fp32"`` or ``"tf32"``; ``None`` when the spelling is unknown.
    """
    key = str(spelling).strip().lower().removeprefix("torch.")
    name = ALIASES.get(key, key)
    return name if name in _TORCH_NAMES else None


def parse(value: Any, what: str, choices: tuple[str, ...] = NAMES) -> str:
    """A precision a user gave, as its canonical name.

    Args:
        value: the user's spelling (see :func:`canonical`), or a choice that is not a
            precision, such as ``"auto"``, returned as given.
        what: the key or flag the value came from, for the message (``"--dtype"``,
            ``"deepspeed.precision"``).
        choices: what ``what`` accepts, canonical names plus words like ``"auto"``.

    Raises:
        UserError: the value is no known spelling of one of ``choices``; the message names
            ``what``, the value and the choices.
    """
    if isinstance(value, str) and value in choices:
        return value
    name = canonical(value)
    if name is None or name not in choices:
        from pipeline.errors import UserError

        raise UserError(f"{what}={str(value)!r} is not valid; use one of: {', '.join(choices)} "
                        "(bfloat16, float16 and float32 are understood too).")
    return name


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of a precision (``tf32`` is ``torch.float32``).

    Args:
        name: any spelling :func:`canonical` knows.

    Raises:
        ValueError: an unknown precision (a bug: user values go through :func:`parse` first).
    """
    import torch

    key = canonical(name)
    if key is None:
        raise ValueError(f"unknown precision {name!r}; use one of {', '.join(_TORCH_NAMES)}")
    return getattr(torch, _TORCH_NAMES[key])


def of_ds_config(ds: dict) -> str:
    """The precision a resolved DeepSpeed config trains in: its ``bf16`` or ``fp16`` section
    enabled, else ``fp32``. (DeepSpeed reads ``enabled`` as a truth value; after
    :func:`pipeline.training.ds_config.resolve_ds_config` it is always a bool.)"""
    for name in HALF:
        if (ds.get(name) or {}).get("enabled"):
            return name
    return "fp32"


def ds_flags(name: str) -> dict[str, dict[str, bool]]:
    """The DeepSpeed sections that select precision ``name``: ``{"bf16": {"enabled": ...},
    "fp16": {"enabled": ...}}`` (fp32: both off). Inverse of :func:`of_ds_config`."""
    if name not in NAMES:
        raise ValueError(f"precision must be one of {', '.join(NAMES)}, got {name!r}")
    return {half: {"enabled": name == half} for half in HALF}

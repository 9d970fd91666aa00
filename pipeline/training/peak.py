"""Peak FLOP/s of one device, the denominator of MFU: a datasheet table for known GPUs, a
measured matmul peak elsewhere (the best of several bursts, cached per machine, only ever
raised), and :func:`raise_peak` for a step that beats it, so a logged MFU is never above 1.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
from pathlib import Path

import torch

from pipeline import precision as precisions
from pipeline.io import atomic_write_json

# Dense (non-sparse) tensor-core peaks per GPU from NVIDIA datasheets/whitepapers, in
# FLOP/s, with FP32 accumulation. "fp32" is the non-tensor-core rate, used when PyTorch
# runs fp32 matmuls at full precision; "tf32" when torch.set_float32_matmul_precision
# allows TF32. Patterns are tried in order (specific before general) on the lowercase name.
_GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"\bh100\b.*\bnvl\b", "H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\b(g?h200|h[18]00)\b", "H100/H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bb200\b", "B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1125e12, "fp32": 75e12}),
    (r"\ba[18]00\b", "A100/A800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\ba10g?\b", "A10/A10G", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bl40s\b", "L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bl40\b", "L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bl4\b", "L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bv100s\b", "V100S PCIe", {"fp16": 130e12, "fp32": 16.4e12}),
    (r"\bv100\b.*\bpcie\b", "V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    (r"\bv100\b", "V100 SXM", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bt4\b", "T4", {"fp16": 65e12, "fp32": 8.1e12}),
    (r"\brtx 4090\b", "RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\brtx 3090\b", "RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
]


def _norm_precision(precision: str) -> str:
    name = precisions.canonical(precision)  # any spelling (bfloat16, torch.float16, Lightning's "16") -> bf16/fp16/fp32/tf32
    if name is None:  # the caller passes the run's resolved precision: an unknown one is a bug, not a user error
        raise ValueError(f"unknown precision {precision!r}; use one of bf16, fp16, fp32, tf32")
    return name


def _gpu_entry(name: str) -> tuple[str, dict[str, float]] | None:
    low = name.lower()
    return next(((label, peaks) for pattern, label, peaks in _GPU_PEAKS if re.search(pattern, low)), None)


def gpu_peak_from_name(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU named ``name`` (as ``torch.cuda.get_device_name``).

    Returns ``None`` for a GPU not in the table, or a precision it has no tensor-core rate
    for (e.g. bf16 on V100/T4); the caller then measures.
    """
    entry, prec = _gpu_entry(name), _norm_precision(precision)
    return None if entry is None else entry[1].get(prec)


_PEAK_CACHE: dict[str, tuple[float, str]] = {}
_PEAK_LOCK = threading.Lock()


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pipeline" / "cpu_peak.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _measure_matmul(device: torch.device, dtype: torch.dtype, n: int, budget_s: float, max_reps: int) -> float:
    """Best FLOP/s of ``n x n @ n x n`` matmuls over about ``budget_s`` seconds (after a warm-up)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    warm = min(n, 512)
    for _ in range(2):  # start BLAS threads / cuBLAS handles and pick kernels
        torch.mm(a[:warm, :warm], b[:warm, :warm])
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    sync(device)
    best, spent, reps = 0.0, 0.0, 0
    while reps < 2 or (spent < budget_s and reps < max_reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        reps += 1
        best = max(best, 2.0 * n**3 / max(dt, 1e-9))
    return best


_BURSTS = 3
"""Measurements a CPU peak is the best of. A burst taken while another process held the cores reads
low (43 GFLOP/s cached where the same matmul later gave 92): bursts a moment apart, the best kept."""


def _measure_cpu(prec: str) -> float:
    """Best FLOP/s of 2048x2048 ``prec`` matmuls over :data:`_BURSTS` short bursts."""
    best = 0.0
    for i in range(_BURSTS):
        if i:
            time.sleep(0.05)  # let a competing process's burst pass rather than measure inside it
        best = max(best, _measure_matmul(torch.device("cpu"), precisions.torch_dtype(prec), 2048, budget_s=0.2, max_reps=8))
    return best


def _cpu_cache_key(prec: str) -> str:
    return f"{_cpu_model()}|threads={torch.get_num_threads()}|{prec}"


def _store_cpu_peak(key: str, flops: float) -> float:
    """Write ``flops`` under ``key`` in the cache file unless it holds more already (a peak only rises);
    returns the value kept. Best effort: a read-only home costs a re-measurement next time."""
    path = _cache_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    try:
        kept = float(data[key]["flops"])
    except (KeyError, TypeError, ValueError):
        kept = 0.0
    if flops <= kept:
        return kept
    data[key] = {"flops": flops, "torch": torch.__version__, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError:
        pass
    return flops


def _cpu_peak(prec: str) -> tuple[float, str]:
    key = _cpu_cache_key(prec)
    path = _cache_file()
    what = f"measured {prec} matmul 2048x2048 on {_cpu_model()}, {torch.get_num_threads()} threads"
    try:
        flops = float(json.loads(path.read_text(encoding="utf-8"))[key]["flops"])
        if flops > 0:
            return flops, f"{what} (cached in {path})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _store_cpu_peak(key, _measure_cpu(prec)), f"{what}, best of {_BURSTS}"


def raise_peak(device: torch.device | str, old: float, achieved: float) -> tuple[float, str]:
    """A training step ran at ``achieved`` FLOP/s per device, above ``old``, the peak MFU divides by.

    That peak was no upper bound. For a peak :func:`peak_flops` measured (a CPU, a GPU not in the
    table) the matmul is measured again and the peak becomes the larger of that and ``achieved``
    (the step's own rate is a measured lower bound on the device's peak), in this process and,
    on a CPU, in the cache file, so later runs start from it. A datasheet peak is not changed
    (it is the hardware's bound: beating it means the FLOP count over-estimates the model's work);
    the caller then divides by ``achieved``. Either way the returned peak is at least ``achieved``.

    Returns:
        ``(new peak FLOP/s, why)``.
    """
    dev = torch.device(device)
    with _PEAK_LOCK:
        keys = [k for k, (f, _) in _PEAK_CACHE.items() if f == old and k.split("|", 1)[0] == dev.type]
        if not keys:
            return achieved, "a training step's own rate: the peak given was beaten"
        source = _PEAK_CACHE[keys[0]][1]
        if source.startswith("table"):
            return achieved, (f"a training step's own rate: the datasheet peak ({source}) was beaten, so the FLOPs per "
                              "token over-count this model's work")
        prec = keys[0].rsplit("|", 1)[1]
        if dev.type == "cpu":
            new = max(_measure_cpu(prec), achieved)
            new = _store_cpu_peak(_cpu_cache_key(prec), new)
        else:
            n = 4096 if prec in ("fp32", "tf32") else 8192
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            dtype = precisions.torch_dtype(prec)
            new = max(_measure_matmul(torch.device("cuda", index), dtype, n, budget_s=0.5, max_reps=50), achieved)
        why = (f"re-measured {prec} matmul" if new > achieved
               else f"a training step's own rate (a re-measured {prec} matmul gave less)")
        why += f", raised from {old / 1e9:.1f} GFLOP/s"
        for k in keys:
            _PEAK_CACHE[k] = (new, why)
        return new, why


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """Peak matmul FLOP/s of one device, for MFU, and where the number comes from.

    * CUDA: the dense peak from a table of GPU names (datasheet numbers, see
      :func:`gpu_peak_from_name`); fp32 means TF32 when
      ``torch.get_float32_matmul_precision()`` is not ``"highest"``. A GPU or precision
      not in the table is measured (square matmuls for about half a second).
    * CPU: measured: the best of three short bursts (~0.2 s each) of 2048x2048 matmuls in
      ``precision`` with the current ``torch.get_num_threads()``, cached in this process and
      in ``~/.cache/pipeline/cpu_peak.json`` (``$XDG_CACHE_HOME`` honoured), keyed by CPU
      model, thread count and precision, so each machine measures once. A cached value only
      ever rises.

    A measurement taken while the machine was busy reads low, and MFU would pass 100 %: when a
    step beats the peak, :class:`Monitor` calls :func:`raise_peak`, so a logged MFU never
    exceeds 1.

    Returns:
        ``(FLOP/s per device, source)``; the source starts with ``"table"`` or
        ``"measured"`` (after :func:`raise_peak`, says how it was raised).
    """
    dev = torch.device(device)
    prec = _norm_precision(precision)
    if dev.type == "cuda":
        if prec == "fp32" and torch.get_float32_matmul_precision() != "highest":
            prec = "tf32"
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        name = torch.cuda.get_device_name(dev)
        entry = _gpu_entry(name)
        key = f"cuda|{name}|{prec}"
        with _PEAK_LOCK:
            if entry is not None and prec in entry[1]:  # recorded too, so raise_peak knows it for a datasheet figure
                _PEAK_CACHE[key] = (entry[1][prec], f"table: {entry[0]} dense {prec} peak ({name})")
            if key not in _PEAK_CACHE:
                n = 4096 if prec in ("fp32", "tf32") else 8192
                flops = _measure_matmul(dev, precisions.torch_dtype(prec), n, budget_s=0.5, max_reps=50)
                _PEAK_CACHE[key] = (flops, f"measured {prec} matmul {n}x{n} on {name} (not in the peak table)")
            return _PEAK_CACHE[key]
    key = f"{dev.type}|threads={torch.get_num_threads()}|{prec}"
    with _PEAK_LOCK:
        if key not in _PEAK_CACHE:
            _PEAK_CACHE[key] = _cpu_peak(prec)
        return _PEAK_CACHE[key]

"""One way to find this process's rank and world, and to start the process group.

The training scripts run under four launchers, which describe the job differently:

* ``deepspeed --num_gpus N script.py`` and ``torchrun``: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set (DeepSpeed adds
  ``LOCAL_SIZE`` and ``CROSS_RANK`` and passes ``--local_rank``; torchrun adds
  ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK``).
* ``srun`` (Slurm): only ``SLURM_*`` variables. Rank 0 runs on the first host of the step's
  node list, which becomes ``MASTER_ADDR``; ``MASTER_PORT`` is derived from the job id
  (:func:`slurm_port`) so that two jobs sharing a node do not collide.
* plain ``python``: one process (rank 0 of 1).

:func:`detect` turns any of these into a :class:`DistEnv`, :func:`export_env` writes the
standard variables that ``torch.distributed`` and DeepSpeed read, and :func:`init` does
both and starts the process group through ``deepspeed.init_distributed`` (also for a single
process, so DeepSpeed works the same there). Stages end with :func:`shutdown`; entry
scripts end the process with :func:`finish`, which skips the interpreter's teardown, where
DeepSpeed's leftover groups made a rank abort ("terminate called without an active
exception") after its work was done. The port rules live in :mod:`pipeline.rendezvous`.

The small helpers (:func:`rank`, :func:`world_size`, :func:`is_main`, :func:`print0`,
:func:`barrier`, the ``all_reduce_*`` functions) work before :func:`init` and in
single-process runs too, where they fall back to the environment or act locally.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Mapping, NoReturn

from pipeline import allocator, quiet
from pipeline.errors import UserError
from pipeline.rendezvous import (  # noqa: F401  (re-exported: callers know them as dist.*)
    DEFAULT_PORT, SLURM_PORT_BASE, SLURM_PORT_SPAN, free_port, is_addr_in_use, port_in_use_message, slurm_port)

Launcher = Literal["deepspeed/torchrun", "slurm", "single"]

DEFAULT_ADDR = "127.0.0.1"
_started = False  # a process group was started in this process (finish() then skips teardown)
_SCONTROL_TIMEOUT_S = 10  # seconds; scontrol answers locally, a hang means a broken setup
DEEPSPEED_SHM = "deepspeed_allreduce_buffer_"  # + <uid>_<addr>_<port>_<rank>: DeepSpeed's CPU comm op, /dev/shm


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (what the launcher told it)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------- parsing helpers


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value.strip() if value is not None and value.strip() != "" else None


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    value = _get(environ, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r} is not an integer. It is set by the launcher "
            f"(deepspeed, torchrun or srun); unset it or start the script through the launcher."
        ) from None
    if number < minimum:
        raise UserError(f"environment variable {name}={number} must be at least {minimum}; unset it or fix the launcher.")
    return number


def _first_int(environ: Mapping[str, str], *names: str, minimum: int = 0) -> int | None:
    for name in names:
        value = _int(environ, name, minimum)
        if value is not None:
            return value
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (``n[1-3],gpu07``, ``rack[1-2]-n[01-02]``) into host names.

    A pure-Python stand-in for ``scontrol show hostnames``: comma-separated items, each with
    any number of ``[a-b,c]`` groups; the zero padding of a range's low end is kept
    (``gpu[07-11]`` gives ``gpu07 ... gpu11``).

    Raises:
        ValueError: the list is not in this syntax (unbalanced brackets, bad ranges).
    """
    items, depth, current = [], 0, []
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in host list {nodelist!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {nodelist!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {nodelist!r}")
    items.append("".join(current))
    hosts: list[str] = []
    for item in items:
        if item.strip():
            hosts.extend(_expand_item(item.strip(), nodelist))
    if not hosts:
        raise ValueError(f"empty host list {nodelist!r}")
    return hosts


def _expand_item(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, body, tails = item[: match.start()], match.group(1), _expand_item(item[match.end() :], whole)
    out = []
    for piece in body.split(","):
        piece = piece.strip()
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {piece!r} in host list {whole!r}")
        if not sep:
            out.extend(head + lo + tail for tail in tails)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {piece!r} in host list {whole!r}")
        for n in range(int(lo), int(hi) + 1):
            out.extend(head + str(n).zfill(len(lo)) + tail for tail in tails)
    return out


def _scontrol_hostnames(nodelist: str) -> list[str] | None:
    """Host names from ``scontrol show hostnames`` or None when scontrol is absent/fails."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=_SCONTROL_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = proc.stdout.split()
    return hosts if proc.returncode == 0 and hosts else None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (via ``scontrol`` when present, else parsed here).

    Raises:
        UserError: the list cannot be parsed and ``scontrol`` could not expand it.
    """
    hosts = _scontrol_hostnames(nodelist)
    if hosts:
        return hosts[0]
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError as e:
        raise UserError(
            f"cannot find the first host of the Slurm node list: {e}. Put `scontrol` on PATH, "
            f"or export MASTER_ADDR=<host of rank 0> in the batch script before srun."
        ) from None


def _slurm_tasks_on_node(spec: str, node_id: int) -> int | None:
    """Entry ``node_id`` of a Slurm tasks-per-node string such as ``2(x3),1``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node_id] if node_id < len(counts) else None


# ---------------------------------------------------------------------------- detect


def _launcher_rank_world(environ: Mapping[str, str]) -> tuple[Launcher, int, int]:
    """(launcher, rank, world size) from the environment, without any subprocess."""
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE", minimum=1)
    if rank is not None and world is not None:
        launcher: Launcher = "deepspeed/torchrun"
    else:
        rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS", minimum=1)
        if rank is None or world is None:
            return "single", 0, 1
        launcher = "slurm"
        if world > 1 and _get(environ, "SLURM_STEP_ID") is None and _get(environ, "SLURM_STEPID") is None:
            # The batch script itself (and an salloc shell) carries SLURM_PROCID=0 and the
            # job's SLURM_NTASKS but no step id: this process is not one of N srun tasks and
            # would wait for N-1 peers that never come.
            raise UserError(
                f"this process runs inside Slurm job {environ.get('SLURM_JOB_ID', '?')} with "
                f"SLURM_NTASKS={world} but was not started by srun (no SLURM_STEP_ID), so it cannot "
                f"be one of {world} ranks. Start it with `srun python ...` (one task per rank), or "
                f"with the deepspeed/torchrun launcher, or ask for one task (#SBATCH --ntasks=1)."
            )
    if rank >= world:
        names = "RANK/WORLD_SIZE" if launcher == "deepspeed/torchrun" else "SLURM_PROCID/SLURM_NTASKS"
        raise UserError(f"rank {rank} is not below world size {world} ({names}); fix the launcher's environment.")
    return launcher, rank, world


def detect(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Work out rank, world and rendezvous address from the launcher's environment.

    Rules, first match wins: ``RANK`` and ``WORLD_SIZE`` set (deepspeed, torchrun); else
    ``SLURM_PROCID`` and ``SLURM_NTASKS`` set (srun); else a single process. An explicit
    ``MASTER_ADDR`` / ``MASTER_PORT`` always wins over derived values.

    Args:
        environ: the environment to read (default ``os.environ``).
        local_rank_arg: the ``--local_rank`` argument the DeepSpeed launcher passes; used
            when ``LOCAL_RANK`` is not in the environment.

    Raises:
        UserError: malformed or inconsistent launcher variables, or ``python`` started
            directly in a multi-task Slurm batch script.
    """
    environ = os.environ if environ is None else environ
    launcher, rank, world = _launcher_rank_world(environ)
    addr = _get(environ, "MASTER_ADDR")
    port = _int(environ, "MASTER_PORT", minimum=1)

    if launcher == "deepspeed/torchrun":
        local_world = _first_int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", minimum=1) or world
        local_rank = _int(environ, "LOCAL_RANK")
        if local_rank is None:
            local_rank = local_rank_arg if local_rank_arg is not None and local_rank_arg >= 0 else rank % local_world
        node_rank = _first_int(environ, "GROUP_RANK", "CROSS_RANK", "NODE_RANK")
        if node_rank is None:
            node_rank = rank // local_world
        addr = addr or DEFAULT_ADDR
        port = port or DEFAULT_PORT  # torch's default; both launchers always set MASTER_PORT anyway
    elif launcher == "slurm":
        node_rank = _int(environ, "SLURM_NODEID") or 0
        local_rank = _int(environ, "SLURM_LOCALID") or 0
        local_world = None
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            spec = _get(environ, name)
            if spec is not None:
                local_world = _slurm_tasks_on_node(spec, node_rank)
                if local_world is not None:
                    break
        # srun always sets the tasks-per-node strings; a bare SLURM_NTASKS means one node.
        local_world = local_world or _int(environ, "SLURM_NTASKS_PER_NODE", minimum=1) or world
        if world == 1:
            # Nobody else needs to find this process: loopback and any free port, so that no
            # node name has to resolve and concurrent one-task steps cannot collide.
            addr, port = addr or DEFAULT_ADDR, port or free_port()
        if addr is None:
            # The step's nodes (a step may use part of the job's); rank 0 is on the first.
            nodelist = next(
                (v for v in (_get(environ, n) for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")) if v),
                None,
            )
            addr = first_host(nodelist) if nodelist else DEFAULT_ADDR
        if port is None:
            job_id = _first_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
            port = slurm_port(job_id) if job_id is not None else DEFAULT_PORT
    else:
        local_rank, local_world, node_rank = 0, 1, 0
        addr = addr or DEFAULT_ADDR
        port = port or free_port()

    if not 0 <= local_rank < local_world:
        raise UserError(
            f"local rank {local_rank} is not below the {local_world} processes on this node "
            f"(launcher {launcher}); fix LOCAL_RANK/LOCAL_WORLD_SIZE (or SLURM_LOCALID/SLURM_TASKS_PER_NODE)."
        )
    if port > 65535:
        raise UserError(f"MASTER_PORT={port} is not a TCP port (1-65535); export a valid MASTER_PORT.")
    return DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, launcher)


def export_env(env: DistEnv) -> None:
    """Write the variables ``torch.distributed`` and DeepSpeed read into ``os.environ``.

    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, plus ``LOCAL_SIZE``: DeepSpeed's own name for the local world size,
    which its CPU shared-memory all-reduce reads.
    """
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size), LOCAL_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )


# ---------------------------------------------------------------------------- init


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: auto picks nccl when CUDA GPUs are visible, else gloo (CPU)."""
    timeout_s: int = 600
    """Collective timeout in seconds: when a rank dies or hangs, the others fail within about
    this long instead of waiting forever. Must exceed the longest stretch one rank works
    while the others wait (checkpoint saving, evaluation on rank 0)."""

    def check(self) -> list[tuple[str, str]]:
        if self.timeout_s < 1:
            return [("timeout_s", f"must be at least 1 second, got {self.timeout_s}; the default is 600")]
        return []


def choose_backend(requested: str, cuda_available: bool) -> str:
    """Resolve ``auto`` and refuse nccl without CUDA.

    Raises:
        UserError: nccl requested on a machine without visible CUDA GPUs.
    """
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise UserError(
            "dist.backend=nccl needs CUDA GPUs, but none are visible to this process "
            "(torch.cuda.is_available() is False). Use dist.backend=auto or gloo on CPU, or check "
            "CUDA_VISIBLE_DEVICES and the CUDA build of torch."
        )
    return requested


def _check_resolvable(env: DistEnv) -> None:
    try:
        socket.getaddrinfo(env.master_addr, env.master_port)
    except socket.gaierror:
        how = "the first host of the Slurm node list" if env.launcher == "slurm" else "MASTER_ADDR"
        raise UserError(
            f"the rendezvous host {env.master_addr!r} ({how}) cannot be resolved on this machine. "
            f"Add it to /etc/hosts or DNS, or export MASTER_ADDR=<address of rank 0's host>."
        ) from None


def init(cfg: DistConfig, local_rank_arg: int | None = None) -> DistEnv:
    """Detect the launcher, export its variables and start the process group.

    Sets the CUDA device to the local rank when CUDA is there (else glibc's malloc thresholds:
    :func:`pipeline.allocator.tune`), then calls ``deepspeed.init_distributed`` with the chosen
    backend and ``cfg.timeout_s`` (also for one process). Calling it again changes nothing.

    Raises:
        UserError: bad launcher variables, nccl without CUDA, fewer visible GPUs than
            processes on the node, an unresolvable rendezvous host.
    """
    env = detect(os.environ, local_rank_arg)
    if env.world_size > 1:
        _check_resolvable(env)
    export_env(env)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:  # CPU ranks' tensors live in glibc's heap: fixed thresholds (pipeline/allocator.py)
        allocator.tune()
    backend = choose_backend(cfg.backend, cuda)
    if cuda:
        count = torch.cuda.device_count()
        if env.local_rank < count:
            torch.cuda.set_device(env.local_rank)
        elif backend == "nccl":
            raise UserError(
                f"local rank {env.local_rank} uses GPU {env.local_rank}, but only {count} GPU(s) are "
                f"visible. Start at most {count} processes per node; under Slurm give every task all "
                f"of the node's GPUs (--gpus-per-node, not --gpus-per-task or --gpu-bind)."
            )

    quiet.install()  # before DeepSpeed's import, whichever entry point got here
    import deepspeed

    try:
        with quiet.stdout_filtered():  # DeepSpeed prints a banner per rank here
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,  # every variable is exported above: never probe mpi4py
                distributed_port=env.master_port,
                timeout=timedelta(seconds=cfg.timeout_s),
            )
    except RuntimeError as e:  # torch's DistNetworkError; only rank 0 listens, so only it says so
        if env.rank == 0 and is_addr_in_use(e):
            raise UserError(port_in_use_message(env.master_addr, env.master_port, env.launcher)) from None
        raise
    global _started
    _started = True
    got = torch.distributed.get_world_size()
    if got != env.world_size:  # a bug or a group started elsewhere with other settings
        raise RuntimeError(f"process group has {got} ranks but the launcher says {env.world_size}")
    _release_deepspeed_shm(env)
    return env


def _release_deepspeed_shm(env: DistEnv) -> None:
    """Unlink the /dev/shm segment DeepSpeed's CPU comm op made for this rank.

    On the CPU accelerator, when all ranks share one node (``LOCAL_SIZE == WORLD_SIZE``, as
    the DeepSpeed launcher and :func:`export_env` set it), ``init_distributed`` maps a 66 MB
    segment per rank in /dev/shm for its shared-memory all-reduce (used by AutoTP inference,
    not by training) and never unlinks it: every run leaked 66 MB of RAM per rank, and a
    rerun with the same address and port (a requeued Slurm job) would reopen stale ones.
    Once every rank has mapped its peers' segments (the barrier), the names can go; the
    mappings stay valid until the processes exit.
    """
    if env.local_world_size != env.world_size or not sys.platform.startswith("linux"):
        return  # DeepSpeed makes no segment then (the rule in its shm_interface.cpp)
    if env.world_size > 1:
        barrier()
    name = f"{DEEPSPEED_SHM}{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass  # not the CPU accelerator, or a DeepSpeed that names (or frees) it differently


# ---------------------------------------------------------------------------- helpers


def _initialized() -> bool:
    # Without torch imported there can be no process group; keeps print0 free of the import.
    tdist = sys.modules.get("torch.distributed")
    return tdist is not None and tdist.is_available() and tdist.is_initialized()


def _env_rank_world() -> tuple[int, int]:
    try:
        _, r, w = _launcher_rank_world(os.environ)
    except UserError:
        return 0, 1
    return r, w


def rank() -> int:
    """Global rank: from the process group once started, else from the launcher's environment."""
    if _initialized():
        import torch.distributed as tdist

        return tdist.get_rank()
    return _env_rank_world()[0]


def world_size() -> int:
    """Number of ranks: from the process group once started, else from the environment (1)."""
    if _initialized():
        import torch.distributed as tdist

        return tdist.get_world_size()
    return _env_rank_world()[1]


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only, flushed at once (logs of several ranks interleave otherwise)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def _device():
    import torch
    import torch.distributed as tdist

    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if not _initialized():
        return
    import torch
    import torch.distributed as tdist

    if tdist.get_backend() == "nccl":
        tdist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        tdist.barrier()


def _all_reduce(values: list, dtype_name: str, op_name: str) -> list:
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=getattr(torch, dtype_name), device=_device())
    tdist.all_reduce(t, op=getattr(tdist.ReduceOp, op_name))
    return t.tolist()


def all_reduce_max_int(value: int) -> int:
    """Maximum of ``value`` over all ranks (``value`` itself without a process group)."""
    if not _initialized():
        return int(value)
    return int(_all_reduce([int(value)], "int64", "MAX")[0])


def all_reduce_sum_float(value: float) -> float:
    """Sum of ``value`` over all ranks, in float64 (``value`` itself without a process group)."""
    if not _initialized():
        return float(value)
    return float(_all_reduce([float(value)], "float64", "SUM")[0])


def all_reduce_sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks in one collective (``values`` without a process group)."""
    if not _initialized():
        return [float(v) for v in values]
    return [float(v) for v in _all_reduce([float(v) for v in values], "float64", "SUM")]


def shutdown() -> None:
    """Destroy the process group if one is up (through DeepSpeed when it made it).

    Errors are not swallowed: a failure here means ranks disagree about the group.
    """
    if not _initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups
    else:
        import torch.distributed as tdist

        tdist.destroy_process_group()


DONE_MARKER_ENV = "PIPELINE_RANK_DONE"  # file for finish() to write the code to; set and read by slurm/rank.sh


def finish(code: int | None) -> NoReturn:
    """End an entry script's process with its stage's exit ``code`` (None: 0).

    Destroys the process group if the stage left one, writes the completion marker
    (:data:`DONE_MARKER_ENV`) when the stage ended with 0 or 75, and exits. A process that
    started a process group skips the interpreter's teardown: it runs what Python's exit
    would run first (joining non-daemon threads and ``concurrent.futures`` workers, then the
    ``atexit`` handlers: logging, TensorBoard, temp files), flushes, and ends with
    ``os._exit``. Why (measured on a 2-rank ZeRO-3 run): after :func:`shutdown`, and after
    the stage returned and ``gc.collect()``, the DeepSpeed engine is still alive (its
    parameters' gradient-accumulation hooks, C++ autograd nodes, hold its bound method: a
    cycle through C++ that Python's gc cannot see), and with it its optimizer's groups: two
    gloo backends (``gloo_tcp_loop`` and 2 ``pt_gloo_runloop`` threads each) and rank 0's
    TCP store (``pt_tcpstore_uv``) keep running. They are freed only in the interpreter's
    teardown, in whatever order it reaches them; a C++ thread that then touches a Python
    object (a tensor of a finished gloo work item) needs the GIL of a dying interpreter,
    which ends that thread with a forced unwind, and an unwind through a ``noexcept`` frame
    is ``std::terminate``: "terminate called without an active exception", SIGABRT (the
    mechanism pytorch/pytorch#179291 describes; seen here in 1 of ~28 launches, after the
    outputs were complete). Every output is written and closed before this is called; the
    teardown also cost ~2 s per rank.
    """
    code = int(code or 0)
    started = _started or _initialized()
    shutdown()
    marker = os.environ.get(DONE_MARKER_ENV)
    if marker and code in (0, 75):
        with open(marker, "w", encoding="utf-8") as f:
            f.write(f"{code}\n")
    if not started:
        sys.exit(code)
    import atexit
    import threading

    # What Py_FinalizeEx runs before the teardown, in its order (CPython internals, 3.8+).
    getattr(threading, "_shutdown", lambda: None)()
    getattr(atexit, "_run_exitfuncs", lambda: None)()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

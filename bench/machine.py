"""What the benchmarks share about the machine they run on: its load, CPU time, description.

Every benchmark here compares contenders on a small shared machine, so each waits for a quiet
moment before a run (:func:`wait_quiet`), measures CPU seconds beside wall time (:func:`tree_usage`,
:func:`children_cpu`) and records the machine and library versions (:func:`machine`) with its
results, and starts each run the same way (:func:`launch`). Used by bench/train.py and bench/dpo.py.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.dist import DEEPSPEED_SHM  # standard library and pipeline's light modules only


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes) since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tree_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system), system seconds and minor page faults of process ``pid`` and its
    live descendants (all threads; ``/proc/<pid>/stat``); NaNs if it is gone. A heap that glibc
    trims and grows again every step shows as faults and system time (docs/deepspeed.md)."""
    import psutil

    tot = {"cpu_s": 0.0, "system_s": 0.0, "minor_faults": 0.0}
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return dict.fromkeys(tot, float("nan"))
    tick = os.sysconf("SC_CLK_TCK")
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        minflt, utime, stime = int(fields[7]), int(fields[11]), int(fields[12])  # stat fields 10, 14, 15
        tot["cpu_s"] += (utime + stime) / tick
        tot["system_s"] += stime / tick
        tot["minor_faults"] += minflt
    return tot


def stage_scalars(run_dir: Path, tag: str) -> dict[int, float] | None:
    """``{step: value}`` of scalar ``tag`` in a stage run's TensorBoard (``<run>/tensorboard``); None
    without TensorBoard, {} when the run wrote no such scalar."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    if not (run_dir / "tensorboard").is_dir():
        return {}
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)} if tag in ea.Tags().get("scalars", []) else {}


def median(xs) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def machine(modules: tuple[str, ...] = ("torch", "deepspeed", "transformers", "accelerate")) -> dict:
    """The CPU, cores, memory, OS, Python and the versions of ``modules``, for a results file."""
    import psutil

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for mod in modules:
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a report field only
            versions[mod] = "?"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), **versions}


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> dict:
    """Wait (at most ``max_wait`` s) until other processes keep at most ``threshold`` cores busy.

    Other work on a 2-core machine moves every number; starting each run in a quiet moment
    (measured over ``window`` s while this process sleeps) removes most of that. Returns the last
    measured load and the seconds waited.
    """
    t0 = time.time()
    while True:
        b0 = busy_seconds()
        time.sleep(window)
        load = (busy_seconds() - b0) / window
        if load <= threshold or time.time() - t0 >= max_wait:
            return {"load_before": load, "waited_s": time.time() - t0}
        time.sleep(2.0)


def run_env(root: Path, **extra: str) -> dict:
    """The environment of a benchmarked run: no test hooks (``PIPELINE_TEST_*``), one thread per
    rank, offline, the project on PYTHONPATH, unbuffered output; ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_TEST_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(root), PYTHONUNBUFFERED="1", **extra)
    return env


def sweep_deepspeed_shm(since: float) -> int:
    """Remove the /dev/shm segments DeepSpeed's CPU comm op left since ``since`` (``time.time()``);
    returns how many.

    On the CPU accelerator ``deepspeed.init_distributed`` maps a 66 MB segment per rank
    (``pipeline.dist.DEEPSPEED_SHM`` + ``<uid>_<addr>_<port>_<rank>``) and never unlinks it: every bare
    DeepSpeed loop and HF Trainer run leaves 132 MB of RAM behind on 2 ranks (the stages unlink
    theirs, ``pipeline.dist._release_deepspeed_shm``; so do ranks that die before that only if
    something sweeps). A day of benchmark runs left 285 of them here (19 GB of the 24 GB, the
    OOM kills and the memory pressure of earlier sessions' runs). A segment still mapped by a
    live process belongs to a running job (possibly another session's, whose ranks would spin
    forever waiting for a segment removed under them) and is kept."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return 0
    in_use: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            in_use.update(line.rsplit("/", 1)[-1].strip() for line in maps.read_text().splitlines()
                          if f"/dev/shm/{DEEPSPEED_SHM}" in line)
        except OSError:
            pass
    removed = 0
    for seg in shm.glob(f"{DEEPSPEED_SHM}{os.getuid()}_*"):
        try:
            if seg.name not in in_use and seg.stat().st_mtime >= since - 1:
                seg.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def launch(cmd: list[str], log_path: Path, timeout: float, *, cwd: Path, env: dict, step_fn: Callable[[str], int | None] | None = None,
           cpu_at: tuple[int, ...] = (), on_timeout: Callable[[int], list[str]] | None = None) -> dict:
    """Run ``cmd`` (in a new session, killed as a group after ``timeout`` s) and write its log.

    Returns every stdout/stderr line with its arrival time (``time.time()``), :func:`tree_usage` of
    the process tree (``usage_snap``: CPU and system seconds, minor faults) when the lines of
    steps ``cpu_at`` arrive (``step_fn(line)`` -> step or None), the run's own CPU seconds, the
    machine's busy seconds meanwhile and the cores other processes kept busy. ``on_timeout(pid)`` gives lines to log before the kill (e.g. stacks).
    """
    lines: list[tuple[float, str]] = []
    usage_snap: dict[int, dict[str, float]] = {}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    busy0, cpu0 = busy_seconds(), children_cpu()
    t_launch = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def read() -> None:
        for raw in iter(proc.stdout.readline, b""):
            lines.append((time.time(), raw.decode("utf-8", "replace").rstrip("\n")))
            if step_fn is not None and cpu_at:
                n = step_fn(lines[-1][1])
                if n in cpu_at:
                    usage_snap[n] = tree_usage(proc.pid)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        lines.append((time.time(), f"BENCH-TIMEOUT after {timeout} s" + ("; the ranks' stacks:" if on_timeout else "")))
        if on_timeout is not None:
            lines.extend((time.time(), text) for text in on_timeout(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)  # the group this run leads (start_new_session)
        rc = proc.wait()
    t_end = time.time()
    reader.join(timeout=10)
    leaked = sweep_deepspeed_shm(t_launch)  # what DeepSpeed left of this run: RAM the next runs would lack
    busy, cpu = busy_seconds() - busy0, children_cpu() - cpu0
    with open(log_path, "w") as f:
        f.write(f"# {' '.join(map(str, cmd))}\n# launched at {t_launch:.6f}; rc {rc}; DeepSpeed shm segments left and removed: {leaked}\n")
        f.writelines(f"{t - t_launch:9.3f} {text}\n" for t, text in lines)
    wall = t_end - t_launch
    return {"rc": rc, "shm_leaked": leaked, "t_launch": t_launch, "wall_s": wall, "lines": lines, "usage_snap": usage_snap, "cpu_s": cpu, "busy_s": busy,
            "others_cores": max(0.0, (busy - cpu) / wall) if wall > 0 else 0.0}

"""The peak RSS of each rank process of a launch: one poller for the benchmarks and the tests.

    from bench.rank_peaks import run_with_rank_peaks
    proc, peaks = run_with_rank_peaks(["deepspeed", "--num_gpus", "2", "launch/train.py", ...], env=env, cwd=ROOT)

A launcher (``deepspeed``, ``torchrun``) starts the ranks as its children; each rank's peak is
the kernel's high-water mark of its resident set (``VmHWM`` in ``/proc/<pid>/status``), which
survives frees, so polling every ``interval`` seconds misses nothing that happened between two
polls, only the last ``interval`` of a rank's life (the peak is reached well before exit in a
training run). A rank process is one whose command line has ``--local_rank`` (what the
``deepspeed`` launcher passes) and whose parent is not a rank too: what a rank forks (data
loader workers, compile subprocesses) inherits the command line but is not a rank.
Linux only (``/proc``); needs ``psutil``.
"""

from __future__ import annotations

import subprocess
import threading


def _is_rank(p) -> bool:
    return any(a.startswith("--local_rank") for a in p.cmdline())


def poll_rank_peaks(pid: int, peaks: dict[int, int], done: threading.Event, interval: float = 0.2) -> None:
    """Until ``done`` is set: ``peaks[rank pid] = max VmHWM in bytes`` for every rank under ``pid``."""
    import psutil

    while not done.is_set():
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            kids = []
        for k in kids:
            try:
                if not _is_rank(k) or _is_rank(k.parent()):
                    continue
                with open(f"/proc/{k.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmHWM:"):
                            peaks[k.pid] = max(peaks.get(k.pid, 0), int(line.split()[1]) * 1024)
                            break
            except (OSError, psutil.Error, AttributeError):  # gone between listing and reading (parent() -> None)
                pass
        done.wait(interval)


def run_with_rank_peaks(cmd: list[str], *, env: dict | None = None, cwd=None, timeout: float | None = None,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text: bool = True,
                        interval: float = 0.2) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run ``cmd`` to completion; return it (``stdout``/``stderr`` captured unless redirected, as
    for :func:`subprocess.run`) and the peak RSS in bytes of each rank process it started, sorted.

    On ``timeout`` the launch is killed and :class:`subprocess.TimeoutExpired` raised, as
    :func:`subprocess.run` does."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=text)
    peaks: dict[int, int] = {}
    done = threading.Event()
    th = threading.Thread(target=poll_rank_peaks, args=(proc.pid, peaks, done, interval), daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        done.set()
        th.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), sorted(peaks.values())

"""The rendezvous port: how each launcher's port is chosen, and what to say when it is taken.

Rank 0 of a job listens on ``MASTER_PORT`` (torch's TCP store); every other rank connects to
it. Two jobs on one host that pick the same port collide: the second rank 0 fails with
``EADDRINUSE``. Who picks the port:

* ``deepspeed`` and ``torchrun``: the user (default 29500 for both, so two runs on one
  workstation collide unless one is given ``--master_port`` / ``--master-port``).
  :func:`port_in_use_message` is what rank 0 then prints instead of torch's traceback.
* the quickstart: :func:`free_port` for each launch.
* the Slurm batch scripts (``slurm/common.sh``): :func:`slurm_port` from the job id (a
  requeued job keeps it), stepped by :func:`first_free_port` on the head node when another
  process there holds it (:func:`main`: ``python -m pipeline.rendezvous slurm-port JOBID``). Ranks started
  by a bare ``srun`` derive :func:`slurm_port` each on their own (:func:`pipeline.dist.detect`)
  and cannot step: they have no way to agree on a different port before the rendezvous.

Imports nothing heavy: the batch scripts run it before any rank starts.
"""

from __future__ import annotations

import errno
import socket
import sys

SLURM_PORT_BASE = 10000
"""First port a Slurm job can derive; with the span, ports stay below Linux's ephemeral
range (32768-60999), where outgoing connections take their local ports."""
SLURM_PORT_SPAN = 20000
DEFAULT_PORT = 29500  # torch's and DeepSpeed's default MASTER_PORT
_MAX_STEPS = 100  # ports tried after the derived one; more busy ports in a row means a broken node


def slurm_port(job_id: int) -> int:
    """The rendezvous port of Slurm job ``job_id``: ``10000 + job_id % 20000``.

    Every rank of a job computes the same port without talking to the others; two jobs on
    one node collide only when their ids are equal modulo 20000.
    """
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def free_port() -> int:
    """A TCP port that was free on this host a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a listening socket could take ``port`` on every address of this host now.

    Binds as torch's store does (all addresses, ``SO_REUSEADDR``), so a port held only by
    connections in TIME_WAIT counts as free, as it does for the store.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def first_free_port(start: int) -> int:
    """``start`` if free here, else the next free port, stepping by one through the Slurm span.

    Deterministic for a given set of busy ports: a requeued job on the same node starts from
    the same port and steps the same way.

    Raises:
        OSError: none of ``start`` and the next 100 ports is free.
    """
    for i in range(_MAX_STEPS + 1):
        port = SLURM_PORT_BASE + (start - SLURM_PORT_BASE + i) % SLURM_PORT_SPAN
        if port_is_free(port):
            return port
    raise OSError(errno.EADDRINUSE, f"ports {start} to {start + _MAX_STEPS} (stepping through {SLURM_PORT_BASE}-"
                  f"{SLURM_PORT_BASE + SLURM_PORT_SPAN - 1}) are all in use on {socket.gethostname()}")


def is_addr_in_use(exc: BaseException) -> bool:
    """Whether ``exc`` is the store's failure to listen because the port is taken."""
    text = str(exc)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def port_in_use_message(addr: str, port: int, launcher: str) -> str:
    """What rank 0 says when its rendezvous port is taken: what happened and how to pick another."""
    suggestion = free_port()
    if launcher == "slurm":
        how = (f"The Slurm batch scripts (slurm/*.sh) step to a free port themselves; with a bare srun, "
               f"export MASTER_PORT={suggestion} (or any free port) before srun.")
    else:
        how = (f"Give this run another port: `deepspeed --master_port {suggestion} ...`, "
               f"`torchrun --master-port {suggestion} ...`, or export MASTER_PORT={suggestion} "
               f"({suggestion} is free now).")
    return (f"the rendezvous port {port} on {addr} is already in use: another job on this machine "
            f"(a second DeepSpeed or torchrun run uses {DEFAULT_PORT} unless told otherwise) or another program "
            f"listens there, so rank 0 cannot host the rendezvous. {how}")


def main(argv: list[str]) -> int:
    """``slurm-port JOBID``: print the first free port from the job's derived port."""
    if len(argv) != 2 or argv[0] != "slurm-port" or not argv[1].isdigit():
        print("usage: python -m pipeline.rendezvous slurm-port JOBID", file=sys.stderr)
        return 2
    try:
        print(first_free_port(slurm_port(int(argv[1]))))
    except OSError as e:
        print(f"error: {e.strerror}; export MASTER_PORT=<a free port> in the batch script", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

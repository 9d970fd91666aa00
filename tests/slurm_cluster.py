"""A real Slurm on localhost (Debian's packages): start, stop, submit, wait.

The Slurm tests (``tests/test_slurm.py``) use it as a session fixture; by hand it is a
script::

    python tests/slurm_cluster.py up [--nodes 2] [--cpus 2] [--dir /tmp/pipeline-slurm]
    export SLURM_CONF=/tmp/pipeline-slurm/slurm.conf      # printed by `up`
    sbatch ...; squeue; scontrol show job N
    python tests/slurm_cluster.py down [--dir /tmp/pipeline-slurm]

What it starts (facts measured on the build machine are in the shared GUIDE):

* Slurm 22.05 from ``slurmctld slurmd slurm-client munge``, installed with apt-get when
  missing and we are root (:func:`ensure_installed`); otherwise :class:`Unavailable`, which
  the tests turn into a skip with the reason.
* A private ``munged`` (run as user munge) on a socket inside the cluster directory, so two
  clusters (two test sessions) never share or stop each other's daemons.
* ``slurmctld`` and one ``slurmd`` per emulated node (``n1``, ``n2``: names added to
  /etc/hosts, all on 127.0.0.1, slurmd ports 17001, 17002 when free). Each node declares
  ``cpus`` CPUs (the configured count is used, not the hardware's) and ``gpus`` fake GPUs
  (gres backed by empty files: jobs can ask for ``--gpus-per-node`` and see no CUDA
  device, so the pipeline picks gloo).
* Every daemon is started with ``setsid`` in the background, its PID kept in
  ``cluster.json``; :meth:`SlurmCluster.down` stops them by PID (SIGTERM, then SIGKILL
  after 10 s). Waits are bounded. A cluster left behind by a test session that died is
  stopped by the next session.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged", "munge")
NODE_PORTS = (17001, 17002)
CTLD_PORT = 16817
MUNGE_KEY = Path("/etc/munge/munge.key")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                   "PREEMPTED"}
_STOP_GRACE_S = 10.0


class Unavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt-get, no package); a skip reason."""


# ---------------------------------------------------------------------------- installation


def _which_missing() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_installed(timeout: float = 600) -> None:
    """Install Debian's Slurm and munge packages when missing (root with apt-get only).

    Raises:
        Unavailable: not root, no apt-get, or the installation failed (reason included).
    """
    missing = _which_missing()
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"Slurm is not installed (missing {', '.join(missing)}) and installing it needs root")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"Slurm is not installed (missing {', '.join(missing)}) and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise Unavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-600:]}")
    missing = _which_missing()
    if missing:
        raise Unavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} are still missing")
    if not MUNGE_KEY.exists():
        raise Unavailable(f"the munge package left no key at {MUNGE_KEY}")


# ---------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    """True while ``pid`` runs and is not a zombie (``kill -0`` succeeds on zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_pids(pids: list[int], grace: float = _STOP_GRACE_S) -> None:
    """SIGTERM every live pid, SIGKILL those still alive after ``grace`` seconds, reap children."""
    live = [p for p in pids if _alive(p)]
    for p in live:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in live):
        _reap(live)
        time.sleep(0.1)
    for p in live:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in live):
        _reap(live)
        time.sleep(0.1)
    _reap(live)


def _reap(pids: list[int]) -> None:
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child (a cluster started by another process): init reaps it


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int, taken: set[int]) -> int:
    """``preferred`` when free, else a free port in 30000-32767: above the rendezvous ports
    jobs of this cluster derive (10000 + job id % 20000, see FirstJobId below) and below
    Linux's ephemeral range, where srun and the ranks take theirs."""
    if preferred not in taken and _port_free(preferred):
        return preferred
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(30000, 32768)
        if port not in taken and _port_free(port):
            return port
    raise RuntimeError("no free TCP port found in 30000-32767 for the Slurm daemons")


def ensure_hosts(names: list[str]) -> None:
    """Make every name resolve (append ``127.0.0.1 name`` to /etc/hosts for those that do not)."""
    missing = []
    for name in names:
        try:
            addrs = {a[4][0] for a in socket.getaddrinfo(name, None)}
        except socket.gaierror:
            missing.append(name)
            continue
        if not any(a.startswith("127.") or a == "::1" for a in addrs):
            raise Unavailable(f"host name {name} already resolves to {', '.join(sorted(addrs))}, not to this host")
    if not missing:
        return
    try:
        with open("/etc/hosts", "a") as f:  # append in place: /etc/hosts may be a bind mount
            f.write(f"127.0.0.1 {' '.join(missing)}  # pipeline tests (tests/slurm_cluster.py)\n")
    except OSError as e:
        raise Unavailable(f"cannot add {', '.join(missing)} to /etc/hosts ({e}); they must resolve to 127.0.0.1") from None


# ---------------------------------------------------------------------------- the cluster


@dataclass
class SlurmCluster:
    """One slurmctld plus ``nodes`` slurmd daemons on this host, state under ``root``.

    Args:
        root: directory for config, state, spool, logs and the munge socket (created).
        nodes: 1 or more emulated nodes n1, n2, ...
        cpus: CPUs each node declares (the hardware may have fewer: oversubscription).
        gpus: fake GPUs per node (gres ``gpu``), 0 for none.
        owner: PID of the process that owns the cluster (tests: the pytest process; a
            later session stops the cluster once its owner is gone); None for `up`.
    """

    root: Path
    nodes: int = 2
    cpus: int = 2
    gpus: int = 2
    owner: int | None = None
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    first_job_id: int = 0

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF``: what a client command (and a job) needs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ start / stop

    def up(self, timeout: float = 60) -> SlurmCluster:
        """Install if needed, write the config, start munged, slurmctld and the slurmds.

        Returns once every node is idle (within ``timeout`` seconds); stops what it started
        and raises RuntimeError (with log tails) otherwise.

        Raises:
            Unavailable: Slurm cannot be installed here.
        """
        ensure_installed()
        ensure_hosts(self.node_names)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) must reach its socket directory
        try:
            self._write_config()
            self._start_munge()
            self._start("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._wait(lambda: self.scontrol("ping").returncode == 0, 30, "slurmctld did not answer `scontrol ping`")
            for name in self.node_names:
                self._start(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "nodes did not become idle")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every daemon of this cluster by PID (slurmds first, munged last)."""
        order = sorted(self.pids, key=lambda n: (n.startswith("munged"), n.startswith("slurmctld")))
        for name in order:
            if "slurmctld" not in name and "munged" not in name:
                _stop_pids([self.pids[name]])
        for name in order:
            _stop_pids([self.pids[name]])
        self.pids = {}
        self._save()

    def _write_config(self) -> None:
        for sub in ("state", "log", "munge", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        self.ports["slurmctld"] = _pick_port(CTLD_PORT, taken)
        taken.add(self.ports["slurmctld"])
        for i, name in enumerate(self.node_names):
            self.ports[name] = _pick_port(NODE_PORTS[i] if i < len(NODE_PORTS) else 17001 + i, taken)
            taken.add(self.ports[name])
        # Job ids start at a random offset: two clusters on one host would otherwise both run
        # job 1, and the pipeline derives its rendezvous port from the job id (10000 + id %
        # 20000). From 8000 to 18999, the next thousand jobs use ports 18000-29999, clear of
        # the daemons' (16817, 17001-..., or 30000+).
        self.first_job_id = self.first_job_id or random.randrange(8000, 18000)
        host = socket.gethostname().split(".")[0]
        r = self.root
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = [
            "ClusterName=pipeline",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ports['slurmctld']}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (no accounting here)
            "KillWait=10",
            f"FirstJobId={self.first_job_id}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *(["GresTypes=gpu"] if self.gpus else []),
            *(
                f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.ports[n]} CPUs={self.cpus}{gres} State=UNKNOWN"
                for n in self.node_names
            ),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        if self.gpus:
            for i in range(self.gpus):
                (r / f"fakegpu{i}").touch()
            # A count-only gres line is reported as 0 GPUs (node INVAL): name device files.
            self.conf.with_name("gres.conf").write_text(f"Name=gpu File={r}/fakegpu[0-{self.gpus - 1}]\n")
        self._save()

    def _start_munge(self) -> None:
        d = self.root / "munge"
        shutil.chown(d, "munge", "munge")
        d.chmod(0o755)
        cmd = ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "-F", f"--socket={d}/munge.socket",
               f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed",
               f"--key-file={MUNGE_KEY}"]
        self._start("munged", cmd)

        def ok() -> bool:
            enc = subprocess.run(["munge", "-n", "-S", f"{d}/munge.socket"], capture_output=True, timeout=10)
            return enc.returncode == 0 and subprocess.run(["unmunge", "-S", f"{d}/munge.socket"], input=enc.stdout,
                                                          capture_output=True, timeout=10).returncode == 0

        self._wait(ok, 20, "munged did not answer on its socket")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, cwd=self.root)
        log.close()
        self.pids[name] = proc.pid
        self._save()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once (code {proc.returncode}):\n{self.log_tail(name)}")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [n for n, p in self.pids.items() if not _alive(p)]
            if dead:
                raise RuntimeError(f"{what}: {', '.join(dead)} exited\n" + "\n".join(self.log_tail(n) for n in dead))
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout:.0f} s\n" + "\n".join(self.log_tail(n) for n in self.pids))

    def _nodes_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"])
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.node_names)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        """The end of a daemon's logs (its stdout and Slurm's own log file)."""
        out = []
        for p in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log", self.root / "munge" / "munged.log"):
            if p.exists() and (name in p.name or (name == "munged" and p.parent.name == "munge")):
                out.append(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ state file

    def _save(self) -> None:
        data = {"nodes": self.nodes, "cpus": self.cpus, "gpus": self.gpus, "owner": self.owner, "pids": self.pids,
                "ports": self.ports, "first_job_id": self.first_job_id}
        tmp = self.root / "cluster.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.root / "cluster.json")

    @classmethod
    def load(cls, root: Path) -> SlurmCluster:
        data = json.loads((Path(root) / "cluster.json").read_text())
        return cls(Path(root), data["nodes"], data["cpus"], data["gpus"], data.get("owner"), data["pids"], data["ports"],
                   data.get("first_job_id", 0))

    def running(self) -> dict[str, int]:
        """The daemons of this cluster that are still alive (name -> pid)."""
        return {n: p for n, p in self.pids.items() if _alive(p) and ("slurm" in _cmdline(p) or "munge" in _cmdline(p))}

    # ------------------------------------------------------------------ client helpers

    def run(self, cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a client command against this cluster (text output captured)."""
        kw.setdefault("env", self.env)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args])

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None, env: dict | None = None) -> int:
        """``sbatch --parsable ARGS``; returns the job id (RuntimeError with sbatch's message on failure)."""
        proc = self.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (empty when the job is unknown)."""
        proc = self.scontrol("show", "job", "-o", str(job_id))
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.strip().splitlines()[0]))

    def wait(self, job_id: int, until, timeout: float, what: str = "") -> dict[str, str]:
        """Poll ``job(job_id)`` until ``until(info)`` is true; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and until(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: {what or 'condition'} not reached within {timeout:.0f} s; last state: "
                             f"{info.get('JobState')} {info.get('Reason')}\n{self.scontrol('show', 'job', str(job_id)).stdout}")

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job reaches a final state (COMPLETED, FAILED, CANCELLED, ...)."""
        return self.wait(job_id, lambda i: i.get("JobState") in TERMINAL_STATES, timeout, "a final state")


# ---------------------------------------------------------------------------- sessions


def stop_stale(base: Path | None = None) -> list[Path]:
    """Stop clusters under ``base`` (default: the temp dir) whose owner process has died."""
    base = Path(base or tempfile.gettempdir())
    stopped = []
    for state in base.glob("pipeline-slurm-*/cluster.json"):
        try:
            cluster = SlurmCluster.load(state.parent)
        except (OSError, ValueError, KeyError):
            continue
        if cluster.owner is not None and not _alive(cluster.owner) and cluster.running():
            cluster.pids = cluster.running()
            cluster.down()
            stopped.append(state.parent)
    return stopped


def start_for_tests(nodes: int = 2, cpus: int = 2, gpus: int = 2) -> SlurmCluster:
    """A fresh cluster in a new temp dir owned by this process (stale ones stopped first).

    Raises:
        Unavailable: Slurm cannot be installed or started here.
    """
    stop_stale()
    root = Path(tempfile.mkdtemp(prefix="pipeline-slurm-"))
    return SlurmCluster(root, nodes=nodes, cpus=cpus, gpus=gpus, owner=os.getpid()).up()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/slurm_cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "pipeline-slurm", help="cluster directory")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes n1..nN (default 2)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs each node declares (default 2)")
    parser.add_argument("--gpus", type=int, default=2, help="fake GPUs per node (default 2; 0 for none)")
    ns = parser.parse_args(argv)
    state = ns.dir / "cluster.json"
    existing = SlurmCluster.load(ns.dir) if state.exists() else None
    if ns.action == "status":
        live = existing.running() if existing else {}
        print(json.dumps({"dir": str(ns.dir), "running": live, "ports": existing.ports if existing else {}}, indent=1))
        return 0 if live else 1
    if ns.action == "down":
        if existing is None:
            print(f"no cluster in {ns.dir}")
            return 0
        existing.down()
        print(f"stopped the cluster in {ns.dir}")
        return 0
    if existing is not None and existing.running():
        print(f"a cluster is already running in {ns.dir} (pids {existing.running()}); `down` it first", file=sys.stderr)
        return 1
    try:
        cluster = SlurmCluster(ns.dir, nodes=ns.nodes, cpus=ns.cpus, gpus=ns.gpus).up()
    except Unavailable as e:
        print(f"cannot start Slurm here: {e}", file=sys.stderr)
        return 2
    print(f"Slurm is up: nodes {', '.join(cluster.node_names)} ({ns.cpus} CPUs, {ns.gpus} fake GPUs each), state in {ns.dir}")
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

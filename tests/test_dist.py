"""pipeline.dist: launcher detection from fake environments, backend choice, real gloo runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline import allocator, dist
from pipeline.config import field_docs, load_config
from pipeline.dist import DistConfig, DistEnv, choose_backend, detect, expand_nodelist, slurm_port
from pipeline.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "GROUP_RANK", "CROSS_RANK", "NODE_RANK",
)  # fmt: skip
START_ENV = {k: os.environ.get(k) for k in LAUNCHER_VARS}  # at collection, before any test


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any launcher/Slurm variables (tests may themselves run under srun)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **extra}


def run_ranks(script: str, envs: list[dict[str, str]], timeout: float = 60) -> list[subprocess.CompletedProcess]:
    """Start one ``python -c script`` per env at once; wait for all; return their results."""
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for e in envs
    ]
    out = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, None))
    return out


@pytest.fixture
def no_launcher_env(monkeypatch):
    """No launcher variables now; whatever the test (or init's export_env) sets is undone after."""
    for k in LAUNCHER_VARS:
        monkeypatch.setenv(k, "")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(k)


@pytest.fixture
def no_scontrol(monkeypatch):
    """Force the pure-Python node-list parser even where scontrol is installed."""
    monkeypatch.setattr(dist, "_scontrol_hostnames", lambda nodelist: None)


def slurm_env(**over: str) -> dict[str, str]:
    env = {
        "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_TASKS_PER_NODE": "1(x2)",
    }  # fmt: skip
    env.update(over)
    return env


# ---------------------------------------------------------------------------- detect


def test_single_process_defaults():
    env = detect({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (0, 1, 0, 1, 0)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536
    assert env.is_main
    assert detect({"MASTER_PORT": "31000"}).master_port == 31000


def test_torchrun_env():
    env = detect(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
         "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    )  # fmt: skip
    assert env == DistEnv(5, 8, 1, 4, 1, "node0", 29400, "deepspeed/torchrun")


def test_deepspeed_env_and_local_rank_arg():
    base = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    env = detect(base, local_rank_arg=1)  # LOCAL_RANK missing: the --local_rank argument counts
    assert (env.local_rank, env.local_world_size, env.node_rank) == (1, 2, 1)
    assert env.launcher == "deepspeed/torchrun"
    assert detect({**base, "LOCAL_RANK": "1"}, local_rank_arg=None).local_rank == 1
    # Neither: local rank from the global rank and the node size.
    assert detect(base).local_rank == 1
    # No node info at all: one node, node rank 0.
    env = detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})
    assert (env.local_rank, env.local_world_size, env.node_rank) == (1, 2, 0)


def test_rank_env_wins_over_slurm(no_scontrol):
    env = detect({**slurm_env(SLURM_PROCID="1"), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert env.launcher == "deepspeed/torchrun" and env.rank == 0


@pytest.mark.parametrize(
    "nodelist, first",
    [("n[1-2]", "n1"), ("gpu[07-09,11],cpu01", "gpu07"), ("node17", "node17"), ("a,b[3-4]", "a")],
)
def test_slurm_master_addr_is_first_host(no_scontrol, nodelist, first):
    env = detect(slurm_env(SLURM_JOB_NODELIST=nodelist))
    assert env.launcher == "slurm" and env.master_addr == first
    assert (env.rank, env.world_size) == (0, 2)


def test_slurm_full_layout(no_scontrol):
    env = detect(
        slurm_env(SLURM_PROCID="5", SLURM_NTASKS="6", SLURM_LOCALID="1", SLURM_NODEID="2",
                  SLURM_JOB_NODELIST="gpu[07-09,11],cpu01", SLURM_TASKS_PER_NODE="2(x3)", SLURM_JOB_ID="123")
    )  # fmt: skip
    assert env == DistEnv(5, 6, 1, 2, 2, "gpu07", slurm_port(123), "slurm")
    # The step's node list and task layout win over the job's.
    env = detect(slurm_env(SLURM_STEP_NODELIST="n[5-6]", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_TASKS_PER_NODE="4"))
    assert env.master_addr == "n5" and env.local_world_size == 1
    # Only SLURM_NTASKS_PER_NODE known.
    env = detect({k: v for k, v in slurm_env(SLURM_NTASKS_PER_NODE="2").items() if k != "SLURM_TASKS_PER_NODE"})
    assert env.local_world_size == 2


def test_slurm_port_from_job_id_and_master_port_override(no_scontrol):
    p1 = detect(slurm_env(SLURM_JOB_ID="1001")).master_port
    p2 = detect(slurm_env(SLURM_JOB_ID="1002")).master_port
    assert p1 == slurm_port(1001) == 11001 and p2 == 11002 and p1 != p2
    assert all(10000 <= slurm_port(j) < 30000 for j in (0, 1, 19999, 20000, 987654321))
    assert detect(slurm_env(SLURM_JOB_ID="1001", MASTER_PORT="23456")).master_port == 23456
    assert detect(slurm_env(MASTER_ADDR="head")).master_addr == "head"


def test_slurm_uses_scontrol_when_it_answers(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "_scontrol_hostnames", lambda nl: seen.append(nl) or ["from-scontrol", "x"])
    assert detect(slurm_env(SLURM_JOB_NODELIST="weird{syntax}")).master_addr == "from-scontrol"
    assert seen == ["weird{syntax}"]


def test_slurm_batch_script_without_srun_is_refused(no_scontrol):
    env = {k: v for k, v in slurm_env().items() if k != "SLURM_STEP_ID"}
    with pytest.raises(UserError, match="srun"):
        detect(env)
    # One task without srun is just a single process of the job, reachable on loopback.
    one = detect({**env, "SLURM_NTASKS": "1"})
    assert (one.world_size, one.launcher, one.master_addr) == (1, "slurm", "127.0.0.1")


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "not below world size"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3"),
        ({"MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_bad_launcher_env(env, match):
    with pytest.raises(UserError, match=match):
        detect(env)


def test_expand_nodelist():
    assert expand_nodelist("gpu[07-09,11],cpu01") == ["gpu07", "gpu08", "gpu09", "gpu11", "cpu01"]
    assert expand_nodelist("n[1-2]") == ["n1", "n2"]
    assert expand_nodelist("n[8-11]") == ["n8", "n9", "n10", "n11"]
    assert expand_nodelist("r[1-2]-n[01-02]") == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
    for bad in ("n[1-2", "n1-2]", "n[a-b]", "n[3-1]", ""):
        with pytest.raises(ValueError):
            expand_nodelist(bad)


def test_unparsable_nodelist_is_a_user_error(no_scontrol):
    with pytest.raises(UserError, match="MASTER_ADDR"):
        detect(slurm_env(SLURM_JOB_NODELIST="n[1-"))


def test_export_env(no_launcher_env):
    dist.export_env(DistEnv(3, 4, 1, 2, 1, "h", 12345, "slurm"))
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "2",
        "MASTER_ADDR": "h", "MASTER_PORT": "12345",
    }  # fmt: skip
    # What the launcher variables say, before any process group exists.
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (3, 4, False)


# ---------------------------------------------------------------------------- backend / config


def test_backend_choice():
    assert choose_backend("auto", cuda_available=True) == "nccl"
    assert choose_backend("auto", cuda_available=False) == "gloo"
    assert choose_backend("gloo", cuda_available=True) == "gloo"
    assert choose_backend("nccl", cuda_available=True) == "nccl"
    with pytest.raises(UserError, match="nccl needs CUDA"):
        choose_backend("nccl", cuda_available=False)


def test_init_nccl_without_cuda_is_a_user_error(monkeypatch, no_launcher_env):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="nccl"):
        dist.init(DistConfig(backend="nccl"))
    assert not torch.distributed.is_initialized()


def test_config_docs_and_check():
    docs = field_docs(DistConfig)
    assert set(docs) == {"backend", "timeout_s"} and "seconds" in docs["timeout_s"]
    assert load_config(DistConfig, overrides=["backend=gloo", "timeout_s=30"]) == DistConfig("gloo", 30)
    with pytest.raises(ConfigError, match="timeout_s"):
        load_config(DistConfig, overrides=["timeout_s=0"])
    with pytest.raises(ConfigError, match="backend"):
        load_config(DistConfig, overrides=["backend=mpi"])


def test_helpers_without_process_group(capsys, monkeypatch, no_launcher_env):
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.all_reduce_max_int(7) == 7 and dist.all_reduce_sum_float(1.5) == 1.5
    dist.barrier()
    dist.shutdown()
    dist.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.print0("hidden")
    assert capsys.readouterr().out == ""


def test_single_process_init_in_process(monkeypatch, no_launcher_env):
    """World size 1 goes through deepspeed.init_distributed too; re-init after shutdown works."""
    import deepspeed.comm
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(allocator, "_state", None)
    for name in allocator.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    try:
        for attempt in range(2):
            env = dist.init(DistConfig(timeout_s=30))
            # a CPU rank fixes glibc's malloc thresholds before any model exists (pipeline/allocator.py)
            # (a jemalloc/tcmalloc the machine preloads, or its GLIBC_TUNABLES, is left as set)
            chosen = allocator.user_choice(os.environ)
            assert allocator.state() == (f"left as set: {chosen}" if chosen else
                                         "glibc malloc: mmap threshold 32 MiB, trim threshold 64 MiB"
                                         if allocator.is_glibc() else "left as is: not glibc")
            # The second time detect() reads back the variables the first init exported.
            assert env.launcher == ("single" if attempt == 0 else "deepspeed/torchrun")
            assert (env.rank, env.world_size, os.environ["WORLD_SIZE"]) == (0, 1, "1")
            assert torch.distributed.is_initialized() and deepspeed.comm.is_initialized()
            assert torch.distributed.get_backend() == "gloo"
            assert dist.all_reduce_max_int(4) == 4 and dist.all_reduce_sum_float(0.25) == 0.25
            shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_0"
            assert not os.path.exists(shm)
            dist.barrier()
            dist.shutdown()
            assert not torch.distributed.is_initialized()
    finally:
        dist.shutdown()


# ---------------------------------------------------------------------------- two real ranks

WORKER = textwrap.dedent(
    """
    import dataclasses, json, os, time
    from pipeline import dist
    env = dist.init(dist.DistConfig(backend="auto", timeout_s=int(os.environ["TEST_TIMEOUT_S"])))
    r = env.rank
    res = {"env": list(dataclasses.astuple(env)), "rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main()}
    res["max"] = dist.all_reduce_max_int(10 * r + 3)
    res["sum"] = dist.all_reduce_sum_float(0.5 + r)
    shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{r}"
    res["shm_left"] = os.path.exists(shm)
    dist.barrier()
    dist.print0("printed-by-rank", r)
    # A rank that stops taking part: the other must fail within about timeout_s, not hang.
    t0 = time.monotonic()
    if r == 0:
        try:
            dist.all_reduce_max_int(1)
            res["hung_collective"] = "returned"
        except Exception as e:
            res["hung_collective"] = type(e).__name__
        res["fail_after_s"] = time.monotonic() - t0
    else:  # stay alive (a dead peer fails fast anyway) until rank 0 has seen its collective fail
        while not os.path.exists(os.environ["TEST_OUT"] + ".0.json") and time.monotonic() - t0 < 30:
            time.sleep(0.05)
    with open(os.environ["TEST_OUT"] + f".{r}.json", "w") as f:
        json.dump(res, f)
    if r == 1:
        dist.shutdown()
        import torch.distributed
        assert not torch.distributed.is_initialized()
    os._exit(0)  # rank 0's group is broken by the failed collective: skip the exit handlers
    """
)


@pytest.mark.slow
def test_two_ranks_gloo_slurm_style(tmp_path):
    """Two processes that see only Slurm variables start a gloo group and reduce correctly."""
    port = str(dist.free_port())
    timeout_s = 3
    envs = [
        clean_env(
            SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODEID="0", SLURM_STEP_ID="0",
            SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="2", MASTER_PORT=port,
            TEST_OUT=str(tmp_path / "res"), TEST_TIMEOUT_S=str(timeout_s), CUDA_VISIBLE_DEVICES="",
        )
        for r in range(2)
    ]  # fmt: skip
    procs = run_ranks(WORKER, envs, timeout=90)
    for p in procs:
        assert p.returncode == 0, p.stdout[-3000:]
    res = [json.loads((tmp_path / f"res.{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert res[r]["env"] == [r, 2, r, 2, 0, "localhost", int(port), "slurm"]
        assert (res[r]["rank"], res[r]["world"], res[r]["main"]) == (r, 2, r == 0)
        assert res[r]["max"] == 13
        assert res[r]["sum"] == pytest.approx(2.0)
        assert res[r]["shm_left"] is False  # DeepSpeed's 66 MB /dev/shm segment was unlinked
    assert "printed-by-rank 0" in procs[0].stdout and "printed-by-rank" not in procs[1].stdout
    # The collective with a missing peer failed (did not hang) within about timeout_s.
    print("rank 0 with a silent peer:", res[0]["hung_collective"], f"after {res[0]['fail_after_s']:.2f} s")
    assert res[0]["hung_collective"] != "returned"
    assert timeout_s - 0.5 <= res[0]["fail_after_s"] < timeout_s + 4, res[0]


def test_launcher_env_left_clean():
    """Runs after the in-process init tests: nothing they exported leaked into this process."""
    assert {k: os.environ.get(k) for k in LAUNCHER_VARS} == START_ENV

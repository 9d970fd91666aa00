"""The Slurm launchers (slurm/*.sh) submitted with sbatch to a real Slurm on this host.

The cluster (tests/slurm_cluster.py): two emulated nodes n1, n2 with 2 CPUs and 2 fake GPUs
each (no CUDA device: the pipeline picks gloo). The tests skip, with the reason, where Slurm
cannot be installed. Jobs run the project's own scripts with a tiny model; every wait is
bounded, and a test cancels its jobs when it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, TINY_MODEL, run_ranks, write_jsonl
from slurm_cluster import SlurmCluster, Unavailable, start_for_tests

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.integration]

RECIPE = "configs/sample/pretrain.yaml"
ONE_NODE = ["--nodes=1", "--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"]
TWO_NODES = ["--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15"]
STEPS = 12


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    try:
        cluster = start_for_tests(nodes=2, cpus=2, gpus=2)
    except Unavailable as e:
        pytest.skip(f"no local Slurm: {e}")
    yield cluster
    cluster.down()
    shutil.rmtree(cluster.root, ignore_errors=True)


class Jobs:
    """Submit the project's scripts from a working directory (logs/ there); cancel leftovers."""

    def __init__(self, cluster: SlurmCluster, cwd: Path):
        self.cluster, self.cwd, self.ids = cluster, cwd, []
        (cwd / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {"PIPELINE_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def submit(self, script: str, sbatch_opts: list[str], *args: str, env: dict | None = None) -> int:
        """``sbatch OPTS slurm/SCRIPT ARGS`` from the working directory; returns the job id."""
        env = {**self.env, **(env or {})}
        job = self.cluster.sbatch(*sbatch_opts, str(ROOT / "slurm" / script), *args, cwd=self.cwd, env=env)
        self.ids.append(job)
        return job

    def pipeline(self, *args: str) -> dict[str, int]:
        proc = self.cluster.run([str(ROOT / "slurm" / "pipeline.sh"), *args], cwd=self.cwd, env={**self.cluster.env, **self.env})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        jobs = dict(line.split() for line in proc.stdout.splitlines())
        self.ids += [int(j) for j in jobs.values()]
        return {stage: int(j) for stage, j in jobs.items()}

    def log(self, name: str, job: int) -> str:
        path = self.cwd / "logs" / f"{name}-{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, name: str, job: int, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name, job):
                return
            info = self.cluster.job(job)
            if info.get("JobState") in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
                break
            time.sleep(0.3)
        raise AssertionError(f"'{text}' did not appear in the log of job {job}:\n{self.log(name, job)[-4000:]}")

    def done(self, name: str, job: int, timeout: float, state: str = "COMPLETED") -> dict[str, str]:
        info = self.cluster.wait_done(job, timeout)
        assert info["JobState"] == state, \
            f"job {job} ended {info['JobState']} ({info.get('Reason')}):\n{self.log(name, job)[-5000:]}"
        return info

    def cancel_all(self) -> None:
        if self.ids:
            self.cluster.run(["scancel", *map(str, self.ids)])


@pytest.fixture
def jobs(slurm: SlurmCluster, tmp_path: Path):
    j = Jobs(slurm, tmp_path)
    yield j
    j.cancel_all()


def _train(out: Path, data: Path, *extra: str) -> list[str]:
    """The recipe, then overrides for a tiny model (as tests/test_train.py)."""
    return [RECIPE, f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2",
            "train.warmup_steps=2", "train.eval_batches=2", "train.eval_every=0", "monitor.log_every=1", "checkpoint.every=0",
            "train.lr=3e-3", *extra]


def _losses(out: Path) -> dict:
    return json.loads((out / "losses.json").read_text())


@pytest.fixture(scope="module")
def side_by_side(slurm: SlurmCluster, tmp_path_factory, tiny_dataset: Path) -> dict:
    """Two jobs at once, one per node: the reference run (an uninterrupted pretrain: one node,
    two tasks, ZeRO-3 + offload, STEPS steps) and the time-limit job, which mostly waits for
    Slurm's warning signal, so the two take little longer than the reference alone.

    The time-limit job: the header's mechanism itself, --signal=B:USR1@T, on a 2-minute job.
    Slurm sends USR1 once fewer than T seconds are left (it checks periodically: often at once
    here, maybe while the ranks are still importing, who then ignore it until the script
    repeats it). Once requeued it is cancelled (it would start again in ~120 s)."""
    j = Jobs(slurm, tmp_path_factory.mktemp("reference"))
    try:
        opts = [o for o in ONE_NODE if not o.startswith("--time")] + ["--time=2", "--signal=B:USR1@105"]
        limited = j.submit("pretrain.sh", opts, *_train(j.cwd / "time_limit", tiny_dataset, "train.max_steps=1000"),
                           env={"PIPELINE_TEST_STEP_DELAY": "0.5"})
        submitted = time.monotonic()
        job = j.submit("pretrain.sh", ONE_NODE, *_train(j.cwd / "run", tiny_dataset, f"train.max_steps={STEPS}"))
        j.done("pretrain", job, timeout=240)
        try:
            slurm.wait(limited, lambda i: i.get("Restarts") == "1", max(10.0, 150 - (time.monotonic() - submitted)),
                       "the requeue")
            requeue_error = None
        except AssertionError as e:  # reported by test_time_limit_warning_signal_requeues, not by the reference's tests
            requeue_error = str(e)
    finally:
        j.cancel_all()
    return {"reference": (j.cwd / "run", j.log("pretrain", job)),
            "time_limit": (limited, j.log("pretrain", limited), requeue_error)}


@pytest.fixture(scope="module")
def reference(side_by_side: dict) -> tuple[Path, str]:
    """The reference run of :func:`side_by_side`: its run directory and job log."""
    return side_by_side["reference"]


def test_scripts_are_valid_bash():
    for script in sorted((ROOT / "slurm").glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


STAGE_SCRIPTS = ("preprocess", "pretrain", "finetune", "evaluate", "export")


def _bootstrap(script: str) -> str:
    """The lines of a stage script that find the project and source slurm/common.sh."""
    text = (ROOT / "slurm" / f"{script}.sh").read_text()
    start = text.index("# Find the project")
    return text[start:text.index('source "$PIPELINE_ROOT/slurm/common.sh"\n', start)]


def test_every_stage_script_finds_the_project_with_the_same_lines():
    assert {s: _bootstrap(s) for s in STAGE_SCRIPTS} == {s: _bootstrap("pretrain") for s in STAGE_SCRIPTS}


def test_a_spooled_copy_finds_the_project_where_it_was_submitted_from(tmp_path: Path):
    """No cluster: a copy of the script outside the project stands for Slurm's spooled copy. It
    reaches slurm/common.sh (whose first check fails here, outside a job, or at `scontrol show
    hostnames` with the fake scontrol) by each way docs/slurm.md lists, and stops with one
    message otherwise."""
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(ROOT / "slurm" / "export.sh", spool / "slurm_script")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/bash\n[ \"$1 $2\" = 'show job' ] && echo '   Command={ROOT}/slurm/export.sh --output x'\n")
    (fake / "scontrol").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIPELINE_ROOT"))}

    def run(script: Path, **env: str) -> str:
        proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, check=False,
                              timeout=60)
        assert proc.returncode == 2, proc.stderr
        return proc.stderr

    found, lost = "pipeline: error: not inside a Slurm job", "pipeline: cannot find the project: submit from its root"
    assert run(spool / "slurm_script").startswith(lost)
    assert run(spool / "slurm_script", PIPELINE_ROOT=str(tmp_path)).startswith(lost)  # given, so the only place looked at
    assert run(spool / "slurm_script", PIPELINE_ROOT=str(ROOT)).startswith(found)
    assert run(spool / "slurm_script", SLURM_SUBMIT_DIR=str(ROOT)).startswith(found)
    assert run(ROOT / "slurm" / "export.sh").startswith(found)  # outside sbatch: the script's own directory
    in_job = run(spool / "slurm_script", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", PATH=f"{fake}:{base['PATH']}")
    assert in_job.startswith("pipeline: error: `scontrol show hostnames n1` gave no host"), in_job  # via Command=


def test_pretrain_one_node_two_tasks_zero3(reference):
    run, log = reference
    assert "pipeline: pretrain: job" in log and "1 node(s) x 2 task(s), 2 GPU(s) per node" in log  # one task per GPU
    assert "train: 2 rank(s), ZeRO-3" in log and "pipeline: pretrain finished" in log
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step-{STEPS:08d}"
    meta = json.loads((ckpt / f"step-{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3
    assert len(_losses(run)["losses"]) == STEPS


def test_two_nodes_one_task_each_then_resume(jobs: Jobs, reference, tiny_dataset: Path):
    """The reference run (one node, two tasks) resumed by a second submission across two nodes
    with one task each: the same world size, so it continues from its last checkpoint. (A
    fresh start on two nodes: test_a_dead_rank_fails_the_job_at_once_naming_it trains there.)"""
    out = jobs.cwd / "run"
    shutil.copytree(reference[0], out)  # the reference stays as it is: the preemption test compares with it
    job = jobs.submit("pretrain.sh", TWO_NODES, *_train(out, tiny_dataset, f"train.max_steps={STEPS + 2}"))
    info = jobs.done("pretrain", job, timeout=240)
    log = jobs.log("pretrain", job)
    assert info["NodeList"] == "n[1-2]" and "2 node(s) x 1 task(s)" in log and "rendezvous n1:" in log
    assert "train: 2 rank(s)" in log and "pipeline: pretrain finished" in log
    assert "resumed from" in log and f"at step {STEPS}" in log
    assert _losses(out)["start_step"] == STEPS and len(_losses(out)["losses"]) == 2
    assert (out / "checkpoints" / "latest").read_text() == f"step-{STEPS + 2:08d}"


def _start_requeued_now(slurm: SlurmCluster, job: int) -> None:
    """Once ``job`` is requeued (PENDING, Reason=BeginTime), start it now instead of in ~120 s.

    Not in the second of the requeue: the requeue revokes the job's credential, and slurmd refuses
    a credential created in the same whole second as the revocation (Slurm's slurm_cred.c:
    ``ctime <= revoked``, time_t). StartTime=now sent at once made the job fail for good ("Killing
    non-startable batch JobId=N: Job credential revoked", exit 1:0) in 3 of 12 two-node runs here
    (0 of 7 with this wait); the pending state shows within ~50 ms of the requeue, so wait past the
    next second."""
    slurm.wait(job, lambda i: i.get("Restarts") == "1" and i["JobState"] == "PENDING" and i.get("Reason") == "BeginTime", 120,
               "the requeue")
    time.sleep(1.5)
    slurm.scontrol("update", f"JobId={job}", "StartTime=now")


def _assert_requeued_like(ref: Path, out: Path, log: str, info: dict, job: int, steps: int, first_stop: int) -> None:
    """The run ``out`` of ``job`` (its log and final Slurm record ``info``), sent USR1 once step
    ``first_stop`` was logged, ended like the uninterrupted run ``ref`` of ``steps`` steps: the
    batch shell forwarded the signal, the ranks stopped after a checkpoint, the job requeued
    itself once and resumed from that checkpoint; the losses after the stop are the
    reference's (to 1e-6), and the latest checkpoint is the last step."""
    assert info["Restarts"] == "1"
    # --open-mode=append: both runs are in the log
    assert "batch shell got SIGUSR1" in log and "stop requested (SIGUSR1)" in log
    assert f"requeueing job {job}" in log and f"job {job} run 2" in log and "resumed from" in log
    resumed = _losses(out)
    stopped_at = resumed["start_step"]
    assert first_stop <= stopped_at < steps and (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    full = _losses(ref)["losses"]
    assert len(full) == steps and resumed["losses"] == pytest.approx(full[stopped_at:], abs=1e-6)
    assert resumed["losses"][-1] == pytest.approx(full[-1], abs=1e-6)
    assert (out / "checkpoints" / "latest").read_text() == f"step-{steps:08d}"


def test_preemption_checkpoints_requeues_and_ends_like_an_uninterrupted_run(jobs: Jobs, slurm: SlurmCluster, reference,
                                                                           tiny_dataset: Path):
    ref_run, _ = reference
    out = jobs.cwd / "run"
    job = jobs.submit("pretrain.sh", ONE_NODE, *_train(out, tiny_dataset, f"train.max_steps={STEPS}"),
                      env={"PIPELINE_TEST_STEP_DELAY": "0.5"})
    jobs.wait_log("pretrain", job, "\nstep 3 |", timeout=180)
    # What --signal=B:USR1@300 does before the time limit, now: the batch shell traps it and
    # forwards it through srun to every rank.
    sig = slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    assert sig.returncode == 0, sig.stderr
    _start_requeued_now(slurm, job)
    info = jobs.done("pretrain", job, timeout=240)
    _assert_requeued_like(ref_run, out, jobs.log("pretrain", job), info, job, steps=STEPS, first_stop=3)


SP_STEPS = 8


def test_preemption_under_sequence_parallelism_across_two_nodes_ends_like_an_uninterrupted_run(
        jobs: Jobs, slurm: SlurmCluster, tiny_dataset: Path):
    """parallel.sequence_parallel_size=2 on two nodes with one task each: the group (ranks 0 and 1,
    consecutive) spans n1 and n2, so its all-to-alls cross nodes. USR1 to the batch shell ->
    checkpoint -> requeue -> resume; the losses after the stop equal those of an uninterrupted
    SP=2 run of the same recipe, launched directly (the deepspeed launcher, 2 ranks) beside the
    job while it mostly waits (step delay, requeue)."""
    sp = ("parallel.sequence_parallel_size=2", f"train.max_steps={SP_STEPS}")
    ref_out, out = jobs.cwd / "reference", jobs.cwd / "run"
    with ThreadPoolExecutor(1) as pool:
        ref = pool.submit(run_ranks, "train.py", "--config", str(ROOT / RECIPE), *_train(ref_out, tiny_dataset, *sp)[1:],
                          timeout=300)
        job = jobs.submit("pretrain.sh", TWO_NODES, *_train(out, tiny_dataset, *sp), env={"PIPELINE_TEST_STEP_DELAY": "0.5"})
        jobs.wait_log("pretrain", job, "\nstep 2 |", timeout=180)
        sig = slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
        assert sig.returncode == 0, sig.stderr
        _start_requeued_now(slurm, job)
        info = jobs.done("pretrain", job, timeout=240)
        r = ref.result()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = jobs.log("pretrain", job)
    assert info["NodeList"] == "n[1-2]" and "2 node(s) x 1 task(s)" in log
    assert log.count("train: 2 rank(s) (data-parallel 1 x sequence-parallel 2)") == 2  # both runs
    assert "note: sequence-parallel groups of 2 consecutive ranks span nodes (1 rank(s) per node)" in log
    assert "span nodes" not in r.stdout  # the direct launch: both ranks on this node
    _assert_requeued_like(ref_out, out, log, info, job, steps=SP_STEPS, first_stop=2)
    meta = json.loads((out / "checkpoints" / f"step-{SP_STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["sequence_parallel_size"] == 2


def test_time_limit_warning_signal_requeues(side_by_side: dict):
    # the job ran beside the reference run (side_by_side): --time=2 --signal=B:USR1@105
    job, log, requeue_error = side_by_side["time_limit"]
    assert requeue_error is None, requeue_error
    assert "batch shell got SIGUSR1" in log and "stop requested (SIGUSR1)" in log and f"requeueing job {job}" in log, log[-3000:]
    assert "FAILED" not in log


def _rank_pid(job: int, rank: int) -> int | None:
    """The python process of one rank of a job (emulated nodes: all on this host)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if b"python" in argv[0] and any(a.endswith(b"launch/train.py") for a in argv) and \
                f"SLURM_JOB_ID={job}".encode() in env and f"SLURM_PROCID={rank}".encode() in env:
            return int(proc.name)
    return None


def test_finetune_script_runs_a_preference_recipe_from_a_pipeline_checkpoint(jobs: Jobs, reference):
    """``sbatch slurm/finetune.sh RECIPE`` with a DPO recipe (task=dpo), starting from the
    reference pre-training run (a pipeline checkpoint, exported first), two tasks under ZeRO-3."""
    run, _ = reference
    pairs = write_jsonl(jobs.cwd / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}
                                                    for i in range(16)])
    recipe = jobs.cwd / "dpo.yaml"
    recipe.write_text(f"output: {jobs.cwd / 'dpo'}\ntask: dpo\nmodel: {{path: {run}}}\n"
                      f"dpo: {{train: {pairs}, val_fraction: 0, seq_len: 32}}\n"
                      "train: {micro_batch_size: 2, max_steps: 3, warmup_steps: 0, eval_every: 0}\n"
                      "checkpoint: {every: 0}\nmonitor: {log_every: 1}\ndeepspeed: {config: ds_configs/zero3_offload.json}\n")
    job = jobs.submit("finetune.sh", ONE_NODE, str(recipe))
    jobs.done("finetune", job, timeout=300)
    log = jobs.log("finetune", job)
    assert "finetune: 2 rank(s), ZeRO-3" in log and "dpo: 16 train / 0 val pairs" in log, log[-3000:]
    assert "reference log-probs: 16 + 0 pairs in" in log and "reward_margin" in log
    meta = json.loads((jobs.cwd / "dpo" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["task"] == "dpo" and meta["world_size"] == 2


def test_a_dead_rank_fails_the_job_at_once_naming_it(jobs: Jobs, tiny_dataset: Path):
    job = jobs.submit("pretrain.sh", TWO_NODES,
                      *_train(jobs.cwd / "run", tiny_dataset, "train.max_steps=500", "dist.timeout_s=300"),
                      env={"PIPELINE_TEST_STEP_DELAY": "0.3"})
    jobs.wait_log("pretrain", job, "\nstep 2 |", timeout=180)
    pid = _rank_pid(job, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    killed = time.monotonic()
    jobs.done("pretrain", job, timeout=60, state="FAILED")
    assert time.monotonic() - killed < 60  # far below dist.timeout_s: the step was stopped, not timed out
    log = jobs.log("pretrain", job)
    assert "pipeline: rank 1 of 2 (node n2, local rank 0) was killed by signal 9 (KILL)" in log
    assert "pipeline: pretrain FAILED" in log


def _recipes(base: Path, preprocess_source: str = "builtin:sample") -> Path:
    """Tiny recipes for every stage, wired output -> input (absolute paths)."""
    from pipeline.data.sample import generate_qa

    r = base / "recipes"
    r.mkdir()
    qa = write_jsonl(base / "qa.jsonl", list(generate_qa(120)))
    (r / "preprocess.yaml").write_text(f"sources: [{{path: '{preprocess_source}', name: sample}}]\noutput: {base}/data\n"
                                       "sample_docs: 800\ntokenizer: {vocab_size: 512}\nval_fraction: 0.05\n")
    common = ("train: {micro_batch_size: 2, max_steps: 4, warmup_steps: 2, eval_every: 0, eval_batches: 2, lr: 3.0e-3}\n"
              "checkpoint: {every: 0}\nmonitor: {log_every: 1}\n")
    (r / "pretrain.yaml").write_text(f"output: {base}/pretrain\nmodel: {{hidden_size: 64, num_layers: 2, num_heads: 4}}\n"
                                     f"data: {{datasets: [{{path: {base}/data}}], seq_len: 32}}\n" + common)
    (r / "finetune.yaml").write_text(f"output: {base}/finetune\ntask: sft\nmodel: {{path: {base}/pretrain}}\n"
                                     f"sft: {{train: {qa}, seq_len: 32}}\n" + common)
    (r / "evaluate.yaml").write_text(f"output: {base}/eval\nmodel: {base}/finetune\ndata: {base}/data\ntask: perplexity\n"
                                     "seq_len: 32\nmax_batches: 2\n")
    return r


CHAIN_SBATCH = ["--sbatch", "--gpus-per-node=0 --cpus-per-task=1 --time=15", "--sbatch-preprocess", "--ntasks-per-node=2",
                "--sbatch-pretrain", "--ntasks-per-node=2", "--sbatch-finetune", "--ntasks-per-node=2"]


def test_pipeline_chain_runs_every_stage_and_the_export_loads(jobs: Jobs, slurm: SlurmCluster):
    recipes = _recipes(jobs.cwd)
    chain = jobs.pipeline(*CHAIN_SBATCH, str(recipes))
    assert list(chain) == ["preprocess", "pretrain", "finetune", "evaluate", "export"]
    assert slurm.job(chain["export"])["Dependency"] == f"afterok:{chain['evaluate']}(unfulfilled)"
    for stage, job in chain.items():
        jobs.done(stage, job, timeout=300)
    assert "preprocess step 3/3: merge" in jobs.log("preprocess", chain["preprocess"])  # 2 tasks: tokenizer, shards, merge
    assert json.loads((jobs.cwd / "eval" / "report.json").read_text())
    export = jobs.cwd / "finetune" / "export"
    assert (export / "export_meta.json").exists()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tok("Hello there.")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all() and model.config.vocab_size == 512


def test_a_failing_stage_stops_the_chain(jobs: Jobs, slurm: SlurmCluster):
    recipes = _recipes(jobs.cwd, preprocess_source=str(jobs.cwd / "missing.jsonl"))
    chain = jobs.pipeline(*CHAIN_SBATCH, "--stages", "preprocess,pretrain,export", str(recipes))
    jobs.done("preprocess", chain["preprocess"], timeout=120, state="FAILED")
    for stage in ("pretrain", "export"):
        info = slurm.wait_done(chain[stage], 60)
        assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info
        assert not jobs.log(stage, chain[stage])  # never ran
    log = jobs.log("preprocess", chain["preprocess"])
    assert "missing.jsonl" in log and "pipeline: preprocess (tokenizer) FAILED: srun exited with code 2" in log
    assert not (jobs.cwd / "pretrain").exists()


def test_pipeline_script_refuses_bad_arguments(slurm: SlurmCluster, tmp_path: Path):
    run = lambda *a: slurm.run([str(ROOT / "slurm" / "pipeline.sh"), *a], cwd=tmp_path)  # noqa: E731
    assert "give the recipe directory" in run().stderr
    assert "unknown stage 'train'" in run("--stages", "train", str(tmp_path)).stderr
    assert "no stage recipe" in run(str(tmp_path)).stderr
    (tmp_path / "pretrain.yaml").write_text("model: {hidden_size: 64}\n")
    dry = run("--dry-run", "--sbatch", "-p debug", str(tmp_path))
    assert "the pretrain recipe sets no output" in dry.stderr
    dry = run("--dry-run", "--pretrain", "output=/x/run", str(tmp_path))
    lines = dry.stdout.splitlines()
    assert dry.returncode == 0 and len(lines) == 2, dry.stderr
    assert lines[0].endswith(f"slurm/pretrain.sh {tmp_path}/pretrain.yaml output=/x/run")
    assert "--dependency=afterok:<pretrain>" in lines[1]
    assert lines[1].endswith("slurm/export.sh --checkpoint /x/run --output /x/run/export")

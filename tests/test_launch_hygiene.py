"""What a launch leaves in its log and how it ends: the rendezvous port, library noise, the exit.

* A taken rendezvous port is one ``error:`` line from rank 0 (exit 2), naming the ways to
  pick another; the Slurm scripts step to a free port themselves (pipeline.rendezvous).
* A short 2-rank run's log holds the pipeline's lines, the DeepSpeed launcher's own lines,
  and nothing else but the few allowed below (pipeline.quiet silences the known noise).
* Ranks end through pipeline.dist.finish without dying in the interpreter's exit, and
  slurm/rank.sh counts a SIGABRT after the stage's completion marker as the stage's code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, TINY_MODEL
from pipeline import quiet, rendezvous

# ---------------------------------------------------------------------------- ports


def _hold_port_in_span() -> socket.socket:
    """A listening socket on a port inside the Slurm span whose next port is free too."""
    base = rendezvous.SLURM_PORT_BASE + 5000 + os.getpid() % 10000
    for port in range(base, base + 400, 2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            s.close()
            continue
        if rendezvous.port_is_free(port + 1):
            s.listen()
            return s
        s.close()
    raise AssertionError(f"no free pair of ports in {base}-{base + 400}")


def test_first_free_port_steps_past_a_busy_port_and_wraps_in_the_span():
    with _hold_port_in_span() as held:
        busy = held.getsockname()[1]
        assert not rendezvous.port_is_free(busy)
        assert rendezvous.first_free_port(busy) == busy + 1  # the next one, the same every time
        assert rendezvous.first_free_port(busy) == busy + 1
    assert rendezvous.first_free_port(busy) == busy  # free again: the derived port itself
    top = rendezvous.SLURM_PORT_BASE + rendezvous.SLURM_PORT_SPAN - 1
    with socket.socket() as s:
        try:
            s.bind(("", top))
        except OSError:
            pytest.fail(f"port {top} is taken on this machine; the wrap-around check needs it")
        s.listen()
        assert rendezvous.first_free_port(top) in (rendezvous.SLURM_PORT_BASE, rendezvous.SLURM_PORT_BASE + 1)


def test_slurm_port_command_prints_the_derived_port_or_the_next_free_one():
    def ask(job_id: int) -> str:
        code = "import sys; sys.path.insert(0, sys.argv[1]); from pipeline.rendezvous import main; sys.exit(main(sys.argv[2:]))"
        r = subprocess.run([sys.executable, "-c", code, str(ROOT), "slurm-port", str(job_id)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    with _hold_port_in_span() as held:
        busy = held.getsockname()[1]
        job = 3 * rendezvous.SLURM_PORT_SPAN + busy - rendezvous.SLURM_PORT_BASE  # a job id whose derived port is busy
        assert rendezvous.slurm_port(job) == busy
        assert ask(job) == str(busy + 1)
    assert ask(job) == str(busy)


def test_port_in_use_message_names_every_way_to_choose_a_port():
    msg = rendezvous.port_in_use_message("127.0.0.1", 29500, "deepspeed/torchrun")
    assert "29500" in msg and "already in use" in msg
    assert "--master_port" in msg and "--master-port" in msg and "MASTER_PORT=" in msg
    assert "srun" in rendezvous.port_in_use_message("n1", 14711, "slurm")


@pytest.mark.slow
def test_port_held_by_another_job_is_one_message_from_rank_zero(tmp_path: Path, tiny_dataset: Path):
    with socket.socket() as held:  # what another run's rank 0 does with the default port
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(ROOT / "launch" / "train.py"),
               f"output={tmp_path / 'run'}", f"data.datasets.0.path={tiny_dataset}", *TINY_MODEL, "train.max_steps=2"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert f"rendezvous port {port}" in errors[0] and "already in use" in errors[0] and "--master_port" in errors[0]
    assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------- noise

# The pipeline's own lines in a pre-training run's log: the stage's summary, step, eval and
# checkpoint lines and its `error:`/`warning:` lines (pipeline/stages/train.py, monitor.py, cli.py).
PIPELINE_LINE = re.compile(r"^(train: |step \d+ \||eval step \d+ \||checkpoint |resumed from |already trained |warning: |error: )")
# The DeepSpeed launcher's own lines (its runner and launch processes, not the ranks):
# `[date] [LEVEL] [runner.py:N:fn] ...` and `[date] [LEVEL] [launch.py:N:fn] ...`, plus its
# accelerator and hostfile notes, which the ranks no longer print (pipeline.quiet).
LAUNCHER_LINE = re.compile(r"^\[[\d\- :,]+\] \[(INFO|WARNING)\] \[(runner|launch|real_accelerator)\.py:\d+:\w+\] ")
# Genuine library warnings accepted in this log, each with the reason it stays. Keep small.
ALLOWED = {
    # none today: a new library line fails the test; silence it in pipeline.quiet if it is
    # harmless noise, or add it here with the reason it is worth a user's attention.
}


def _foreign_lines(log: str) -> list[str]:
    lines = [line for line in log.splitlines() if line.strip()]
    return [line for line in lines if not PIPELINE_LINE.match(line) and not LAUNCHER_LINE.match(line)
            and not any(re.search(p, line) for p in ALLOWED)]


@pytest.mark.slow
def test_short_two_rank_run_logs_only_its_own_lines(z3_run_log: str):
    # the session's shared run (conftest.z3_run): 2 ranks, ZeRO-3 + CPU offload, 4 steps, two
    # checkpoints, a final evaluation, every step logged; it exited 0
    log = z3_run_log
    assert "step 4 |" in log and "eval step 4 |" in log and "checkpoint " in log  # the pipeline's lines are there
    assert _foreign_lines(log) == [], "lines from neither the pipeline nor the launcher:\n" + "\n".join(_foreign_lines(log))


def test_classifier_flags_the_noise_it_was_written_for():
    noise = [
        "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated.",
        "  return func(*args, **kwargs)",
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    ]
    assert _foreign_lines("\n".join(noise)) == noise
    assert _foreign_lines("step 1 | loss 6.2\n[2026-12-06 04:11:44,164] [INFO] [launch.py:152:main] WORLD INFO DICT: {}") == []


def test_quiet_drops_the_known_deprecations_and_keeps_other_warnings(monkeypatch):
    monkeypatch.setattr(quiet, "_gpu_device_present", lambda: True)  # leave the DeepSpeed logger alone here
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        monkeypatch.setattr(quiet, "_installed", False)  # install again inside the block (it restores the filters)
        quiet.install()
        ns = {"__name__": "torch.distributed.c10d_logger"}
        exec("import warnings\n"
             "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated. Please use x.', FutureWarning)\n"
             "warnings.warn('`torch.distributed.reduce_scatter_tensor` is deprecated. Please use y.', FutureWarning)\n"
             "warnings.warn('`torch.distributed.all_reduce_coalesced` is deprecated.', FutureWarning)\n", ns)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. From elsewhere.", FutureWarning)
    assert sorted(str(w.message)[:45] for w in seen) == [
        "`torch.distributed.all_gather_into_tensor` is",  # same text, another module: kept
        "`torch.distributed.all_reduce_coalesced` is d",  # another deprecation: kept
    ]


def test_quiet_drops_the_accelerator_note_only(monkeypatch):
    monkeypatch.setattr(quiet, "_gpu_device_present", lambda: False)
    monkeypatch.setattr(quiet, "_installed", False)
    logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(logger, "filters", [])
    quiet.install()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning(quiet.DS_ACCELERATOR_CPU)
        logger.warning("Some other DeepSpeed warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Some other DeepSpeed warning"]


def test_stdout_filtered_drops_the_banner_only(capsys):
    with quiet.stdout_filtered():
        print(quiet.SHM_OP_BANNER)
        print("something else DeepSpeed says")
    assert capsys.readouterr().out == "something else DeepSpeed says\n"


# ---------------------------------------------------------------------------- the exit


@pytest.mark.slow
def test_many_short_two_rank_launches_end_without_an_abort(tmp_path: Path):
    # ~0.3-1 s per launch here (forked ranks); --max-seconds bounds it on a busy machine.
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "exit_probe.py"), "--launches", "40", "--end", "finish",
                        "--max-seconds", "150", "--logs", str(tmp_path)],
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["launches"] >= 30, res
    # the case that matters: the groups' threads and rank 0's store still run after shutdown
    assert "pt_gloo_runloop" in res["threads_after_shutdown"][0] and "pt_tcpstore_uv" in res["threads_after_shutdown"][0]
    assert res["aborted"] == 0 and res["failed"] == 0, json.dumps(res["bad"], indent=1)[-4000:]
    assert res["ok"] == 2 * res["launches"]
    assert list(tmp_path.glob("tb000/events.out.tfevents.*")), "rank 0's TensorBoard events were not written"


_STAGE = """
import os, sys
sys.path.insert(0, {root!r})
from pipeline import dist
code = int(sys.argv[1])
if sys.argv[2] == "abort-after-finish":
    # what the abort at exit looks like to rank.sh: the marker is written, then SIGABRT
    marker = os.environ[dist.DONE_MARKER_ENV]
    open(marker, "w").write(f"{{code}}\\n")
    os.abort()
if sys.argv[2] == "abort-before":
    os.abort()
dist.finish(code)
"""


@pytest.mark.parametrize("mode, code, training, want_rc, want_line", [
    ("abort-after-finish", 0, False, 0, "counted as exit code 0"),
    ("abort-after-finish", 75, True, 75, "counted as exit code 75"),
    ("abort-before", 0, False, 134, "was killed by signal 6 (ABRT)"),
    ("finish", 0, False, 0, None),
    ("finish", 3, False, 3, "failed with exit code 3"),
])
def test_rank_wrapper_counts_an_abort_after_the_completion_marker(tmp_path, mode, code, training, want_rc, want_line):
    script = tmp_path / "stage.py"
    script.write_text(_STAGE.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(TMPDIR=str(tmp_path), SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="7", SLURM_STEP_ID="0")
    cmd = ["bash", str(ROOT / "slurm" / "rank.sh"), *(["--training"] if training else []), sys.executable, str(script), str(code), mode]
    # --training with a real failure would scancel the step: no Slurm here, so only success cases use it
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == want_rc, r.stderr
    if want_line:
        assert want_line in r.stderr
    else:
        assert "pipeline:" not in r.stderr
    assert not list(tmp_path.glob("pipeline-rank-done.*")), "rank.sh left its marker behind"


def test_finish_writes_the_marker_and_exits_with_the_code(tmp_path):
    marker = tmp_path / "done"
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pipeline import dist; dist.finish(75)"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PIPELINE_RANK_DONE": str(marker)}, timeout=60)
    assert r.returncode == 75 and marker.read_text() == "75\n"
    marker.unlink()
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pipeline import dist; dist.finish(1)"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PIPELINE_RANK_DONE": str(marker)}, timeout=60)
    assert r.returncode == 1 and not marker.exists()  # a failed stage is not done


# ---------------------------------------------------------------------------- slurm/pipeline.sh


def test_pipeline_dry_run_finds_a_project_recipe_dir_from_anywhere(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 1\n")
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PIPELINE_PYTHON": sys.executable}
    r = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), "--dry-run", "configs/sample"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{ROOT}/configs/sample/pretrain.yaml" in r.stdout
    r = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), "--dry-run", "configs/none"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "configs/none not found" in r.stderr and "Traceback" not in r.stderr

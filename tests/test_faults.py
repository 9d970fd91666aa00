"""Faults, each tested end to end: a rank killed mid-training, a kill during a checkpoint
write, a full disk during a checkpoint and during preprocessing, damaged shards at
training start. What each test guarantees is listed in docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY_MODEL, free_port, rank_env, run_ranks, run_script
from inproc import run_entry

pytestmark = pytest.mark.integration

ENV = {"OMP_NUM_THREADS": "1"}


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "train.micro_batch_size=2", "train.warmup_steps=2",
            "train.eval_batches=0", "monitor.log_every=1", "checkpoint.every=0", "checkpoint.keep_last=0", "train.lr=3e-3", *extra]


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _wait_for(log: Path, text: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"'{text}' did not appear in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def _gone(pids: list[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return not alive


def assert_checkpoint_complete(step_dir: Path, world: int) -> dict:
    """Every file a resume reads is there and loads: meta.json, configs, DeepSpeed's model and
    per-rank optimizer shards, per-rank RNG states, hf/config.json. Returns meta.json."""
    import torch

    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["tag"] == step_dir.name and meta["world_size"] == world
    for name in ("config.yaml", "ds_config.json", "hf/config.json"):
        assert (step_dir / name).stat().st_size > 0, name
    shards = sorted(p.name for p in step_dir.glob("*_optim_states.pt"))
    assert len(shards) == world, shards
    for p in [*step_dir.glob("*_model_states.pt"), *step_dir.glob("*_optim_states.pt"),
              *(step_dir / "rng" / f"rank-{r:05d}.pt" for r in range(world))]:
        assert isinstance(torch.load(p, map_location="cpu", weights_only=False), dict), p
    return meta


def _losses(out: Path) -> dict:
    return json.loads((out / "losses.json").read_text())


# ---------------------------------------------------------------------------- a rank dies


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    procs = psutil.Process(launcher.pid).children(recursive=True)
    return sorted(p.pid for p in procs if any("train.py" in c for c in p.cmdline()) and any("local_rank" in c for c in p.cmdline()))


@pytest.mark.slow
def test_sigkilled_rank_fails_the_job_keeps_the_checkpoint_and_the_rerun_resumes(tmp_path: Path, tiny_dataset: Path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV, "PIPELINE_TEST_STEP_DELAY": "0.3"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           *_args(out, tiny_dataset, "train.max_steps=200", "checkpoint.every=2", "dist.timeout_s=60")]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(log, f"checkpoint {out / 'checkpoints' / _tag(2)}", proc)
        _wait_for(log, "step 3 |", proc)
        ranks = _rank_pids(proc)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.time()
        code = proc.wait(timeout=240)  # no hang: far below a run of 200 steps
        failed_after = time.time() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code != 0, log.read_text()[-3000:]
    assert failed_after < 120, f"the job failed {failed_after:.0f} s after the rank died"  # fast: dist.timeout_s=60 bounds it
    time.sleep(1)
    assert _gone(ranks), "a rank outlived the launcher by more than a second"

    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    saved = int(tag.split("-")[1])
    assert saved >= 2 and saved % 2 == 0
    assert assert_checkpoint_complete(ckpt / tag, world=2)["step"] == saved

    again = run_ranks("train.py", *_args(out, tiny_dataset, f"train.max_steps={saved + 2}"), env=ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {ckpt / tag} at step {saved}" in again.stdout
    losses = _losses(out)
    assert losses["start_step"] == saved and len(losses["losses"]) == 2
    assert (ckpt / "latest").read_text() == _tag(saved + 2)
    assert not list(ckpt.glob("*.tmp"))


@pytest.mark.slow
def test_survivors_exit_with_an_error_on_their_own_without_a_launcher(tmp_path: Path, tiny_dataset: Path):
    """Two ranks started directly (as on two nodes, where no launcher sees both): when rank 1
    is SIGKILLed, rank 0 must fail by itself, not wait forever in a collective."""
    port = str(free_port())
    procs, logs = [], []
    for r in range(2):
        env = rank_env(r, 2, port, **ENV, PIPELINE_TEST_STEP_DELAY="0.3", CUDA_VISIBLE_DEVICES="")
        logs.append(tmp_path / f"rank{r}.log")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"),
                                       *_args(tmp_path / "run", tiny_dataset, "train.max_steps=200", "dist.timeout_s=60")],
                                      env=env, stdout=open(logs[r], "w"), stderr=subprocess.STDOUT))
    try:
        _wait_for(logs[0], "step 2 |", procs[0])
        procs[1].send_signal(signal.SIGKILL)
        t = time.time()
        code = procs[0].wait(timeout=240)  # dist.timeout_s=60 bounds every collective
        waited = time.time() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = logs[0].read_text(errors="replace")
    assert code not in (0, None), text[-3000:]
    assert "step 200 |" not in text
    print(f"rank 0 exited with {code} {waited:.1f} s after rank 1 was killed")


# ---------------------------------------------------------------------------- kill during a save


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_dataset: Path) -> Path:
    """A one-process run (ZeRO-3 + offload, the default) with one checkpoint, at step 2."""
    out = tmp_path_factory.mktemp("faults") / "run"
    r = run_script("train.py", *_args(out, tiny_dataset, "train.max_steps=2"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == _tag(2)
    return out


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_latest_and_resume_ignores_the_partial(tmp_path: Path, base_run: Path,
                                                                                       tiny_dataset: Path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    ckpt = out / "checkpoints"
    before = _tree(ckpt / _tag(2))
    log = tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV, "PIPELINE_TEST_PAUSE_IN_SAVE": "4"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *_args(out, tiny_dataset, "train.max_steps=4")],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(log, f"test: pausing inside the save of {_tag(4)}", proc)
        partial = ckpt / (_tag(4) + ".tmp")
        assert list(partial.glob("*_model_states.pt")), "DeepSpeed's files should be half-way written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (ckpt / "latest").read_text() == _tag(2)
    assert not (ckpt / _tag(4)).exists() and partial.is_dir() and not (partial / "meta.json").exists()
    assert _tree(ckpt / _tag(2)) == before

    again = run_script("train.py", *_args(out, tiny_dataset, "train.max_steps=4"), env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt / _tag(2)} at step 2" in again.stdout
    assert _losses(out)["start_step"] == 2
    assert (ckpt / "latest").read_text() == _tag(4)
    assert assert_checkpoint_complete(ckpt / _tag(4), world=1)["step"] == 4
    assert not partial.exists(), "the next save removes a partial directory"


# ---------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 32 MiB tmpfs mounted for the test (root only); skipped where mount is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to simulate a full disk: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Leave about ``leave`` bytes free on ``disk`` (a filler file takes the rest)."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))  # written, not sparse: tmpfs counts pages written


def test_disk_full_is_recognised_from_errno_or_text_only(tmp_path: Path):
    import errno

    from pipeline.errors import UserError
    from pipeline.io import disk_full_error, failed_path, is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    copy = shutil.Error([("a", str(tmp_path / "b"), "[Errno 28] No space left on device: 'a' -> 'b'")])
    assert is_disk_full(copy) and failed_path(copy) == str(tmp_path / "b")
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        raise RuntimeError("wrapped") from OSError(errno.ENOSPC, "No space left on device")
    except RuntimeError as e:
        assert is_disk_full(e)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise UserError("something else") from None  # context suppressed: not the cause
    except UserError as e:
        assert not is_disk_full(e)
    # A bare RuntimeError (torch.save's short write) counts only where the disk is nearly full.
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"))
    assert is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path) == (shutil.disk_usage(tmp_path).free < 64 << 20)
    msg = str(disk_full_error(tmp_path / "x", "checkpoint step-00000004"))
    assert msg.startswith(f"disk full at {tmp_path / 'x'} while writing checkpoint step-00000004 (") and "free there)" in msg


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_is_a_clear_error_and_keeps_the_previous_one(small_disk: Path, base_run: Path,
                                                                                  tiny_dataset: Path):
    out = small_disk / "run"
    shutil.copytree(base_run, out)
    ckpt = out / "checkpoints"
    before = _tree(ckpt / _tag(2))
    size = sum(len(b) for b in before.values())
    _fill(small_disk, size // 2)  # room for logs, not for another checkpoint
    r = run_script("train.py", *_args(out, tiny_dataset, "train.max_steps=4"), env=ENV)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"error: disk full at {ckpt / _tag(4)}.tmp while writing checkpoint {_tag(4)}" in r.stderr
    assert "free space on that filesystem, or set output= to a directory on another filesystem" in r.stderr
    assert (ckpt / "latest").read_text() == _tag(2)
    assert _tree(ckpt / _tag(2)) == before
    assert not list(ckpt.glob(_tag(4) + "*")), "the partial checkpoint is removed (its space freed)"


@pytest.mark.slow
def test_disk_full_during_preprocess_is_a_clear_error_and_keeps_the_published_output(small_disk: Path, tiny_dataset: Path,
                                                                                     corpus: Path):
    out = small_disk / "data"
    shutil.copytree(tiny_dataset, out)
    before = _tree(out)
    _fill(small_disk, 96 << 10)  # the tokenizer fits, the shards do not
    r = run_script("preprocess.py", f"sources.0.path={corpus}", f"output={out}", "overwrite=true",
                   f"tokenizer.path={tiny_dataset / 'tokenizer'}", "workers=1", env=ENV)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"error: disk full at {out}" in r.stderr and "free space on that filesystem" in r.stderr
    assert _tree(out) == before
    from pipeline.data.shards import verify

    verify(out, thorough=True)
    (small_disk / "filler").unlink()  # space again: the same command finishes (resuming the partial run)
    r = run_script("preprocess.py", f"sources.0.path={corpus}", f"output={out}", "overwrite=true",
                   f"tokenizer.path={tiny_dataset / 'tokenizer'}", "workers=1", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    verify(out, thorough=True)
    assert json.loads((out / "manifest.json").read_text())["stats"]["kept"] == 300


@pytest.mark.slow
def test_disk_full_during_export_is_a_clear_error_and_keeps_the_earlier_export(small_disk: Path, base_run: Path, capsys):
    from pipeline.stages.export import main as export_main

    out = small_disk / "export"
    out.mkdir()
    (out / "config.json").write_text('{"earlier": "export"}\n')
    before = _tree(out)
    _fill(small_disk, 64 << 10)  # less than the weights (safetensors reports ENOSPC as text: "os error 28")
    # launch/export.py's command line (its stage's main), in this process: an export starts no process group
    capsys.readouterr()
    code = export_main(["--checkpoint", str(base_run), "--output", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert "error: disk full while writing the output" in err and "free space on that filesystem" in err
    assert _tree(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["export", "filler"], "the export's temporary directory is removed"


# ---------------------------------------------------------------------------- damaged shards at training start


@pytest.mark.parametrize("damage, verify_mode, message", [
    ("truncate_idx", "fast", "has 24 bytes, expected 32"),
    ("truncate_bin", "fast", "(size listed in manifest.json)"),
    ("flip_bin", "thorough", "has sha256 "),
])
def test_training_refuses_damaged_shards_naming_the_file(tmp_path: Path, tiny_dataset: Path, damage, verify_mode, message,
                                                         monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    shard = sorted((data / "train").glob("*.bin"))[0]
    if damage == "truncate_idx":
        shard = shard.with_suffix(".idx")
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.truncate(size - 8)
        message = f"has {size - 8} bytes, expected {size}"
    elif damage == "truncate_bin":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 2)
    else:
        b = bytearray(shard.read_bytes())
        b[len(b) // 2] ^= 0x01
        shard.write_bytes(bytes(b))
    # launch/train.py in this process: the check runs before the process group (inproc.run_entry's tripwire)
    code, _, err = run_entry("train.py", _args(tmp_path / "run", data, "train.max_steps=1", f"data.verify={verify_mode}"),
                             monkeypatch, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert f"'{shard}' " in err and message in err and "re-run preprocess" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- the hooks (pipeline/faults.py)

_HOOKS_SECTION = "# ---------------------------------------------------------------------------- the hooks (pipeline/faults.py)"




def _py_files(folder: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted((ROOT / folder).rglob("*.py"))}


def test_every_test_hook_lives_in_faults_and_is_documented_called_and_used():
    from pipeline import faults

    readers = {path: text for path, text in _py_files("pipeline").items()
               if "PIPELINE_TEST_" in text and path != "pipeline/faults.py"}
    assert not readers, f"test hooks belong in pipeline/faults.py: {sorted(readers)}"
    source, tests = (ROOT / "pipeline" / "faults.py").read_text(encoding="utf-8"), _py_files("tests")
    tests["tests/test_faults.py"] = tests["tests/test_faults.py"].split(_HOOKS_SECTION)[0]  # not the probes below
    pipeline_code = "\n".join(_py_files("pipeline").values())
    for variable, function in faults.VARIABLES.items():
        assert variable.startswith("PIPELINE_TEST_") and callable(getattr(faults, function))
        assert f"``{variable}=" in faults.__doc__ and f":func:`{function}`" in faults.__doc__, variable
        assert source.count(f'"{variable}"') == 2, f"{variable}: one entry in VARIABLES, one read"
        assert any(f'"{variable}"' in text for text in tests.values()), f"no test sets {variable}"
        assert f"faults.{function}(" in pipeline_code, f"nothing calls {function}"


def test_hooks_read_their_variables_and_do_nothing_when_unset():
    probe = ("from pipeline import faults as f; "
             "print(f._STEP_DELAY, f._BATCH_DELAY, f._PAUSE_IN_SAVE, f._CORRUPT_EXPORT)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_TEST_")}
    set_ = {"PIPELINE_TEST_STEP_DELAY": "0.3", "PIPELINE_TEST_BATCH_DELAY": "0.5", "PIPELINE_TEST_PAUSE_IN_SAVE": "4",
            "PIPELINE_TEST_CORRUPT_EXPORT": "1"}
    out = [subprocess.run([sys.executable, "-c", probe], env={**clean, "PYTHONPATH": str(ROOT), **extra}, capture_output=True,
                          text=True, check=True).stdout.split() for extra in ({}, set_, {"PIPELINE_TEST_CORRUPT_EXPORT": "yes"})]
    assert out == [["0.0", "0.0", "0", "False"], ["0.3", "0.5", "4", "True"], ["0.0", "0.0", "0", "False"]]


def test_hooks_act_only_where_switched_on(monkeypatch, capsys):
    import torch

    from pipeline import faults

    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(3, 2)
    model.get_input_embeddings = lambda: model.emb
    before = model.emb.weight.detach().clone()
    for name in ("_STEP_DELAY", "_BATCH_DELAY", "_PAUSE_IN_SAVE", "_CORRUPT_EXPORT"):
        monkeypatch.setattr(faults, name, type(getattr(faults, name))())  # unset: 0, 0, 0, False
    faults.after_step(), faults.after_batch(), faults.pause_in_save(4, "step-00000004"), faults.corrupt_export(model)
    assert slept == [] and capsys.readouterr().out == "" and torch.equal(model.emb.weight, before)

    monkeypatch.setattr(faults, "_STEP_DELAY", 0.3)
    monkeypatch.setattr(faults, "_BATCH_DELAY", 0.5)
    monkeypatch.setattr(faults, "_PAUSE_IN_SAVE", 4)
    monkeypatch.setattr(faults, "_CORRUPT_EXPORT", True)
    faults.after_step(), faults.after_batch(), faults.pause_in_save(2, "step-00000002")
    assert slept == [0.3, 0.5] and capsys.readouterr().out == ""  # another step's save is not paused
    faults.pause_in_save(4, "step-00000004")
    assert slept == [0.3, 0.5, 3600] and capsys.readouterr().out == "test: pausing inside the save of step-00000004\n"
    faults.corrupt_export(model)
    assert torch.equal(model.emb.weight, before + 1)

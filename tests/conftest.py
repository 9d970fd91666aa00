"""Tiny fixtures shared by every test (defined once here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


# Files in the order the two test processes should take them up (pyproject's addopts: pytest-xdist,
# ``--dist loadfile``: a file runs whole in one process, so its module fixtures -- runs that several
# tests read -- are built once): the heaviest first, so that what runs last beside an idle process
# is short. Seconds of a sequential run on 2 cores (2026-12-06): slurm 180, plan 178, sequence
# parallel 149, harness 148, train 133, ds_configs_roundtrip 105, quickstart 104, faults 80,
# examples 67, dpo 62, export 61, finetune 42; every other file under 35 s. A file not named
# keeps its place after these; a wrong order costs time, never a result.
HEAVY_FIRST = ("test_slurm.py", "test_plan.py", "test_sequence_parallel.py", "test_harness.py", "test_train.py",
               "test_ds_configs_roundtrip.py", "test_quickstart.py", "test_faults.py", "test_examples.py", "test_dpo.py",
               "test_export.py", "test_finetune.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2``), hand out the files heaviest first (:data:`HEAVY_FIRST`)."""
    if getattr(config, "workerinput", None) is None:  # not an xdist worker: collection order as written
        return
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file and test order kept within


def run_script(script: str, *args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``launch/<script>`` in a fresh interpreter; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    """``n`` distinct English-like documents from the built-in sample generator."""
    from pipeline.data.sample import generate

    return [f"{prefix} {i}. {t}" for i, t in enumerate(generate(n, seed=seed + 7))]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory that ``build(dir)`` fills once per test run, shared by the run's processes.

    Under pytest-xdist each worker has its own session, so a session fixture would be built once
    per worker (twice with ``-n 2``: the shared 2-rank run alone is ~40 CPU s). This is
    pytest-xdist's documented pattern instead: the first worker to ask builds the directory under
    the run's common base directory, holding a file lock; the others wait for the lock and read
    the result. A build that failed is not retried by the next worker (it would fail the same way
    and cost its time again): the next one fails with the first one's error. Without xdist
    (``-n 0``) it is a plain ``mktemp``."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    import shutil

    from filelock import FileLock

    out = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # basetemp is <run dir>/popen-gwN
    done, failed = out / ".built", out.with_name(out.name + ".failed")
    with FileLock(str(out) + ".lock"):
        if failed.exists():
            pytest.fail(f"building the shared {name!r} failed in another worker: {failed.read_text()}", pytrace=False)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            try:
                build(out)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}"[-4000:], encoding="utf-8")
                raise
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 512-token SentencePiece BPE tokenizer in Hugging Face format, trained once."""
    from pipeline.data.tokenizer import TokenizerConfig
    from pipeline.data.tokenizer_train import train_sentencepiece

    def build(d: Path) -> None:
        train_sentencepiece(iter(make_docs(400)), TokenizerConfig(vocab_size=512, sample_chars=10**6), d / "tokenizer", threads=1)

    return built_once(tmp_path_factory, "tok", build) / "tokenizer"


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small JSONL corpus of 300 distinct documents."""
    return write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": t} for t in make_docs(300)])


TINY_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "data.seq_len=32"]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A preprocessed dataset (built-in sample, 1500 documents, 512-token tokenizer), made once."""
    from pipeline.config import load_config
    from pipeline.stages.preprocess import PreprocessConfig, run

    def build(d: Path) -> None:
        run(load_config(PreprocessConfig, None, [f"output={d / 'data'}", "sample_docs=1500", "tokenizer.vocab_size=512",
                                                 "val_fraction=0.05", "workers=1"]))

    return built_once(tmp_path_factory, "data", build) / "data"


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, tiny_dataset) -> Path:
    """A tiny Llama saved in Hugging Face format with the dataset's tokenizer beside it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    def build(d: Path) -> None:
        torch.manual_seed(0)
        conf = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
        AutoModelForCausalLM.from_config(conf).save_pretrained(d / "model")
        for f in (tiny_dataset / "tokenizer").iterdir():
            shutil.copy2(f, d / "model" / f.name)

    return built_once(tmp_path_factory, "hf", build) / "model"


from pipeline.rendezvous import free_port  # noqa: E402  (standard library only: no heavy import here)


def run_deepspeed(script: str, *args: str, ranks: int = 2, cwd=None, env: dict | None = None, timeout: float = 600):
    """``deepspeed --num_gpus N launch/<script> ...`` on CPU ranks (the user's command); returns the
    CompletedProcess. For the tests of what the launcher does; the others use :func:`run_ranks`."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(ROOT / "launch" / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What the launchers (deepspeed, torchrun) tell a rank; inherited ones would misplace a rank of a new job."""


def rank_env(rank: int, world: int, port: int | str, **extra: str) -> dict[str, str]:
    """The environment of rank ``rank`` of a ``world``-rank job on this machine as torchrun sets it
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):
    this process's environment less the launcher and Slurm variables it may have inherited, the
    project on PYTHONPATH, then ``extra``."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**base, "PYTHONPATH": str(ROOT), **extra, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_ranks(script: str, *args: str, ranks: int = 2, cwd=None, env: dict | None = None, timeout: float = 600):
    """``launch/<script> ...`` on ``ranks`` CPU ranks started the way torchrun starts them
    (:func:`rank_env`; a launch path the stages support) but without a launcher process: ``deepspeed --num_gpus N`` puts two
    interpreters that each import torch and DeepSpeed (~4.5 CPU s) before the ranks, which the
    suite's many short 2-rank runs do not need. As the launchers do, once a rank exits non-zero the
    others are stopped (SIGTERM, SIGKILL 30 s later). Returns a CompletedProcess: every rank's
    stdout and stderr, and the first failing rank's exit code (0 when all succeed)."""
    import tempfile
    import time

    port, extra = free_port(), {"OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / "launch" / script), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        procs = [subprocess.Popen(cmd, cwd=cwd, env=rank_env(r, ranks, port, **extra), stdout=out, stderr=err)
                 for r in range(ranks)]
        deadline, failed, stop_at = time.monotonic() + timeout, 0, None
        try:
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if now > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if bad and not failed:
                    failed, stop_at = bad[0], now + 30
                    for p in procs:
                        if p.poll() is None:
                            p.terminate()
                if stop_at is not None and now > stop_at:
                    for p in procs:
                        p.kill()
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        failed = failed or next((p.returncode for p in procs if p.returncode), 0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, failed, out.read(), err.read())


# ---------------------------------------------------------------------------- the shared 2-rank run

Z3_STEPS = 4
"""Optimizer steps of the shared run (:func:`z3_run`); its checkpoints are at steps 2 and 4."""


def z3_run_args(out: Path, data: Path, *extra: str) -> list[str]:
    """The recipe of the shared run (:func:`z3_run`), for ``output=out``; a test that continues or
    repeats it (another world size, a resume) passes the same keys plus its ``extra``."""
    # global batch 4 = micro 2 x 2 ranks x accum 1 = micro 2 x 1 rank x accum 2: both layouts read the
    # same global samples per step (pipeline.data.sampler.rank_indices), so their losses are comparable
    return [f"output={out}", f"data.datasets.0.path={data}", *TINY_MODEL, "deepspeed.config=ds_configs/zero3_offload.json",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=2", "train.lr=3e-3",
            "train.eval_every=0", "train.eval_batches=2", "monitor.log_every=1", "checkpoint.every=2", "checkpoint.keep_last=0",
            f"train.max_steps={Z3_STEPS}", *extra]


def tree_hashes(d: Path) -> dict[str, str]:
    """sha256 of every file under ``d``, by relative path."""
    from pipeline.io import sha256_file

    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def z3_run(tmp_path_factory, tiny_dataset: Path) -> Iterator[Path]:
    """One ``deepspeed --num_gpus 2 launch/train.py`` run of the tiny model under the default
    ZeRO-3 + CPU offload config (:func:`z3_run_args`), shared by every test that only reads a run:
    ``<run>/checkpoints/step-00000002`` and ``step-00000004`` (``latest``), ``losses.json`` (4
    steps), ``tensorboard/`` (``eval/loss`` at step 4, over 2 validation batches), ``config.yaml``;
    beside it, ``<run>/../launch.log``: the launch's stdout then stderr (:func:`z3_run_log`).

    Read it, never write into or next to it: a test that does copies it to its ``tmp_path`` first
    (a few MB). The session's end checks that no file of it changed."""
    def build(d: Path) -> None:
        r = run_deepspeed("train.py", *z3_run_args(d / "pretrain", tiny_dataset))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        (d / "launch.log").write_text(r.stdout + r.stderr, encoding="utf-8")

    out = built_once(tmp_path_factory, "z3", build) / "pretrain"
    before = tree_hashes(out)
    yield out
    after = tree_hashes(out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared run {out} (copy it to tmp_path first): {changed}"


@pytest.fixture(scope="session")
def z3_run_log(z3_run: Path) -> str:
    """What the launch of :func:`z3_run` printed: every rank's and the launcher's stdout, then stderr."""
    return (z3_run.parent / "launch.log").read_text(encoding="utf-8")


@pytest.fixture(scope="session", autouse=True)
def _sweep_deepspeed_shm():
    """Remove the 66 MB /dev/shm segments DeepSpeed's CPU comm op leaves behind for ranks that died
    before ``pipeline.dist.init`` could unlink them (killed-rank tests); segments a live process
    still maps are kept (bench/machine.py, ``sweep_deepspeed_shm``)."""
    import time

    from bench.machine import sweep_deepspeed_shm

    start = time.time()
    yield
    sweep_deepspeed_shm(start)


def model_logits(model, seed: int = 1, vocab: int = 512):
    """Float logits of ``model`` on a fixed random batch (3 x 16 tokens of the tiny vocabulary)."""
    import torch

    ids = torch.randint(4, vocab, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def validation_loss(model, data: Path) -> float:
    """The training stage's validation loss (seq 32, 2 batches of 2), recomputed on its fixed
    validation batches of ``data`` with ``model``."""
    import torch

    from pipeline.data.sampler import Validation
    from pipeline.training.trainer import CausalLMTask

    total = count = 0.0
    with torch.no_grad():
        for batch, _ in Validation([(str(data), 1.0)], 32, 2, 2, rank=0, world=1, verify="none"):
            loss, n = CausalLMTask().loss(model, batch)
            total, count = total + float(loss), count + int(n)
    return total / count

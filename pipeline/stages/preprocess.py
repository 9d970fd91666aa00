"""Stage 1, preprocess: corpora -> cleaned, de-duplicated, tokenized, packed token shards.

Flow (one task)::

    sources --read--> records --clean/dedup/split--> batches --encode--> [min_tokens] --> shards + manifest

A reader thread (:mod:`pipeline.data.batches`) reads, cleans, hashes and batches documents;
encoder threads (one per core) encode batches concurrently with the tokenizer's native batch API
(which releases the GIL); the main thread drops the documents below ``clean.min_tokens`` and
writes the rest, in input order, into shards. Work is committed in *segments*: a segment is a
contiguous run of one source's documents whose train part reaches ``shard_tokens``; it yields one
train and one validation shard plus a small progress record (input cursor, statistics, the
de-duplication keys of its documents). A killed run restarts after its last committed
segment and, because every boundary depends only on the input, produces byte-identical
output. Everything is written in ``<output>.partial`` and renamed to ``<output>`` at the end.
Inputs are checked before ``.partial`` is touched, and a run that stops before committing anything
removes the ``.partial`` it made: only a run with something to resume leaves one.
"""

from __future__ import annotations

import gc
import os
import queue
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import faults
from pipeline.config import to_dict, to_yaml
from pipeline.data import sample as builtin_sample
from pipeline.data.batches import Batch, BatchReader
from pipeline.data.clean import CleanConfig, SeenHashes
from pipeline.data.doc_lengths import distribution, keep_long, summary_line
from pipeline.data.shards import (
    ShardWriter,
    compute_totals,
    dtype_for_vocab,
    file_entries,
    known_hashes,
    list_files,
    write_manifest,
)
from pipeline.data.sources import SourceConfig, resolve_files, source_name
from pipeline.data.tokenizer import TokenizerConfig, load_tokenizer
from pipeline.data.tokenizer_train import train_on_sources
from pipeline.errors import UserError
from pipeline.inputs import check_output
from pipeline.io import atomic_write_json, atomic_write_text, publish_dir
from pipeline.progress import progress_bar
from pipeline.stages.preprocess_merge import check_existing, merge, output_config

BUILTIN_PREFIX = "builtin:"
_TOO_FEW_TOKENS = "dropped_too_few_tokens"  # the statistic of clean.min_tokens
# Encode calls run concurrently, one per core, each on one SentencePiece thread (the HF backend's
# calls share its pool of `workers` threads). One call at a time on all cores left cores idle
# at the end of each call, while the thread holding a batch's longest document finished (measured:
# 1.5 cores busy of 2, where the raw tokenizer on the whole corpus kept 1.9 busy).
_CALLS_PER_CORE = 1


@dataclass
class PreprocessConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="builtin:sample", name="sample")])
    """Input corpora, each a file, glob or directory with its format, text field and
    sampling weight. The default, path builtin:sample, is a generated sample corpus."""
    output: str = "outputs/sample/data"
    """Output directory (created; written as <output>.partial and renamed when complete)."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Text cleaning and de-duplication."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=2048, sample_chars=2_000_000))
    """Use an existing Hugging Face tokenizer directory, or train a SentencePiece one."""
    val_fraction: float = 0.01
    """Fraction of documents (by content hash, so stable across runs) in the validation split."""
    shard_tokens: int = 100_000_000
    """Tokens per train shard (approximate: shards end at a batch boundary after this)."""
    batch_chars: int = 1_000_000
    """Characters of text per tokenizer batch (bounds memory; larger batches parallelise better)."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token storage type; auto picks uint16 when the vocabulary has at most 65536 tokens."""
    workers: int = 0
    """Tokenizer threads (0: every CPU core available to this process)."""
    bad_records: Literal["fail", "skip"] = "fail"
    """A malformed input record (bad JSON line, missing text field): fail with its file and
    line, or skip it and count it."""
    overwrite: bool = False
    """Replace an existing complete output with a different config (the old one stays
    intact until the new one is complete)."""
    step: Literal["all", "tokenizer", "shards", "merge"] = "all"
    """all: everything in one process. For several tasks (nodes): tokenizer once, then
    shards in every task, then merge once."""
    task_index: int = -1
    """This task's index for step=shards (-1: SLURM_ARRAY_TASK_ID or SLURM_PROCID, else 0)."""
    task_count: int = 0
    """Number of tasks sharing the work (0: SLURM_ARRAY_TASK_COUNT or SLURM_NTASKS, else 1).
    Documents are assigned to tasks by content hash, so de-duplication stays exact."""
    seed: int = 1234
    """Seed of the built-in sample corpus."""
    sample_docs: int = 20000
    """Documents in the built-in sample corpus."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.sources:
            problems.append(("sources", "no input; give at least one source (e.g. sources.0.path=data/*.jsonl)"))
        names = [source_name(s) for s in self.sources]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((f"sources.{i}.name", f"'{name}' is used by two sources; give each a unique name"))
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(("val_fraction", f"must be in [0, 1), got {self.val_fraction}"))
        if self.shard_tokens <= 0:
            problems.append(("shard_tokens", f"must be > 0, got {self.shard_tokens}"))
        if self.batch_chars <= 0:
            problems.append(("batch_chars", f"must be > 0, got {self.batch_chars}"))
        if self.workers < 0:
            problems.append(("workers", f"must be >= 0 (0: all cores), got {self.workers}"))
        if not self.output:
            problems.append(("output", "must name an output directory"))
        if self.task_count < 0:
            problems.append(("task_count", f"must be >= 0, got {self.task_count}"))
        if self.task_count and self.task_index >= self.task_count:
            problems.append(("task_index", f"{self.task_index} is not below task_count={self.task_count}"))
        return problems


# ---------------------------------------------------------------------------- helpers


def _tasks(cfg: PreprocessConfig) -> tuple[int, int]:
    """``(index, count)`` from the config, else Slurm array or Slurm task variables."""
    env = os.environ
    count = cfg.task_count or int(env.get("SLURM_ARRAY_TASK_COUNT") or env.get("SLURM_NTASKS") or 1)
    if cfg.task_index >= 0:
        index = cfg.task_index
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    else:
        index = int(env.get("SLURM_PROCID", 0))
    if not 0 <= index < count:
        raise UserError(f"task index {index} is not below the task count {count}; set task_index and task_count")
    return index, count


def _threads(cfg: PreprocessConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))


def _encode(handle, texts: list[str], eos: int, dtype, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``texts`` and append EOS: returns ``(flat tokens, per-document lengths)``."""
    ids = handle.encode_batch(texts, threads=threads)
    for x in ids:  # fresh lists owned by us; appending is cheaper than scattering EOS later
        x.append(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _parts(texts: list[str], n: int) -> list[list[str]]:
    """``texts`` cut into at most ``n`` runs of about equal characters, one encode call each.

    Every batch is spread over all cores, so the last one (and any batch the writer waits for)
    is not left to a single core; ids do not depend on how texts are grouped into calls.
    """
    if n <= 1 or len(texts) <= 1:
        return [texts] if texts else []
    cum = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="right")
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < len(texts))), len(texts)]
    return [texts[a:b] for a, b in zip(bounds, bounds[1:])]


def _joined(results: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(results) == 1:
        return results[0]
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


# ---------------------------------------------------------------------------- the stage


class Preprocessor:
    """Runs one preprocess task into a work directory; see the module docstring."""

    def __init__(self, cfg: PreprocessConfig, work: Path, task: tuple[int, int], tokenizer_dir: Path | None):
        self.cfg, self.work, self.task = cfg, work, task
        self.progress_dir = work / ".progress"
        self.tokenizer_dir = tokenizer_dir
        self.shard_tag = f"{task[0]:05d}-" if task[1] > 1 else ""
        self._given: object = None  # the handle of a given tokenizer, loaded by check_inputs
        self._fresh = False  # this run made the work directory (see prepare)

    def check_inputs(self) -> None:
        """Find input errors before the work directory is touched: a failed start must leave an
        earlier partial run (and anything else) as it was."""
        self.sources(check_only=True)
        src_dir = self.cfg.tokenizer.path or (str(self.tokenizer_dir) if self.tokenizer_dir else "")
        if src_dir:
            self._given = load_tokenizer(src_dir)  # loaded once (0.2-0.5 s), copied by tokenizer()

    # -- set-up

    def prepare(self) -> None:
        """Create or resume the work directory (a partial run of another config is discarded)."""
        wanted = to_yaml(output_config(self.cfg))
        marker = self.work / ".progress" / "config.yaml"
        if self.work.exists():
            if marker.exists() and marker.read_text(encoding="utf-8") == wanted:
                print(f"resuming the partial run in {self.work}", file=sys.stderr)
            else:
                print(f"discarding {self.work}: it is a partial run of a different config", file=sys.stderr)
                shutil.rmtree(self.work)
        self._fresh = not self.work.exists()  # made by this run: nothing of an earlier run in it
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("train", "val"):
            (self.work / sub).mkdir(exist_ok=True)
        for stray in self.work.glob("*/.*.tmp*"):
            stray.unlink()  # a shard being written when the last run died
        atomic_write_text(marker, wanted)

    def sources(self, check_only: bool = False) -> list[tuple[SourceConfig, str, list]]:
        """``(source, name, files)`` of each source; ``check_only``: only look, write no sample."""
        out = []
        for i, src in enumerate(self.cfg.sources):
            try:
                if src.path.startswith(BUILTIN_PREFIX):
                    if src.path != "builtin:sample":
                        raise UserError(f"unknown built-in corpus '{src.path}'; the only one is builtin:sample")
                    if check_only:
                        continue
                    path = builtin_sample.write_sample(self.progress_dir / "sample.jsonl", self.cfg.sample_docs, self.cfg.seed)
                    src = SourceConfig(**{**to_dict(src), "path": str(path), "format": "jsonl", "text_field": "text"})
                files = resolve_files(src)
            except UserError as e:
                raise UserError(f"sources.{i} ({self.cfg.sources[i].path}): {e}") from None
            name, path = source_name(self.cfg.sources[i]), self.cfg.sources[i].path
            # every file 0 bytes: said now, not after training a tokenizer on nothing
            if all(f.compression is None and f.format != "hf_disk" and os.path.getsize(f.path) == 0 for f in files):
                raise _no_documents(name, path, "every input file is empty (0 bytes)")
            out.append((src, name, files))
        return out

    def tokenizer(self, sources) -> object:
        """Load the configured tokenizer, or train one on a bounded sample; copy it into the output."""
        cfg = self.cfg
        dest = self.work / "tokenizer"
        handle = None
        if not dest.exists():
            if self._given is not None:
                tmp = self.work / ".tokenizer.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                handle = self._given.copy_to(tmp)  # type: ignore[attr-defined]  # not a model's weights beside it
                os.replace(tmp, dest)
                handle.path = dest  # the copy is what the output records and later stages read
            else:
                train_on_sources(sources, cfg.clean, cfg.bad_records, cfg.tokenizer, dest, _threads(cfg))
        if handle is None:
            handle = load_tokenizer(dest)
        handle.set_threads(_threads(cfg), concurrent_calls=True)  # one thread per encode call
        return handle

    # -- the main loop

    def run(self) -> dict:
        t0 = time.time()
        self.check_inputs()  # before the work directory (or its parent) is made
        try:
            self.prepare()
            return self._run(t0)
        except BaseException:
            if self._fresh and not self._resumable():
                shutil.rmtree(self.work, ignore_errors=True)  # it never started: nothing to resume
            raise

    def _resumable(self) -> bool:
        """The work directory holds work a rerun would resume: a committed segment or a trained tokenizer."""
        trained = not (self.cfg.tokenizer.path or self.tokenizer_dir) and (self.work / "tokenizer").exists()
        return trained or any(self.progress_dir.glob("*.json"))

    def _run(self, t0: float) -> dict:
        cfg = self.cfg
        sources = self.sources()
        handle = self.tokenizer(sources)
        dtype = dtype_for_vocab(handle.vocab_size, cfg.dtype)
        seen = SeenHashes()
        segments = self._load_segments(seen)
        self._verified, self._new_tokens, self._t0 = False, 0, t0
        # Move the objects made so far (modules, tokenizer) out of the collector's reach: the
        # loop allocates many lists, and every full collection would traverse them again.
        gc.freeze()
        bar = progress_bar(desc="preprocess", unit="doc")
        # The encoder thread(s) call the tokenizer's native batch API, which releases the GIL and
        # runs on all the cores; leaving the block waits for any call still running.
        calls = _CALLS_PER_CORE * _threads(self.cfg)
        self._in_flight = 2 * calls + 1  # batches handed to the encoders ahead of the one being written
        with ThreadPoolExecutor(max_workers=calls, thread_name_prefix="encode") as encoder:
            for src, name, files in sources:
                done = segments.get(name, [])
                if not (done and done[-1]["final"]):
                    self._source(src, name, files, done, handle, dtype, seen, encoder, bar)
        bar.close()
        segments = self._load_segments(None)
        result = self._finish(sources, handle, dtype, segments, time.time() - t0, self._new_tokens)
        gc.freeze()  # measured: the collection at interpreter exit otherwise took 0.1-0.4 s
        return result

    def _source(self, src, name, files, done: list[dict], handle, dtype, seen, encoder, bar) -> None:
        """Encode and write one source from its last committed segment on."""
        cfg = self.cfg
        k = len(done)
        start = tuple(done[-1]["cursor"]) if done else (0, 0)
        stats = dict(done[-1]["stats"]) if done else {}
        # clean.min_tokens drops documents here, after encoding: the reader counted them as kept
        dropped, dropped_before = 0, stats.get(_TOO_FEW_TOKENS, 0)  # this run, committed runs
        q: queue.Queue = queue.Queue(maxsize=2)
        reader = BatchReader(cfg, src, files, start, stats, seen, self.task, q)
        reader.start()
        writers = self._writers(name, k, dtype)
        keys: list[np.ndarray] = []
        # Batches are handed to the encoder threads ahead of the one being written, so the
        # cores keep encoding batches k+1... (native code, GIL released) while this thread
        # splits, hashes and writes batch k. Batches are still written in input order, so the
        # output does not depend on the timing.
        pending: deque[tuple[Batch, list[Future]]] = deque()
        calls = _CALLS_PER_CORE * _threads(cfg)
        last_read = False
        try:
            while True:
                while not last_read and len(pending) < self._in_flight:
                    batch = q.get()
                    if batch is None:
                        raise reader.error  # type: ignore[misc]
                    if batch.texts and not self._verified:
                        handle.verify_native(batch.texts)
                        self._verified = True
                    futs = [encoder.submit(_encode, handle, part, handle.eos_id, dtype, 1) for part in _parts(batch.texts, calls)]
                    pending.append((batch, futs))
                    last_read = batch.cursor is None
                batch, futs = pending.popleft()
                if futs:
                    flat, lengths = _joined([f.result() for f in futs])
                    self._new_tokens += len(flat)
                    flat, lengths, val, n = keep_long(flat, lengths, batch.val, cfg.clean.min_tokens)
                    dropped += n
                    tok_val = np.repeat(val, lengths)
                    writers["train"].add_documents(flat[~tok_val], lengths[~val])
                    writers["val"].add_documents(flat[tok_val], lengths[val])
                    keys.append(np.array(batch.keys, dtype=np.uint64))  # every key: dropped ones stay seen
                    bar.update(len(batch.texts))
                    bar.set_postfix_str(f"{self._new_tokens / max(time.time() - self._t0, 1e-9):,.0f} tok/s", refresh=False)
                    faults.after_batch()  # a test's pause between committed segments
                batch.stats["kept"] = batch.stats.get("kept", 0) - dropped
                batch.stats[_TOO_FEW_TOKENS] = dropped_before + dropped
                if batch.cursor is None and not batch.stats.get("records"):
                    raise _no_documents(name, src.path)  # before committing: a rerun reads it again
                if batch.cursor is None or writers["train"].tokens >= cfg.shard_tokens:
                    self._commit(name, k, writers, keys, batch)
                    if batch.cursor is None:
                        return
                    k += 1
                    writers, keys = self._writers(name, k, dtype), []
        except BaseException:
            for _, futs in pending:
                for f in futs:
                    f.cancel()
            for w in writers.values():
                w.abort()
            raise
        finally:
            reader.stop.set()
            reader.join()

    def _writers(self, name: str, k: int, dtype) -> dict[str, ShardWriter]:
        return {
            split: ShardWriter(self.work, f"{split}/{name}-{self.shard_tag}{k:05d}.bin", dtype, split=split, source=name)
            for split in ("train", "val")
        }

    def _commit(self, name, k, writers, keys, batch: Batch) -> None:
        """Close the segment's shards, then record it: the record is the commit point."""
        shards = []
        for w in writers.values():
            if w.documents:
                shards.append(w.close())
            else:
                w.abort()
        hashes = self.progress_dir / f"{name}-{k:05d}.keys.npy"
        tmp = hashes.with_name(hashes.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(keys) if keys else np.empty(0, np.uint64))
        os.replace(tmp, hashes)
        record = {"source": name, "index": k, "final": batch.cursor is None, "cursor": batch.cursor, "stats": batch.stats, "shards": shards}
        atomic_write_json(self.progress_dir / f"{name}-{k:05d}.json", record)

    def _load_segments(self, seen: SeenHashes | None) -> dict[str, list[dict]]:
        import json

        out: dict[str, list[dict]] = {}
        for path in sorted(self.progress_dir.glob("*.json")):
            rec = json.loads(path.read_text(encoding="utf-8"))
            out.setdefault(rec["source"], []).append(rec)
            if seen is not None:
                seen.update(np.load(path.with_name(path.name[: -len(".json")] + ".keys.npy")))
        return out

    def _finish(self, sources, handle, dtype, segments, seconds: float, new_tokens: int) -> dict:
        cfg = self.cfg
        shards, source_entries = [], []
        stats_sum: dict[str, int] = {}
        for (src, name, files), orig in zip(sources, cfg.sources):
            recs = segments.get(name, [])
            stats = recs[-1]["stats"] if recs else {}
            for rec in recs:
                shards.extend(rec["shards"])
            if not stats.get("records"):
                raise _no_documents(name, orig.path)
            source_entries.append({"name": name, "weight": orig.weight, "files": len(files), "stats": stats})
            for key, v in stats.items():
                stats_sum[key] = stats_sum.get(key, 0) + v
        totals = compute_totals(shards)
        if totals["train"]["documents"] == 0:
            by_tokens = (f" and clean.min_tokens={cfg.clean.min_tokens} ({stats_sum.get(_TOO_FEW_TOKENS, 0):,} documents "
                         "had fewer tokens: lower it, or add longer documents)") if cfg.clean.min_tokens > 1 else ""
            raise UserError(f"no train document survived cleaning and de-duplication{by_tokens}; check "
                            "clean.min_chars/max_chars and the inputs")
        atomic_write_text(self.work / "config.yaml", to_yaml(cfg))
        shutil.rmtree(self.progress_dir)
        manifest = {
            "format": "pipeline.token_shards",
            "version": 1,
            "dtype": np.dtype(dtype).name,
            "tokenizer": {
                "dir": "tokenizer",
                "fingerprint": handle.fingerprint,
                "vocab_size": handle.vocab_size,
                "bos_id": handle.bos_id,
                "eos_id": handle.eos_id,
                "pad_id": handle.pad_id,
            },
            "val_fraction": cfg.val_fraction,
            "task": {"index": self.task[0], "count": self.task[1]},
            "sources": source_entries,
            "shards": shards,
            "files": file_entries(self.work, list_files(self.work), known_hashes(shards)),
            "totals": totals,
            "doc_tokens": distribution(self.work, shards),
            "stats": stats_sum,
            "config": to_dict(cfg),
        }
        write_manifest(self.work, manifest)
        return {"manifest": manifest, "seconds": seconds, "new_tokens": new_tokens, "tokenizer_backend": handle.backend}


def _no_documents(name: str, path: str, why: str = "") -> UserError:
    return UserError(f"source '{name}' ({path}) holds no documents{': ' + why if why else ''}; check the path and format")


def _summary(result: dict, output: Path) -> str:
    m = result["manifest"]
    st = m["stats"]
    secs = result["seconds"]
    dropped = {k[len("dropped_"):]: v for k, v in st.items() if k.startswith("dropped_") and v}
    lines = [
        f"preprocess: {output}",
        f"  documents read {st.get('records', 0):,}, kept {st.get('kept', 0):,}"
        + (f", dropped {', '.join(f'{k} {v:,}' for k, v in dropped.items())}" if dropped else ""),
        f"  bad records skipped {st.get('bad_records', 0):,}, invalid UTF-8 repaired {st.get('utf8_replaced', 0):,}, "
        f"control characters removed in {st.get('control_removed', 0):,}",
        f"  train: {m['totals']['train']['documents']:,} documents, {m['totals']['train']['tokens']:,} tokens; "
        f"val: {m['totals']['val']['documents']:,} documents, {m['totals']['val']['tokens']:,} tokens",
        summary_line(m["doc_tokens"]),
        f"  {len(m['shards'])} shards ({m['dtype']}), tokenizer vocab {m['tokenizer']['vocab_size']:,} ({result.get('tokenizer_backend', '?')} encoder)",
        f"  {secs:.1f} s, {result['new_tokens'] / max(secs, 1e-9):,.0f} tokens/s this run",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- steps


def run(cfg: PreprocessConfig) -> dict | None:
    """Run the configured step. Returns the result summary of a shards/all step."""
    output = check_output(cfg.output, inputs=[("tokenizer.path", cfg.tokenizer.path),
                                               *((f"sources.{i}.path", s.path) for i, s in enumerate(cfg.sources))])
    index, count = _tasks(cfg)
    tasks_dir = output.with_name(output.name + ".tasks")
    if cfg.step == "all" and count > 1:
        raise UserError(
            f"{count} tasks found (task_count or Slurm); with several tasks run step=tokenizer once, "
            "then step=shards in every task, then step=merge once (docs/preprocess.md)"
        )
    if cfg.step == "tokenizer":
        return _step_tokenizer(cfg, tasks_dir / "tokenizer")
    if cfg.step == "merge":
        return merge(cfg, tasks_dir, output)
    if count > 1:
        output = tasks_dir / f"task-{index:05d}-of-{count:05d}"
    if check_existing(cfg, output):
        print(f"{output} is already complete for this config; nothing to do", file=sys.stderr)
        return None
    work = output.with_name(output.name + ".partial")
    tok_dir = tasks_dir / "tokenizer" if count > 1 and not cfg.tokenizer.path else None
    if tok_dir is not None and not (tok_dir / "tokenizer_config.json").exists():
        raise UserError(f"no tokenizer at {tok_dir}; run step=tokenizer once before step=shards, or set tokenizer.path")
    result = Preprocessor(cfg, work, (index, count), tok_dir).run()  # prepare() makes the parent
    publish_dir(work, output)
    print(_summary(result, output), file=sys.stderr)
    return result


def _step_tokenizer(cfg: PreprocessConfig, dest: Path) -> None:
    if cfg.tokenizer.path:
        raise UserError("step=tokenizer trains a tokenizer, but tokenizer.path is set; skip this step and use that tokenizer")
    if dest.exists():
        print(f"tokenizer already trained at {dest}", file=sys.stderr)
        return None
    work = dest.with_name(dest.name + ".partial")
    pre = Preprocessor(cfg, work, (0, 1), None)
    pre.check_inputs()  # before anything is made
    shutil.rmtree(work, ignore_errors=True)
    pre.progress_dir.mkdir(parents=True)
    try:
        train_on_sources(pre.sources(), cfg.clean, cfg.bad_records, cfg.tokenizer, work / "tokenizer", _threads(cfg))
        publish_dir(work / "tokenizer", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # made afresh by every run: nothing in it to resume
    print(f"tokenizer trained: {dest}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/preprocess.py``: the command line (``--config``, overrides, ``--print-config``); returns the exit code."""
    from pipeline.cli import run_stage

    return run_stage(PreprocessConfig, lambda cfg, ns: run(cfg) and 0, prog="launch/preprocess.py", argv=argv, description=description)

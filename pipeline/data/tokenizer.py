"""Tokenizer: train a SentencePiece tokenizer or load a Hugging Face one, encode fast, fingerprint.

The preprocess stage either points ``tokenizer.path`` at an existing Hugging Face tokenizer
directory, or trains a new SentencePiece tokenizer on a bounded sample of the cleaned corpus
(:func:`pipeline.data.tokenizer_train.train_sentencepiece`) and saves it in Hugging Face format, so every later stage loads it
with ``transformers.AutoTokenizer.from_pretrained(dir)``.

The source of truth for token ids is always the Hugging Face tokenizer::

    AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)["input_ids"]

:class:`TokenizerHandle` encodes with the fastest native API that gives exactly those ids:

* backend ``"hf"``: the Rust ``tokenizers`` backend's ``encode_batch_fast`` (parallel with rayon, or
  on the calling thread, see :meth:`TokenizerHandle.set_threads`);
* backend ``"sentencepiece"``: ``SentencePieceProcessor.encode(texts, num_threads=n)``, about 2.5x
  faster. Only used when the directory holds a BPE ``tokenizer.model`` AND :meth:`TokenizerHandle.
  verify_native` found identical ids on a sample plus built-in tricky strings. Unigram models stay
  on the HF backend: SentencePiece scores Viterbi paths in float32 and ``tokenizers`` in float64,
  and near-ties (runs of spaces in code, measured) then segment differently. Hugging Face matches
  added tokens in raw text and SentencePiece does not: a text that contains the content of an
  added token (``</s>`` typed into a document...) is cut there and each piece encoded natively
  (or, when a token's matching flags are set, the text is encoded by the HF backend).

What the files determine (fingerprint, special ids, added tokens, the native verdict) is cached,
keyed by their bytes (:func:`_cache_key`), so a run after the first parses no ``tokenizer.json``
when it encodes natively.

Why the saved directory is not a ``LlamaTokenizer``: in transformers 5, ``LlamaTokenizer`` rebuilds
a BPE model with its own pre-tokenizer, which drops SentencePiece's dummy prefix before leading
spaces (``"  x"``) and cannot represent a unigram model at all, so its ids differ from the
SentencePiece model. The generic ``PreTrainedTokenizerFast`` conversion of ``tokenizer.model``
follows the model's own normalizer spec and is exact for both ``bpe`` and ``unigram``; the files it
saves (``tokenizer.json``, ``tokenizer_config.json``) plus ``tokenizer.model`` are what a Llama
tokenizer directory holds, and ``tokenizer_class`` is ``PreTrainedTokenizerFast`` (loads with
transformers 4 and 5).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.data.tokenizer_files import (  # noqa: F401 - re-exported
    _SPECIAL,
    BOS,
    EOS,
    HF_TOKENIZER_FILE,
    PAD,
    SP_MODEL_FILE,
    UNK,
    _added_tokens,
    _cache_key,
    _cache_read,
    _cache_write,
    _fingerprint,
    copy_tokenizer_files,
    tokenizer_file_names,
    tokenizer_fingerprint,
)
from pipeline.errors import UserError

log = logging.getLogger(__name__)

_MIN_TRAIN_VOCAB = 260  # 256 byte-fallback pieces + 4 special tokens
_MAX_VERIFY_TEXTS = 64  # texts of the given sample compared in verify_native ...
_MAX_VERIFY_CHARS = 2000  # ... each cut to this many characters (bounds its cost to ~0.05 s)
_ADDED_TOKEN_REGEX_MIN = 16  # above this many added tokens, scan texts with one regex, not `in`

# Strings on which a Hugging Face conversion of a SentencePiece model tends to go wrong.
TRICKY_TEXTS: tuple[str, ...] = (
    "", " ", "  ", "   ", "\n", "\n\n", "\t", " \n \t ", "hello", " hello", "  hello", "hello ",
    "hello  ", "  hello  world  ", "a  b   c    d", "line one\nline two\n\nline four\n",
    "\ttabbed\tand  spaced\t", "trailing newline\n", "\r\nwindows\r\n", "12345", "3.14159 and 2,718",
    "year 2024-06-01 at 10:30", "007 0 00 000", "emoji 🙂👍🏽 and 👨‍👩‍👧", "🙂", "中文字符和数据模型",
    "日本語のテキスト、東京", "한국어 텍스트", "café naïve über façade", "Ελληνικά κείμενα", "русский текст",
    "עברית", "العربية", "e\u0301 vs é", "zero\u200bwidth", "nb\u00a0space", "▁already▁escaped ▁ x",
    "ÿ\x00\x01 control", "x" * 300, "mixed CASE Words And Ünïcödé", "def f(x):\n    return x + 1\n",
)


@dataclass
class TokenizerConfig:
    path: str = ""
    """Existing Hugging Face tokenizer directory (with tokenizer.json or tokenizer.model); "" trains a
    new SentencePiece tokenizer on a sample of the cleaned corpus."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece model type when training a new tokenizer."""
    vocab_size: int = 32000
    """Vocabulary size in tokens, including the 4 special tokens and 256 byte-fallback tokens
    (when training)."""
    sample_chars: int = 20_000_000
    """Characters of cleaned corpus used to train the tokenizer (bounded sample, in characters)."""
    character_coverage: float = 0.9995
    """Fraction of the sample's characters (by count) that get their own piece; the rarest
    remaining characters are encoded as UTF-8 bytes (when training)."""
    max_sentence_chars: int = 16384
    """Longer training texts are cut into pieces of this many characters for SentencePiece training."""

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.path and self.vocab_size < _MIN_TRAIN_VOCAB:
            problems.append(("vocab_size", f"is {self.vocab_size}, but a trained tokenizer needs at least "
                             f"{_MIN_TRAIN_VOCAB} tokens (256 byte-fallback tokens + 4 special tokens); "
                             "raise it (32000 is typical)"))
        if self.sample_chars <= 0:
            problems.append(("sample_chars", f"is {self.sample_chars}; it must be > 0 characters (e.g. 20000000)"))
        if not 0.0 < self.character_coverage <= 1.0:
            problems.append(("character_coverage", f"is {self.character_coverage}; it must be in (0, 1], "
                             "e.g. 0.9995 for Latin/mixed text or 1.0 for small alphabets"))
        if self.max_sentence_chars <= 0:
            problems.append(("max_sentence_chars", f"is {self.max_sentence_chars}; it must be > 0 characters "
                             "(e.g. 16384)"))
        return problems


# ----------------------------------------------------------------------------------------------
# Loading and encoding
# ----------------------------------------------------------------------------------------------

_EXPECTED = "a Hugging Face tokenizer directory with tokenizer.json or tokenizer.model"
_TOKENIZER_FILES = (HF_TOKENIZER_FILE, SP_MODEL_FILE, "tokenizer_config.json", "vocab.json", "vocab.txt")
_rayon_used = False  # set once this process ran the HF backend in parallel (rayon pool fixed from then on)

# The direct loader (:func:`_load_direct`) reads tokenizer.json with `tokenizers` alone, which is
# exactly what transformers does for these generic classes (no class-specific rebuilding of the
# pipeline, as LlamaTokenizer or GPT2Tokenizer may do) ...
_GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}
# ... given a tokenizer_config.json made only of these keys (others may make transformers change
# the backend: add_prefix_space, a post-processor for add_bos_token=true, ...). Any other
# directory is loaded by transformers.
_DIRECT_KEYS = {
    "tokenizer_class", "backend", "model_max_length", "legacy", "clean_up_tokenization_spaces", "padding_side",
    "truncation_side", "model_input_names", "add_bos_token", "add_eos_token", "added_tokens_decoder",
    "additional_special_tokens", "extra_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token",
    "sep_token", "cls_token", "mask_token", "split_special_tokens", "spaces_between_special_tokens", "unk_id",
}


def load_tokenizer(path: str | os.PathLike, *, direct: bool = True) -> TokenizerHandle:
    """Load a tokenizer directory, giving exactly what ``AutoTokenizer.from_pretrained`` gives.

    With ``direct`` (the default), a directory that transformers would load verbatim (a generic
    fast tokenizer: ``tokenizer.json`` plus a plain ``tokenizer_config.json``, as this module
    and ``save_pretrained`` of ``PreTrainedTokenizerFast`` write) is read with the ``tokenizers``
    library alone: importing transformers costs about 1.8 s and 230 MB (it imports torch), a
    third of the preprocess stage's start-up on a small corpus. Ids, vocabulary size, special
    ids and fingerprint are the same either way (tested); :attr:`TokenizerHandle.hf` still gives
    the transformers tokenizer, loaded on first use. Other directories (class-specific or slow
    tokenizers) are loaded by transformers.

    The handle starts with the ``"hf"`` backend; call :meth:`TokenizerHandle.verify_native` on a
    sample of the corpus to switch to native SentencePiece when that is exact.

    Raises:
        UserError: missing/unreadable directory, no tokenizer files, a slow-only tokenizer, or a
            tokenizer without an EOS token.
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"tokenizer directory {str(p)!r} does not exist or is not a directory; expected {_EXPECTED}. "
                        "Fix tokenizer.path, or set it to \"\" to train a new tokenizer")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"tokenizer directory {str(p)!r} contains no tokenizer files; expected {_EXPECTED} "
                        "(as written by save_pretrained). Fix tokenizer.path, or set it to \"\" to train a new "
                        "tokenizer")
    handle = _load_direct(p) if direct else None
    if handle is None:
        handle = TokenizerHandle.from_hf(_load_transformers(p), p)
    if handle.eos_id is None:
        raise UserError(f"tokenizer in {str(p)!r} has no EOS token; the pipeline appends EOS after every document. "
                        "Add \"eos_token\": \"<token>\" (a token of its vocabulary, e.g. \"</s>\") to its "
                        "tokenizer_config.json")
    return handle


def _load_transformers(p: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # a broken user directory, reported with the loader's reason
        raise UserError(f"could not load tokenizer directory {str(p)!r} ({type(e).__name__}: {e}); expected "
                        f"{_EXPECTED}. Fix or replace the directory (tokenizer.path)") from None
    if not getattr(hf, "is_fast", False) or not hasattr(hf, "backend_tokenizer"):
        raise UserError(f"tokenizer in {str(p)!r} loads as a slow (Python) tokenizer ({type(hf).__name__}); only fast "
                        "tokenizers are supported. Add a tokenizer.json (e.g. load it with "
                        "AutoTokenizer.from_pretrained(dir, use_fast=True) and save_pretrained it)")
    return hf


def _token_content(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_direct(p: Path) -> TokenizerHandle | None:
    """The handle loaded with ``tokenizers`` alone, or None when transformers must load ``p``.

    Everything the stage needs besides encoding (special ids, vocabulary size, added tokens,
    fingerprint, and the :meth:`TokenizerHandle.verify_native` verdict) is a function of the
    directory's bytes, so it is cached (:func:`_cache_key`); on a hit ``tokenizer.json`` is not
    parsed here (0.05-0.3 s for 32k tokens) but only when the HF backend is first needed.
    """
    tj, tc = p / HF_TOKENIZER_FILE, p / "tokenizer_config.json"
    if not tj.is_file() or not tc.is_file() or (p / "special_tokens_map.json").exists():
        return None  # special_tokens_map.json: older layout, merged by transformers' own rules
    try:
        config = json.loads(tc.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers reports it
    if (not isinstance(config, dict) or config.get("tokenizer_class") not in _GENERIC_CLASSES
            or not set(config) <= _DIRECT_KEYS or config.get("add_bos_token") or config.get("add_eos_token")):
        return None
    key = _cache_key(p)
    entry = _cache_read(key)
    if entry is not None:
        return TokenizerHandle(p, None, entry["special_ids"], entry["vocab_size"], fingerprint=entry["fingerprint"],
                               cache=(key, entry))
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(tj))
    except Exception:  # noqa: BLE001 - transformers loads it again and reports the reason
        return None
    # Every special token must already be in the vocabulary (transformers would add a missing one).
    named = {k[:-len("_token")]: config[k] for k in config
             if k.endswith("_token") and not k.startswith("add_") and config[k] is not None}
    extra = [*(config.get("additional_special_tokens") or []), *(config.get("extra_special_tokens") or [])]
    contents = [_token_content(v) for v in [*named.values(), *extra]]
    if None in contents or any(backend.token_to_id(c) is None for c in contents):
        return None
    for i, tok in (config.get("added_tokens_decoder") or {}).items():
        if backend.id_to_token(int(i)) != _token_content(tok):
            return None
    ids = {name: backend.token_to_id(_token_content(named[name])) if name in named else None for name in _SPECIAL}
    size = backend.get_vocab_size(with_added_tokens=True)
    entry = {"fingerprint": _fingerprint(backend, ids, size), "special_ids": ids, "vocab_size": size,
             "model": type(backend.model).__name__, "added": _added_tokens(backend), "native": None}
    _cache_write(key, entry)
    return TokenizerHandle(p, backend, ids, size, fingerprint=entry["fingerprint"], cache=(key, entry))


class TokenizerHandle:
    """A loaded tokenizer with a fast batch encoder whose ids equal the Hugging Face tokenizer's.

    Attributes:
        hf: the transformers (fast) tokenizer (loaded on first use when the handle was loaded
            without transformers).
        path: its directory.
        vocab_size: ``len(hf)``, counting added tokens (tokens).
        bos_id, eos_id, pad_id: special token ids (``bos_id``/``pad_id`` may be None).
        fingerprint: :func:`tokenizer_fingerprint` of ``hf``.
        loader: ``"tokenizers"`` (read without transformers) or ``"transformers"``.
        backend: ``"sentencepiece"`` or ``"hf"``, the encoder :meth:`encode_batch` uses.
        backend_reason: why that backend was chosen.
    """

    def __init__(self, path: Path, backend: Any, special_ids: dict[str, int | None], vocab_size: int, hf: Any = None,
                 fingerprint: str | None = None, cache: tuple[str, dict] | None = None):
        self.path = Path(path)
        self._hf = hf
        self.loader = "tokenizers" if hf is None else "transformers"
        self.vocab_size: int = vocab_size
        self.bos_id: int | None = special_ids["bos"]
        self.eos_id: int = special_ids["eos"]  # type: ignore[assignment]  # None is refused by load_tokenizer
        self.pad_id: int | None = special_ids["pad"]
        self.backend: Literal["sentencepiece", "hf"] = "hf"
        self.backend_reason = "native SentencePiece not verified yet (call verify_native)"
        self._threads: int | None = None
        self._sp = None
        # (key, entry) of the loader's cache (:func:`_cache_key`): the verify_native verdict is kept there
        self._cache = cache
        self._backend_obj = None
        self._backend_lock = threading.Lock()
        if backend is not None:
            self._set_backend(backend)
        self.fingerprint: str = fingerprint or _fingerprint(self._backend, special_ids, vocab_size)
        added = cache[1]["added"] if cache else _added_tokens(self._backend)
        self._added_ids = {t[1]: t[0] for t in added if t[1]}
        self._added_contents = sorted(self._added_ids, key=len, reverse=True)
        self._added_normalized = any(t[2] for t in added)
        self._added_re = (re.compile("|".join(map(re.escape, self._added_contents)))
                          if len(self._added_contents) > _ADDED_TOKEN_REGEX_MIN else None)
        # Texts holding an added token's content are cut at it and each piece encoded natively, as
        # Hugging Face does, unless a flag changes how HF matches them (then the HF backend encodes
        # those texts). verify_native's probe covers this path (texts with every added token).
        self._split_re = (re.compile("(" + "|".join(map(re.escape, self._added_contents)) + ")")
                          if self._added_contents and not any(any(t[2:]) for t in added) else None)

    def _set_backend(self, backend: Any) -> None:
        # A tokenizer.json may carry truncation/padding; encode_batch must return whole texts
        backend.no_truncation()
        backend.no_padding()
        self._backend_obj = backend

    @property
    def _backend(self) -> Any:
        """The ``tokenizers.Tokenizer``; parsed from ``tokenizer.json`` on first use after a cache hit."""
        if self._backend_obj is None:
            with self._backend_lock:  # encoder threads may ask at once
                if self._backend_obj is None:
                    from tokenizers import Tokenizer

                    self._set_backend(Tokenizer.from_file(str(self.path / HF_TOKENIZER_FILE)))
        return self._backend_obj

    @classmethod
    def from_hf(cls, hf: Any, path: Path) -> TokenizerHandle:
        """A handle on a transformers fast tokenizer (its backend is used for encoding)."""
        special = {name: getattr(hf, f"{name}_token_id", None) for name in _SPECIAL}
        return cls(path, hf.backend_tokenizer, special, len(hf), hf=hf)

    @property
    def hf(self) -> Any:
        """The transformers tokenizer of :attr:`path` (imports transformers on first use)."""
        if self._hf is None:
            self._hf = _load_transformers(self.path)
        return self._hf

    def copy_to(self, dest: str | os.PathLike) -> TokenizerHandle:
        """Copy the tokenizer's files into new directory ``dest``; returns the copy's handle.

        Only the tokenizer's files (:func:`tokenizer_file_names`): given a Hugging Face model
        directory, its weights and ``config.json`` stay behind (a 135M model's directory is 542 MB,
        its tokenizer 3.5 MB). The copy is loaded and must have this tokenizer's fingerprint.
        transformers picks the class of a tokenizer whose ``tokenizer_config.json`` names none from
        the model's ``config.json``: that file is added when the copy differs without it.

        Raises:
            UserError: the copy is another tokenizer even so (files this module does not know of).
        """
        dest = Path(dest)
        # the class's own file names, should a transformers release add one not in the static list
        extra = set(getattr(self._hf, "vocab_files_names", {}).values()) if self._hf is not None else set()
        copy_tokenizer_files(self.path, dest, extra)
        copy = load_tokenizer(dest)
        if copy.fingerprint != self.fingerprint and (self.path / "config.json").is_file():
            shutil.copy2(self.path / "config.json", dest / "config.json")
            copy = load_tokenizer(dest)
        if copy.fingerprint != self.fingerprint:
            raise UserError(f"the tokenizer files of {str(self.path)!r} ({', '.join(tokenizer_file_names(self.path, extra))}) "
                            "load as another tokenizer when copied alone; save the tokenizer into a directory of its "
                            "own (AutoTokenizer.from_pretrained(dir).save_pretrained(new_dir)) and set tokenizer.path "
                            "to it")
        return copy

    def __repr__(self) -> str:
        return (f"TokenizerHandle(path={str(self.path)!r}, vocab_size={self.vocab_size}, backend={self.backend!r}, "
                f"fingerprint={self.fingerprint[:12]})")

    # -- threads ------------------------------------------------------------------------------

    def set_threads(self, n: int, *, concurrent_calls: bool = False) -> None:
        """Use ``n`` threads for encoding.

        SentencePiece takes the count per call. The HF backend runs on rayon's global thread pool,
        which reads ``RAYON_NUM_THREADS`` once, at the first parallel use in the process, and is
        fixed from then on: call this before the first :meth:`encode_batch` (or any other parallel
        ``tokenizers`` call) of the process -- in a worker, after the fork. Later calls still set the
        SentencePiece count but cannot resize the HF pool (a warning is logged).

        Args:
            n: threads (cores) to use.
            concurrent_calls: the caller runs ``n`` :meth:`encode_batch` calls at once, each with
                ``threads=1`` (as the preprocess stage does). The HF backend then encodes each
                call on its calling thread (``TOKENIZERS_PARALLELISM=false``, process-wide; the GIL
                is released) instead of sharing rayon's pool: measured on 15 MB of code with a 32k
                byte-level BPE, 1.53-1.68 M tokens/s against 1.33-1.40 M, since concurrent calls
                in one rayon pool wait for each other (a worker that steals part of another call
                cannot return to its own until that part is done, so calls end together, behind
                the longest document of either).
        """
        n = max(1, int(n))
        self._threads = n
        if concurrent_calls:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            return
        if _rayon_used and os.environ.get("RAYON_NUM_THREADS") != str(n):
            log.warning("tokenizers' thread pool is already running with RAYON_NUM_THREADS=%s; the HF backend keeps "
                        "that size (asked for %d threads)", os.environ.get("RAYON_NUM_THREADS", "<all cores>"), n)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(n)

    def _sp_threads(self) -> int:
        if self._threads:
            return self._threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    # -- encoding -----------------------------------------------------------------------------

    def encode_batch(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Token ids of each text, without special tokens (same as ``hf(text, add_special_tokens=False)``).

        Args:
            threads: SentencePiece threads for this call (default: :meth:`set_threads`). The HF
                backend always runs on its process-wide pool; concurrent calls share it.
        """
        if self.backend == "sentencepiece":
            return self._encode_native(texts, threads)
        return self._encode_hf(texts)

    def _encode_hf(self, texts: list[str]) -> list[list[int]]:
        global _rayon_used
        if len(texts) > 1 and os.environ.get("TOKENIZERS_PARALLELISM") != "false":
            _rayon_used = True
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: same ids, measured
        # 1.3-1.5x faster on 5 MB of text, and lighter Encoding objects
        return [enc.ids for enc in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _has_added_token(self, text: str) -> bool:
        if self._added_re is not None:
            return self._added_re.search(text) is not None
        return any(c in text for c in self._added_contents)

    def _encode_native(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        ids = self._sp.encode(list(texts), num_threads=threads or self._sp_threads())
        if self._added_contents:
            # Hugging Face cuts texts at added-token contents, SentencePiece does not: those texts
            # (rare in a corpus) are cut here too, or go through the HF backend.
            normalizer = self._backend.normalizer if self._added_normalized else None
            special = [i for i, t in enumerate(texts)
                       if self._has_added_token(t) or (normalizer is not None
                                                       and self._has_added_token(normalizer.normalize_str(t)))]
            if special and self._split_re is not None:
                for i in special:
                    ids[i] = self._encode_split(texts[i])
            elif special:
                for i, row in zip(special, self._encode_hf([texts[i] for i in special])):
                    ids[i] = row
        return ids

    def _encode_split(self, text: str) -> list[int]:
        """Ids of ``text`` as HF gives them: cut at added tokens, each other piece encoded natively."""
        parts = self._split_re.split(text)  # type: ignore[union-attr]  # [text, token, text, token, ..., text]
        pieces = iter(self._sp.encode(parts[0::2], num_threads=1))
        out: list[int] = []
        for j, part in enumerate(parts):
            if j % 2:
                out.append(self._added_ids[part])
            else:
                out.extend(next(pieces))  # an empty piece encodes to nothing, as in HF
        return out

    def verify_native(self, sample_texts: Iterable[str]) -> bool:
        """Switch to native SentencePiece encoding if it gives the HF tokenizer's ids.

        Compares both on the first 64 of ``sample_texts`` (each cut to 2000 characters) plus
        :data:`TRICKY_TEXTS` (whitespace runs, newlines, tabs, digits, emoji, CJK, accents,
        special-token strings), after checking that every piece equals the HF token of its id.
        The probe is bounded (about 0.05 s), since it runs before the first batch. Sets ``backend`` and
        ``backend_reason`` accordingly: ``"hf"`` if the directory has no ``tokenizer.model``, if
        its pieces differ from the HF vocabulary, if it is not a BPE model (see module docstring)
        or if any id differs.

        Returns:
            True when the ``"sentencepiece"`` backend is in use afterwards.
        """
        if self._cached_verdict():
            self.backend = "sentencepiece"
            return True
        reason = self._native_problem(sample_texts)
        if reason is None:
            self.backend = "sentencepiece"
            if self._cache is not None:
                import sentencepiece as spm

                key, entry = self._cache
                _cache_write(key, {**entry, "native": {"sentencepiece": spm.__version__, "reason": self.backend_reason}})
        else:
            self.backend = "hf"
            self.backend_reason = reason
            log.info("tokenizer %s: encoding with the HF backend: %s", self.path, reason)
        return reason is None

    def _cached_verdict(self) -> bool:
        """Use a positive verdict cached for these exact files and this sentencepiece version."""
        native = self._cache[1].get("native") if self._cache else None
        model = self.path / SP_MODEL_FILE
        if not isinstance(native, dict) or not model.is_file():
            return False
        import sentencepiece as spm

        if native.get("sentencepiece") != spm.__version__:
            return False
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(model))
        except Exception:  # noqa: BLE001 - verified again below, which reports it
            return False
        self._sp = sp
        self.backend_reason = f"{native.get('reason')} (verdict cached for these files)"
        return True

    def _native_problem(self, sample_texts: Iterable[str]) -> str | None:
        model = self.path / SP_MODEL_FILE
        if not model.is_file():
            return f"no {SP_MODEL_FILE} in the tokenizer directory"
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(model))
        except Exception as e:  # noqa: BLE001 - any failure means: not usable, use HF
            return f"{SP_MODEL_FILE} does not load with sentencepiece ({type(e).__name__}: {e})"
        model_type = self._cache[1]["model"] if self._cache else type(self._backend.model).__name__
        if model_type != "BPE":
            # Measured: SentencePiece's unigram Viterbi adds float32 scores, tokenizers' float64, so
            # near-tied segmentations (e.g. runs of spaces in code) come out differently -- on texts a
            # sample may well miss. Exactness beats speed: only BPE models are encoded natively.
            return (f"{model_type} model: native SentencePiece is only trusted for BPE "
                    "(unigram near-ties are broken differently: float32 vs float64 path scores)")
        n = sp.get_piece_size()
        if n > self.vocab_size:
            return f"{SP_MODEL_FILE} has {n} pieces, more than the HF tokenizer's {self.vocab_size} tokens"
        for i in range(n):
            if sp.id_to_piece(i) != self._backend.id_to_token(i):
                return (f"{SP_MODEL_FILE} piece {i} is {sp.id_to_piece(i)!r} but the HF tokenizer's token {i} is "
                        f"{self._backend.id_to_token(i)!r}")
        texts = [t[:_MAX_VERIFY_CHARS] for _, t in zip(range(_MAX_VERIFY_TEXTS), sample_texts)]
        added = self._added_contents[:50]
        texts += list(TRICKY_TEXTS) + [f"{c} x{c}y" for c in added] + [f"{c}{c}  {c}\n a{c} " for c in added]
        self._sp = sp
        native = self._encode_native(texts)
        reference = self._encode_hf(texts)
        for i, (a, b) in enumerate(zip(native, reference)):
            if a != b:
                return f"native SentencePiece ids differ from the HF tokenizer's on text {texts[i][:80]!r}"
        self.backend_reason = f"native SentencePiece ids equal the HF tokenizer's on {len(texts)} texts"
        return None

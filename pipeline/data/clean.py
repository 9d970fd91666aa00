"""Document cleaning and exact de-duplication.

Cleaning is deliberately conservative (it must never change the meaning of code or
prose): line endings to ``\\n``, Unicode normalisation, removal of control characters
other than tab and newline, trimming, length filters. Each document gets a 128-bit
content hash (BLAKE2b) whose bits serve three independent purposes: the de-duplication
key, the train/validation split and the partition across preprocessing tasks.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

import numpy as np

# C0/C1 controls except \t (09) and \n (0a), plus DEL and the byte-order mark.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")


@dataclass
class CleanConfig:
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form applied to every document (NFKC also folds compatibility
    characters such as full-width letters and ligatures; none keeps the text as read)."""
    strip_control: bool = True
    """Remove control characters other than tab and newline (and a byte-order mark);
    CRLF and lone CR line endings become LF either way."""
    min_chars: int = 1
    """Drop documents shorter than this many characters after cleaning."""
    max_chars: int = 0
    """Drop documents longer than this many characters after cleaning (0: no limit)."""
    min_tokens: int = 0
    """Drop documents shorter than this many tokens of the run's tokenizer, counted after
    encoding with the EOS that ends each document (0: keep all). For long-context training:
    documents of at least data.seq_len + 1 tokens give rows with at most one document
    boundary; see docs/preprocess.md. Not applied to the tokenizer-training sample."""
    dedup: bool = True
    """Drop exact duplicates (same text after cleaning) across all sources; the first
    occurrence in input order is kept."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.min_chars < 0:
            problems.append(("min_chars", f"must be >= 0, got {self.min_chars}"))
        if self.max_chars < 0:
            problems.append(("max_chars", f"must be >= 0 (0 means no limit), got {self.max_chars}"))
        if self.max_chars and self.max_chars < self.min_chars:
            problems.append(("max_chars", f"{self.max_chars} is below min_chars={self.min_chars}; raise it or set 0 for no limit"))
        if self.min_tokens < 0:
            problems.append(("min_tokens", f"must be >= 0 (0 keeps every document), got {self.min_tokens}"))
        return problems


class Cleaner:
    """Applies a :class:`CleanConfig` and counts what it changed or dropped.

    ``stats`` keys: ``control_removed`` (documents that had control characters removed),
    ``dropped_empty``, ``dropped_too_short``, ``dropped_too_long``.
    """

    def __init__(self, cfg: CleanConfig, stats: dict[str, int]):
        self.cfg = cfg
        self.stats = stats
        for k in ("control_removed", "dropped_empty", "dropped_too_short", "dropped_too_long"):
            stats.setdefault(k, 0)
        self._form = None if cfg.normalize == "none" else cfg.normalize

    def __call__(self, text: str) -> str | None:
        """The cleaned text, or ``None`` when the document is dropped."""
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self._form is not None:
            text = unicodedata.normalize(self._form, text)
        if self.cfg.strip_control:
            cleaned = _CONTROL.sub("", text)
            if len(cleaned) != len(text):
                self.stats["control_removed"] += 1
                text = cleaned
        text = text.strip()
        n = len(text)
        if n == 0:
            self.stats["dropped_empty"] += 1
            return None
        if n < self.cfg.min_chars:
            self.stats["dropped_too_short"] += 1
            return None
        if self.cfg.max_chars and n > self.cfg.max_chars:
            self.stats["dropped_too_long"] += 1
            return None
        return text


def content_hash(text: str) -> bytes:
    """128-bit BLAKE2b digest of the UTF-8 text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def dedup_key(digest: bytes) -> int:
    """Bits 0-63 of the digest: the de-duplication key."""
    return int.from_bytes(digest[:8], "little")


def is_validation(digest: bytes, val_fraction: float) -> bool:
    """Bits 64-95 decide the split, so it depends only on the text (stable across runs)."""
    return int.from_bytes(digest[8:12], "little") < val_fraction * 4294967296.0


def task_of(digest: bytes, task_count: int) -> int:
    """Bits 96-127 assign a document to one of ``task_count`` preprocessing tasks."""
    return int.from_bytes(digest[12:16], "little") % task_count


class SeenHashes:
    """A set of 64-bit keys in about 8 bytes each.

    Recent keys live in a Python set (fast inserts); every ``flush_every`` keys they are
    merged into one sorted ``uint64`` array searched with ``np.searchsorted``. A Python
    set alone costs ~70 bytes per key, which for 100M documents would be ~7 GB.
    """

    def __init__(self, flush_every: int = 1 << 20):
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._flush_every = flush_every

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: int) -> bool:
        if key in self._recent:
            return True
        arr = self._sorted
        i = int(np.searchsorted(arr, np.uint64(key)))
        return i < len(arr) and int(arr[i]) == key

    def add(self, key: int) -> bool:
        """Insert ``key``; return False when it was already present."""
        if key in self:
            return False
        self._recent.add(key)
        if len(self._recent) >= self._flush_every:
            self._flush()
        return True

    def update(self, keys: np.ndarray) -> None:
        """Insert many keys at once (used when resuming from saved segments)."""
        self._flush()
        self._sorted = np.union1d(self._sorted, np.asarray(keys, dtype=np.uint64))

    def _flush(self) -> None:
        if self._recent:
            new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, new)
            self._recent.clear()

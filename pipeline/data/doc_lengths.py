"""Document lengths in tokens: the ``clean.min_tokens`` filter and the manifest's length distribution.

Long-context training needs documents longer than its rows: pre-training cuts a token stream
into rows of ``seq_len + 1`` tokens (:meth:`pipeline.data.shards.TokenDataset.sample`), so a
32K-token row of a corpus of short documents is many unrelated documents glued together.
Preprocessing therefore can keep only documents of at least ``clean.min_tokens`` tokens
(:func:`keep_long`, measured after encoding), and the manifest's ``doc_tokens`` section
(:func:`distribution`, read from the written shards) says per split what a run wrote: documents,
tokens, the longest document, p50/p90/p99 of the document lengths, ``at_least`` rows
``[threshold, documents, tokens]`` for every power of two from 256 tokens up to the longest
document, and the ``histogram`` rows ``[lower edge, documents, tokens]``. A document's length is
what it occupies in the shards: its text's tokens plus the EOS.

Buckets: one per length below 16 tokens, then 8 per power of two (``[2^k + j * 2^(k-3),
2^k + (j+1) * 2^(k-3))``), so a bucket spans at most 1/8 of its lower edge and every power of
two is an edge: the ``at_least`` rows are exact; the percentiles are interpolated inside their
bucket (within 12.5 %). A histogram is a few hundred integers whatever the corpus size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_SUB_BITS = 3  # 2**3 = 8 buckets per power of two
_EXACT_BELOW = 1 << (_SUB_BITS + 1)  # 16: lengths below this are their own bucket
_AT_LEAST_FROM = 256  # smallest threshold of the ``at_least`` table (tokens)
_PERCENTILES = (50, 90, 99)
_IDX_CHUNK = 1 << 20  # .idx entries (8 MiB) read at a time


def keep_long(flat: np.ndarray, lengths: np.ndarray, val: np.ndarray, min_tokens: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Drop the documents of an encoded batch shorter than ``min_tokens`` tokens.

    Args:
        flat: (tokens,) the batch's documents concatenated, each ending with EOS.
        lengths: (documents,) tokens of each document, EOS included.
        val: (documents,) bool, the document goes to the validation split.
        min_tokens: keep documents of at least this many tokens (0 or 1: keep all).

    Returns:
        ``(flat, lengths, val, dropped)`` of the documents kept, and how many were dropped.
        Nothing is copied when every document is kept.
    """
    keep = lengths >= min_tokens
    if min_tokens <= 1 or keep.all():
        return flat, lengths, val, 0
    return flat[np.repeat(keep, lengths)], lengths[keep], val[keep], int(len(keep) - keep.sum())


def bucket_of(lengths: np.ndarray) -> np.ndarray:
    """Lower edge of each length's bucket (int64, same shape); see the module docstring."""
    n = np.asarray(lengths, dtype=np.int64)
    _, exp = np.frexp(np.maximum(n, 1).astype(np.float64))  # exp = bit length (exact below 2**53)
    shift = np.maximum(exp.astype(np.int64) - 1 - _SUB_BITS, 0)  # bucket width 2**shift
    return np.where(n < _EXACT_BELOW, n, (n >> shift) << shift)


class LengthHistogram:
    """Documents and tokens per length bucket, plus the longest document; mergeable.

    Args:
        data: a :meth:`to_json` result to start from (None: empty).
    """

    def __init__(self, data: dict | None = None):
        self.bins: dict[int, list[int]] = {}  # lower edge -> [documents, tokens]
        self.max = 0
        if data:
            self.bins = {int(lo): [int(d), int(t)] for lo, d, t in data.get("histogram", [])}
            self.max = int(data.get("max", 0))

    def add(self, lengths: np.ndarray) -> None:
        """Count documents of these lengths (tokens each, EOS included)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if not lengths.size:
            return
        edges, inverse = np.unique(bucket_of(lengths), return_inverse=True)
        docs = np.bincount(inverse, minlength=len(edges))
        toks = np.zeros(len(edges), np.int64)
        np.add.at(toks, inverse, lengths)  # exact integers (bincount's weights are float64)
        for lo, d, t in zip(edges.tolist(), docs.tolist(), toks.tolist()):
            b = self.bins.setdefault(lo, [0, 0])
            b[0] += d
            b[1] += t
        self.max = max(self.max, int(lengths.max()))

    def merge(self, other: LengthHistogram) -> LengthHistogram:
        """Add ``other``'s counts into this histogram; returns self."""
        for lo, (d, t) in other.bins.items():
            b = self.bins.setdefault(lo, [0, 0])
            b[0] += d
            b[1] += t
        self.max = max(self.max, other.max)
        return self

    @property
    def documents(self) -> int:
        return sum(d for d, _ in self.bins.values())

    @property
    def tokens(self) -> int:
        return sum(t for _, t in self.bins.values())

    def at_least(self, threshold: int) -> tuple[int, int]:
        """``(documents, tokens)`` in documents of at least ``threshold`` tokens (exact at bucket edges)."""
        rows = [(d, t) for lo, (d, t) in self.bins.items() if lo >= bucket_of(np.array([threshold]))[0]]
        return sum(d for d, _ in rows), sum(t for _, t in rows)

    def percentile(self, q: float) -> int:
        """Document length at percentile ``q`` (0-100), interpolated inside its bucket (0 when empty)."""
        total, seen = self.documents, 0
        rank = q / 100 * total
        for lo in sorted(self.bins):
            count = self.bins[lo][0]
            if seen + count >= rank and count:
                width = 1 if lo < _EXACT_BELOW else 1 << (lo.bit_length() - 1 - _SUB_BITS)
                return min(self.max, lo + int(width * (rank - seen) / count))
            seen += count
        return 0

    def to_json(self) -> dict:
        """The manifest entry: totals, longest, percentiles, ``at_least`` and the histogram rows."""
        out = {"documents": self.documents, "tokens": self.tokens, "max": self.max}
        out.update({f"p{q}": self.percentile(q) for q in _PERCENTILES})
        at_least, t = [], _AT_LEAST_FROM
        while t <= self.max:
            at_least.append([t, *self.at_least(t)])
            t *= 2
        out["at_least"] = at_least
        out["histogram"] = [[lo, *self.bins[lo]] for lo in sorted(self.bins)]
        return out


def distribution(root: str | os.PathLike, shards: list[dict]) -> dict:
    """The manifest's ``doc_tokens``: ``{split: LengthHistogram.to_json()}`` of the documents in ``shards``.

    Read from the shards' ``.idx`` files (document offsets), in chunks of ``_IDX_CHUNK`` entries:
    bounded memory, and the same for a run, a resumed run and a merge of tasks.
    """
    hists: dict[str, LengthHistogram] = {}
    for s in shards:
        h = hists.setdefault(s["split"], LengthHistogram())
        path, count = Path(root) / s["idx"], s["documents"] + 1
        for start in range(0, count - 1, _IDX_CHUNK):  # one entry of overlap with the next chunk
            offsets = np.fromfile(path, "<u8", count=min(_IDX_CHUNK + 1, count - start), offset=8 * start)
            h.add(np.diff(offsets).astype(np.int64))
    return {split: h.to_json() for split, h in sorted(hists.items())}


def summary_line(doc_tokens: dict, split: str = "train") -> str:
    """One console line on a split's document lengths, e.g. for the preprocess summary."""
    d = doc_tokens.get(split) or {}
    if not d.get("documents"):
        return f"  {split} document tokens: none"
    shares = [f">= {t // 1024}K {100 * toks / d['tokens']:.0f}%" for t, _, toks in d["at_least"]
              if t >= 4096 and (t.bit_length() - 1) % 2 == 0]  # 4K, 16K, 64K, ...
    line = f"  {split} document tokens: p50 ~{d['p50']:,}, p90 ~{d['p90']:,}, max {d['max']:,}"
    return line + (f"; share of tokens in documents of {', '.join(shares)}" if shares else "")

"""Cleaning, hashing and the de-duplication set."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.clean import CleanConfig, Cleaner, SeenHashes, content_hash, dedup_key, is_validation, task_of


def test_cleaner_normalises_and_counts():
    stats: dict[str, int] = {}
    c = Cleaner(CleanConfig(min_chars=3, max_chars=10), stats)
    assert c("e\u0301t\u00e9\r\n") == "\u00e9t\u00e9"  # NFC, CRLF -> LF, then trimmed
    assert c("a\x00b\x07c\ufeff\td") == "abc\td"
    assert c(" \x01 ") is None and c("ab") is None and c("x" * 11) is None
    assert stats == {"control_removed": 2, "dropped_empty": 1, "dropped_too_short": 1, "dropped_too_long": 1}
    nfkc = Cleaner(CleanConfig(normalize="NFKC"), {})
    assert nfkc("\uff21\ufb01") == "Afi"
    assert Cleaner(CleanConfig(normalize="none"), {})("e\u0301") == "e\u0301"


def test_config_check():
    assert CleanConfig(min_chars=5, max_chars=3).check()[0][0] == "max_chars"
    assert CleanConfig(min_chars=-1).check()[0][0] == "min_chars"


def test_hash_bits_are_stable_and_split_fraction_holds():
    d = content_hash("hello")
    assert d == content_hash("hello") and len(d) == 16 and dedup_key(d) == int.from_bytes(d[:8], "little")
    digests = [content_hash(f"doc {i}") for i in range(20000)]
    frac = np.mean([is_validation(x, 0.1) for x in digests])
    assert 0.09 < frac < 0.11
    counts = np.bincount([task_of(x, 4) for x in digests], minlength=4)
    assert counts.min() > 4500


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=300), st.integers(min_value=1, max_value=50))
def test_seen_hashes_behaves_like_a_set(keys, flush_every):
    seen, ref = SeenHashes(flush_every=flush_every), set()
    for k in keys:
        assert seen.add(k) == (k not in ref)
        ref.add(k)
        assert k in seen
    assert len(seen) == len(ref)
    restored = SeenHashes()
    restored.update(np.array(sorted(ref), dtype=np.uint64))
    assert all(k in restored for k in ref) and len(restored) == len(ref)

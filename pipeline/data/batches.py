"""The preprocess stage's reader: one source's records -> cleaned, de-duplicated, split batches.

Runs in a thread beside the encoders (see :mod:`pipeline.stages.preprocess`): it reads records
from a cursor, cleans them (:class:`pipeline.data.clean.Cleaner`), drops exact duplicates and
the documents of other tasks, decides each document's split from its content hash, and puts a
:class:`Batch` of about ``batch_chars`` characters on a bounded queue, with the cursor and the
cumulative statistics after it (what a committed segment records, to resume from).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from pipeline.data.clean import Cleaner, content_hash, dedup_key, is_validation, task_of
from pipeline.data.sources import iter_records


@dataclass
class Batch:
    """Documents of one source, ready to encode, with the reader's state after them."""

    texts: list[str]
    keys: list[int]  # de-duplication keys, uint64 values
    val: np.ndarray  # (n,) bool: document goes to the validation split
    cursor: tuple[int, int] | None  # next raw record to read; None when the source is done
    stats: dict[str, int]  # cumulative source statistics at ``cursor``


class BatchReader(threading.Thread):
    """Reads one source from a cursor and puts :class:`Batch` objects on a bounded queue.

    Args:
        cfg: the stage's ``PreprocessConfig`` (read: ``clean``, ``val_fraction``, ``batch_chars``,
            ``bad_records``).
        src, files: the source and its resolved files.
        start: ``(file, record)`` cursor to start at.
        stats: the source's statistics at ``start``, updated in place.
        seen: the de-duplication keys seen so far (:class:`SeenHashes`), updated in place.
        task: ``(index, count)`` of this preprocess task.
        out: the queue; ``None`` is put on it after an error (then in :attr:`error`).
    """

    def __init__(self, cfg, src, files, start, stats, seen, task, out: queue.Queue):
        super().__init__(daemon=True)
        self.cfg, self.src, self.files, self.start_at = cfg, src, files, start
        self.stats, self.seen, self.task, self.out = stats, seen, task, out
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.out.put(None)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        cfg, stats = self.cfg, self.stats
        for k in ("kept", "dropped_duplicate", "other_task"):
            stats.setdefault(k, 0)
        clean = Cleaner(cfg.clean, stats)
        dedup, val_fraction = cfg.clean.dedup, cfg.val_fraction
        task_index, task_count = self.task
        texts, keys, vals, chars = [], [], [], 0
        for text, f, r in iter_records(self.files, self.src, start=self.start_at, bad_records=cfg.bad_records, stats=stats):
            if self.stop.is_set():
                return
            text = clean(text)
            if text is not None:
                digest = content_hash(text)
                if task_count > 1 and task_of(digest, task_count) != task_index:
                    stats["other_task"] += 1
                else:
                    key = dedup_key(digest)
                    if dedup and not self.seen.add(key):
                        stats["dropped_duplicate"] += 1
                    else:
                        stats["kept"] += 1
                        texts.append(text)
                        keys.append(key)
                        vals.append(is_validation(digest, val_fraction))
                        chars += len(text)
            if chars >= cfg.batch_chars:
                self._put(Batch(texts, keys, np.array(vals, dtype=bool), (f, r + 1), dict(stats)))
                texts, keys, vals, chars = [], [], [], 0
        self._put(Batch(texts, keys, np.array(vals, dtype=bool), None, dict(stats)))

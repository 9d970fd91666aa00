"""The training data order: blended, deterministic, per-rank and resumable, in O(1) memory.

Pre-training reads fixed-length samples (``seq_len + 1`` tokens, see
:meth:`pipeline.data.shards.TokenDataset.sample`) from one or more preprocessed datasets.
Every ``(dataset, source)`` pair is a *component*; the global sample stream is::

    g  --blend-->  (component c, running index j)  --epoch/shuffle-->  sample perm_{c,e}(j % n_c)

* **Blend** (:class:`BlendedSamples`): component ``c`` has weight
  ``dataset_weight * source_weight / sum(source weights of that manifest)``, renormalised
  over the components that have samples. The weights are quantised to integer counts per
  block of ``B`` positions (smallest ``B <= 65536`` representing every weight within a
  relative 1e-3, every component at least once; ``B = 4`` for 3:1). Inside a block,
  position ``i`` goes to the component whose count lags its target ``count_c * (i + 1) / B``
  the most (Megatron's largest-deficit rule, exact integer arithmetic, ties to the lower
  index). Every block ends with exactly ``count_c`` samples of ``c``, so the whole stream
  is Megatron's rule applied to the quantised weights, periodic with period ``B``; a
  lookup is two ``B``-long tables (component, rank within the block), no per-sample
  index is ever materialised. Inside a block each running count is at most one sample
  above its target. Weights below ``1/65536`` are rounded up to ``1/B``.
* **Epochs and shuffling**: running index ``j`` of a component with ``n`` samples is epoch
  ``e = j // n``, position ``p = j % n``, sample ``perm_{c,e}(p)``. ``perm`` is an
  8-round alternating Feistel network over the next power of two (at least 4) with cycle
  walking, keyed by ``(seed, dataset position, source name, epoch)``: a bijection of
  ``[0, n)``, O(1) memory, vectorised with numpy, different in every epoch. The key does
  not contain the dataset's path, so moving a dataset keeps the order.
* **Ranks** (:func:`rank_indices`): see there. Each rank reads only its own samples.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import math
import operator
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from pipeline.data.shards import TokenDataset, read_manifest
from pipeline.errors import UserError

MAX_BLOCK = 1 << 16  # longest blend pattern (positions); 2 int64 tables of this size at most
WEIGHT_RTOL = 1e-3  # relative error allowed between a quantised and a requested weight
_FEISTEL_ROUNDS = 8


# ---------------------------------------------------------------------------- shuffling
def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """Pseudo-random permutation of ``[0, n)`` keyed by arbitrary values, O(1) memory.

    Args:
        n: domain size (>= 1).
        *key: anything with a stable ``str`` (ints, strings); the permutation depends only
            on ``n`` and the key.
    """

    def __init__(self, n: int, *key: Any):
        if n < 1:
            raise ValueError(f"permutation domain must be >= 1, got {n}")
        self.n = int(n)
        self.bits = max(2, (self.n - 1).bit_length())  # 2**bits < 2n (or 4): < 2 walks on average
        digest = hashlib.blake2b("|".join(map(str, key)).encode(), digest_size=8 * _FEISTEL_ROUNDS).digest()
        self._keys = [np.uint64(int.from_bytes(digest[8 * r:8 * r + 8], "little")) for r in range(_FEISTEL_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        # alternating unbalanced Feistel: (L: a bits, R: b bits) -> (R, L ^ F(R)) -> widths swap
        a, b = self.bits // 2, self.bits - self.bits // 2
        left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
        with np.errstate(over="ignore"):
            for k in self._keys:
                f = _mix64((right * np.uint64(0x9E3779B97F4A7C15)) ^ k) & np.uint64((1 << a) - 1)
                left, right = right, left ^ f
                a, b = b, a
        return (left << np.uint64(b)) | right

    def __call__(self, p: Any) -> np.ndarray:
        """Image of ``p`` (int or integer array in ``[0, n)``) as int64 array of ``p``'s shape."""
        x = np.asarray(p, dtype=np.int64)
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.n):
            raise IndexError(f"permutation input out of range [0, {self.n})")
        if self.n == 1:
            return np.zeros(x.shape, np.int64)
        y = self._encrypt(x.astype(np.uint64).ravel())
        todo = np.flatnonzero(y >= np.uint64(self.n))
        while todo.size:  # cycle walking: re-encrypt until back inside [0, n)
            y[todo] = self._encrypt(y[todo])
            todo = todo[y[todo] >= np.uint64(self.n)]
        return y.astype(np.int64).reshape(x.shape)


# ---------------------------------------------------------------------------- blending
def block_counts(weights: list[float]) -> np.ndarray:
    """Integer samples per block for each weight (sum = block size ``B``), see the module doc."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k = len(w)
    for start in range(max(1, k), MAX_BLOCK + 1, 4096):  # vectorised over candidate B
        sizes = np.arange(start, min(start + 4096, MAX_BLOCK + 1))
        ideal = sizes[:, None] * w[None, :]
        counts = np.floor(ideal).astype(np.int64)
        short = sizes - counts.sum(1)  # largest remainder: +1 to the `short` largest fractions
        order = np.argsort(-(ideal - counts), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(k), order.shape), axis=1)
        counts += rank < short[:, None]
        ok = (counts >= 1).all(1) & (np.abs(counts / sizes[:, None] - w) <= WEIGHT_RTOL * w).all(1)
        if ok.any():
            return counts[int(np.argmax(ok))]
    counts = counts[-1].copy()  # B = MAX_BLOCK: move one sample from the largest to each empty one
    for c in np.flatnonzero(counts == 0):
        counts[int(np.argmax(counts))] -= 1
        counts[c] = 1
    return counts


def block_pattern(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component, rank within the block) of each of the ``B = sum(counts)`` positions.

    Largest deficit: position ``i`` goes to ``argmax_c counts[c] * (i + 1) - B * taken[c]``.
    """
    cnt = [int(c) for c in counts]
    size, k = sum(cnt), len(cnt)
    comp, rank = np.empty(size, np.int64), np.empty(size, np.int64)
    taken = [0] * k
    for i in range(size):
        best, best_def = 0, None
        for c in range(k):
            d = cnt[c] * (i + 1) - size * taken[c]
            if best_def is None or d > best_def:
                best, best_def = c, d
        comp[i], rank[i] = best, taken[best]
        taken[best] += 1
    assert taken == cnt, (taken, cnt)  # every block ends exactly on the quantised weights
    return comp, rank


def _no_sample(d: Path, m: dict, split: str, seq_len: int, found: dict[str, int]) -> str:
    """The refusal of a dataset whose ``split`` holds no sample, with the ways out (train-stage keys)."""
    where = "; ".join(f"{n}: {t:,} tokens" for n, t in found.items()) or "no source with a weight > 0"
    fixes = [f"lower data.seq_len to at most {max(found.values()) - 1:,}"] if max(found.values(), default=0) > 1 else []
    if split == "val":
        frac = float(m.get("val_fraction") or 0.0)
        per_source = {n: sum(s["tokens"] for s in m["shards"] if s["source"] == n) for n in found}
        most = max(per_source.values(), default=0)
        need = (seq_len + 1) / most if most else math.inf
        fixes.append(f"re-run preprocess with a larger val_fraction (now {frac:g}; one sample needs about {need:.2g} of "
                     f"the {most:,} tokens of its largest source, in whole documents) or more data" if need < 1 else
                     "re-run preprocess with more data (no source holds one sample's tokens in all)")
        fixes.append("set train.eval_batches=0 to train without validation")
    else:
        min_tokens = ((m.get("config") or {}).get("clean") or {}).get("min_tokens") or 0
        fixes.append("re-run preprocess with more data" + (f" or a lower clean.min_tokens (now {min_tokens:,})" if min_tokens else ""))
        fixes.append("remove the dataset from data.datasets")
    return (f"split {split!r} of dataset '{d}' holds no sample of seq_len={seq_len} (+1) tokens with a weight > 0 "
            f"({where}); " + "; or ".join(fixes))


class BlendedSamples:
    """Deterministic, endless, blended and shuffled sample stream over preprocessed datasets.

    Args:
        datasets: ``(output directory of preprocess, dataset weight)`` pairs.
        split: ``"train"`` or ``"val"``.
        seq_len: tokens per sample (each sample holds ``seq_len + 1``).
        seed: the order depends only on (datasets, split, seq_len, seed).
        verify: integrity check of the shards at construction (``none``/``fast``/``thorough``).

    Attributes:
        components: ``(name, normalised weight, samples)`` per component, ``name`` is
            ``"<dir>:<source>"``.
        block_counts: samples of each component per blend block of ``block_size`` positions.
        tokenizer: the ``tokenizer`` object of the (first) manifest; ``tokenizer_dir`` its path.
        dropped: ``(name, why)`` of the components left out (no samples, zero weight).

    Raises:
        UserError: empty dataset list, bad weight, tokenizers differ, a dataset has no
            sample in ``split``.
    """

    def __init__(self, datasets: list[tuple[str | Path, float]], split: str, seq_len: int, seed: int,
                 verify: Literal["none", "fast", "thorough"] = "fast"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not datasets:
            raise UserError("no training dataset given; list at least one preprocess output directory with a weight")
        self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
        self.datasets: list[TokenDataset] = []
        self.components: list[tuple[str, float, int]] = []
        self.dropped: list[tuple[str, str]] = []
        keys, raw = [], []  # per component: shuffle key, unnormalised weight
        first_dir, self.tokenizer = None, {}
        for pos, (d, dweight) in enumerate(datasets):
            d, dweight = Path(d), float(dweight)
            if not math.isfinite(dweight) or dweight < 0:
                raise UserError(f"dataset '{d}' has weight {dweight}; dataset weights must be finite and >= 0")
            m = read_manifest(d)
            tok = m.get("tokenizer") or {}
            if first_dir is None:
                first_dir, self.tokenizer = d, tok
            elif tok.get("fingerprint") != self.tokenizer.get("fingerprint"):
                raise UserError(f"datasets '{first_dir}' and '{d}' were tokenized with different tokenizers "
                                f"(fingerprints {self.tokenizer.get('fingerprint')} and {tok.get('fingerprint')}); "
                                f"re-run preprocess of one with tokenizer.path pointing to the other's tokenizer/")
            declared = {s["name"]: s.get("weight", 1.0) for s in m.get("sources", [])}
            present = {s["source"] for s in m["shards"]}
            names = list(declared) + sorted(present - set(declared))
            sweights = {n: float(declared.get(n, 1.0)) for n in names}
            bad = [n for n, w in sweights.items() if not math.isfinite(w) or w < 0]
            if bad:
                raise UserError(f"'{d / 'manifest.json'}': source {bad[0]!r} has weight {sweights[bad[0]]}; "
                                f"source weights must be finite and >= 0; re-run preprocess with a valid weight")
            total_w = sum(sweights.values())
            found, kept = {}, 0  # tokens in the split of each source with a weight > 0
            for name in names:
                cname = f"{d}:{name}"
                in_split = any(s["split"] == split and s["source"] == name for s in m["shards"])
                ds = TokenDataset(d, split, name, verify) if in_split else None
                n = ds.num_samples(seq_len) if ds is not None else 0
                w = dweight * sweights[name] / total_w if total_w > 0 else 0.0
                if w > 0:
                    found[name] = ds.num_tokens if ds else 0
                if n == 0 or w == 0:
                    self.dropped.append((cname, "no sample" if n == 0 else "weight 0"))
                    continue
                self.datasets.append(ds)
                self.components.append((cname, w, n))
                keys.append((self.seed, split, seq_len, pos, name))
                raw.append(w)
                kept += 1
            if dweight > 0 and not kept:
                raise UserError(_no_sample(d, m, split, seq_len, found))
        if not self.components:
            raise UserError("every dataset has weight 0; give at least one dataset a weight > 0")
        self.tokenizer_dir = first_dir / str(self.tokenizer.get("dir", "tokenizer"))
        total = sum(raw)
        self.components = [(n, w / total, s) for n, w, s in self.components]
        self._keys = keys
        self._n = np.array([c[2] for c in self.components], np.int64)
        self.block_counts = block_counts(raw)
        self.block_size = int(self.block_counts.sum())
        self._comp, self._rank = block_pattern(self.block_counts)
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}  # (c, epoch) -> permutation, a cache

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} w={w:.4g} n={s}" for n, w, s in self.components)
        return f"BlendedSamples({self.split!r}, seq_len={self.seq_len}, seed={self.seed}, B={self.block_size}: {parts})"

    def _perm(self, c: int, epoch: int) -> FeistelPermutation:
        perm = self._perms.get((c, epoch))
        if perm is None:
            if len(self._perms) >= 64:  # bounded; clear() rather than LRU: safe with a read-ahead thread
                self._perms.clear()
            perm = self._perms[(c, epoch)] = FeistelPermutation(int(self._n[c]), *self._keys[c], epoch)
        return perm

    def running_index(self, g: int) -> tuple[int, int]:
        """(component, how many samples of it come before global sample ``g``)."""
        g = operator.index(g)
        if g < 0:
            raise IndexError(f"global sample ids are >= 0, got {g}")
        block, off = divmod(g, self.block_size)
        c = int(self._comp[off])
        return c, block * int(self.block_counts[c]) + int(self._rank[off])

    def component_of(self, g: int) -> tuple[int, int]:
        """(component index, sample index within the component, after shuffling) of sample ``g``."""
        c, j = self.running_index(g)
        epoch, p = divmod(j, int(self._n[c]))
        return c, int(self._perm(c, epoch)(p))

    def locate(self, gs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :meth:`component_of`: int64 arrays (components, sample indices) for ids ``gs``."""
        g = np.asarray(gs, dtype=np.int64)
        if g.size and int(g.min()) < 0:
            raise IndexError("global sample ids are >= 0")
        block, off = np.divmod(g, self.block_size)
        comp = self._comp[off]
        j = block * self.block_counts[comp] + self._rank[off]
        epoch, p = np.divmod(j, self._n[comp])
        idx = np.empty_like(p)
        pairs = np.stack([comp.ravel(), epoch.ravel()], 1)
        for c, e in np.unique(pairs, axis=0) if pairs.size else ():
            sel = (comp == c) & (epoch == e)
            idx[sel] = self._perm(int(c), int(e))(p[sel])
        return comp, idx

    def __getitem__(self, g: int) -> np.ndarray:
        """Tokens of global sample ``g`` (any int >= 0): int64 array of ``seq_len + 1``."""
        c, i = self.component_of(g)
        return self.datasets[c].sample(i, self.seq_len)

    def batch(self, gs: Any) -> np.ndarray:
        """Samples ``gs`` stacked: int64 array ``(len(gs), seq_len + 1)``."""
        comp, idx = self.locate(gs)
        out = np.empty((len(comp), self.seq_len + 1), np.int64)
        for row, (c, i) in enumerate(zip(comp.tolist(), idx.tolist())):
            out[row] = self.datasets[c].sample(i, self.seq_len)
        return out

    def epochs(self, consumed_samples: int) -> list[float]:
        """Epochs of each component read by the first ``consumed_samples`` global samples."""
        block, off = divmod(operator.index(consumed_samples), self.block_size)
        taken = block * self.block_counts + np.bincount(self._comp[:off], minlength=len(self.components))
        return [int(t) / int(n) for t, n in zip(taken, self._n)]


# ---------------------------------------------------------------------------- ranks
def _slot_indices(batch_start: int, micro_step: int, rank: int, world: int, micro_batch: int,
                  grad_accum: int) -> list[int]:
    if not (0 <= rank < world and 0 <= micro_step < grad_accum and micro_batch >= 1):
        raise ValueError(f"need 0 <= rank < world, 0 <= micro_step < grad_accum, micro_batch >= 1; got rank={rank} "
                         f"world={world} micro_step={micro_step} grad_accum={grad_accum} micro_batch={micro_batch}")
    start = batch_start + (rank * grad_accum + micro_step) * micro_batch
    return list(range(start, start + micro_batch))


def rank_indices(step: int, micro_step: int, rank: int, world: int, micro_batch: int, grad_accum: int) -> list[int]:
    """Global sample ids that ``rank`` reads for micro-step ``micro_step`` of optimizer step ``step``.

    Step ``t`` consumes the global batch ``[t*G, (t+1)*G)``, ``G = micro_batch * grad_accum *
    world``, cut into ``world * grad_accum`` contiguous slots of ``micro_batch`` ids; slot
    ``rank * grad_accum + micro_step`` is read by that rank at that micro-step. So each rank
    reads one contiguous range ``[t*G + rank*L, t*G + (rank+1)*L)``, ``L = micro_batch *
    grad_accum``, whatever the split into micro-batches (micro 2 x accum 2 == micro 4 x
    accum 1 on a rank), and micro-step ``m`` of a rank with accumulation ``A`` reads exactly
    what rank ``rank * A + m`` reads without accumulation in a world ``A`` times larger
    (1 rank x micro 2 x accum 2 == 2 ranks x micro 2 x accum 1). Every step reads the same
    samples for any layout with the same ``G``.
    """
    return _slot_indices(step * micro_batch * grad_accum * world, micro_step, rank, world, micro_batch, grad_accum)


class RankLoader:
    """Endless iterator of this rank's micro-batches, LongTensor ``(micro_batch, seq_len + 1)``.

    Yields ``grad_accum`` micro-batches per optimizer step (see :func:`rank_indices`),
    starting at ``start_step``. ``state_dict()`` records the completed steps: after a
    ``load_state_dict`` the micro-batches of an unfinished step are read again. The
    position is kept in global samples, so a run may resume with a different
    world/accumulation layout and still read each global sample once.

    Args:
        samples: the blended stream (the same on every rank).
        rank, world: this rank and the number of data-parallel ranks.
        micro_batch: samples per micro-batch on one rank.
        grad_accum: micro-batches per optimizer step.
        start_step: first step; its batch starts at ``consumed_samples`` (default
            ``start_step * G``).
        end_step: stop before this step (None: never stop).
        prefetch: micro-batches read ahead by a background thread (0: read in ``__next__``).

    Timing: ``wait_s`` (seconds ``__next__`` blocked) and ``read_s`` (seconds spent reading)
    accumulate until :meth:`pop_timing` returns and resets them.
    """

    def __init__(self, samples: BlendedSamples, rank: int, world: int, micro_batch: int, grad_accum: int,
                 start_step: int = 0, consumed_samples: int | None = None, end_step: int | None = None,
                 prefetch: int = 2):
        self.samples, self.rank, self.world = samples, int(rank), int(world)
        self.micro_batch, self.grad_accum = int(micro_batch), int(grad_accum)
        self.global_batch = self.micro_batch * self.grad_accum * self.world
        _slot_indices(0, 0, self.rank, self.world, self.micro_batch, self.grad_accum)  # validates the layout
        self.end_step, self.prefetch = end_step, max(0, int(prefetch))
        self.wait_s = self.read_s = 0.0
        self.batches = 0
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: collections.deque = collections.deque()  # futures of the next micro-batches
        self._seek(start_step, start_step * self.global_batch if consumed_samples is None else consumed_samples)

    def _seek(self, step: int, consumed_samples: int) -> None:
        for fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self.step, self.consumed_samples, self.micro_step = int(step), int(consumed_samples), 0
        # read-ahead cursor: (step, batch start, micro step) of the next micro-batch to schedule
        self._ahead = (self.step, self.consumed_samples, 0)

    def indices(self, step_batch_start: int, micro_step: int) -> list[int]:
        """This rank's global ids for a micro-step of the step whose batch starts at ``step_batch_start``."""
        return _slot_indices(step_batch_start, micro_step, self.rank, self.world, self.micro_batch, self.grad_accum)

    def _read(self, ids: list[int]):
        import torch

        t0 = time.perf_counter()
        out = torch.from_numpy(self.samples.batch(ids))
        with self._lock:
            self.read_s += time.perf_counter() - t0
        return out

    def _schedule(self) -> bool:
        """Submit the read of the next micro-batch not yet scheduled; False past ``end_step``."""
        step, start, micro = self._ahead
        if self.end_step is not None and step >= self.end_step:
            return False
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rank-loader")
        self._queue.append(self._pool.submit(self._read, self.indices(start, micro)))
        micro += 1
        self._ahead = (step + 1, start + self.global_batch, 0) if micro == self.grad_accum else (step, start, micro)
        return True

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.end_step is not None and self.step >= self.end_step:
            raise StopIteration
        t0 = time.perf_counter()
        if self.prefetch:
            while len(self._queue) <= self.prefetch and self._schedule():
                pass
            batch = self._queue.popleft().result()
        else:
            batch = self._read(self.indices(self.consumed_samples, self.micro_step))
        self.wait_s += time.perf_counter() - t0
        self.batches += 1
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.step, self.consumed_samples, self.micro_step = (
                self.step + 1, self.consumed_samples + self.global_batch, 0)
        return batch

    def pop_timing(self) -> dict[str, float]:
        """``{"wait_s", "read_s", "batches"}`` since the last call, then reset."""
        with self._lock:
            out = {"wait_s": self.wait_s, "read_s": self.read_s, "batches": self.batches}
            self.wait_s = self.read_s = 0.0
            self.batches = 0
        return out

    def state_dict(self) -> dict[str, int]:
        """``{"consumed_samples", "step"}`` at the start of the current (unfinished) step."""
        return {"consumed_samples": self.consumed_samples, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (possibly of a run with another layout)."""
        self._seek(int(state["step"]), int(state["consumed_samples"]))

    def close(self) -> None:
        """Stop the read-ahead thread."""
        self._seek(self.step, self.consumed_samples)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> RankLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- validation
class Validation:
    """A fixed set of validation micro-batches, split across ranks.

    The set is micro-batches ``b = 0 .. num_batches - 1`` of the blended ``val`` stream
    with seed ``seed`` (not the training seed: every run evaluates the same samples),
    batch ``b`` holding global val samples ``[b * micro_batch, (b + 1) * micro_batch)``;
    rank ``r`` evaluates ``b = r, r + world, ...``. Every rank runs the same number of
    forward passes (collectives such as ZeRO-3 need it): a rank short of one repeats a
    batch and marks it not real, so sum the loss of real batches only. A val split
    smaller than ``num_batches * micro_batch`` samples wraps around (a sample counts more
    than once).

    Args:
        datasets: ``(dir, weight)`` pairs, as for :class:`BlendedSamples`.
        seq_len: tokens per sample (+1).
        num_batches: micro-batches in the set (all ranks together); 0 disables it.
        micro_batch: samples per micro-batch.
        rank, world: this rank and the data-parallel world size.
        seed: fixed seed of the val order.
        split: split read.
        verify: integrity check of the shards.
    """

    def __init__(self, datasets: list[tuple[str | Path, float]], seq_len: int, num_batches: int, micro_batch: int,
                 rank: int = 0, world: int = 1, seed: int = 0, split: str = "val",
                 verify: Literal["none", "fast", "thorough"] = "fast"):
        if not (0 <= rank < world) or micro_batch < 1 or num_batches < 0:
            raise ValueError(f"need 0 <= rank < world, micro_batch >= 1, num_batches >= 0; got rank={rank} "
                             f"world={world} micro_batch={micro_batch} num_batches={num_batches}")
        self.num_batches, self.micro_batch = int(num_batches), int(micro_batch)
        self.samples = BlendedSamples(datasets, split, seq_len, seed, verify) if num_batches else None
        per_rank = -(-self.num_batches // world)
        #: (global batch index, real) per forward pass of this rank
        self.plan = [(b if b < self.num_batches else rank % max(1, self.num_batches), b < self.num_batches)
                     for b in (rank + k * world for k in range(per_rank))]

    def __len__(self) -> int:
        return len(self.plan)

    def batch_indices(self, b: int) -> list[int]:
        """Global val sample ids of micro-batch ``b``."""
        return list(range(b * self.micro_batch, (b + 1) * self.micro_batch))

    def __iter__(self) -> Iterator:
        """Yield ``(LongTensor (micro_batch, seq_len + 1), real: bool)`` for this rank."""
        import torch

        for b, real in self.plan:
            yield torch.from_numpy(self.samples.batch(self.batch_indices(b))), real

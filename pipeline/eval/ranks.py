"""Evaluation batches dealt across ranks, and results brought back to rank 0.

Under ZeRO-3 every forward pass gathers parameters collectively, so every rank must run the
same number of passes: :func:`rank_plan` deals batches round-robin and pads a short rank with
a repeated batch whose result is discarded. :func:`gather` concatenates per-rank results;
:func:`progress` draws one bar, on rank 0. Without a process group all three are the trivial
one-process versions, so tasks are written once for both cases.
"""

from __future__ import annotations

from typing import Any

from pipeline import dist


def rank_plan(num_batches: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """``(batch index, real)`` per forward pass of ``rank``: batches ``rank, rank + world, ...``.

    Every rank gets ``ceil(num_batches / world)`` passes; a rank short of one repeats the
    last batch with ``real=False`` (ZeRO-3 gathers parameters collectively, so every rank
    must run every pass).
    """
    per_rank = -(-num_batches // world)
    return [(b if b < num_batches else num_batches - 1, b < num_batches) for b in (rank + k * world for k in range(per_rank))]


def my_batches(num_batches: int) -> list[tuple[int, bool]]:
    """:func:`rank_plan` of this process."""
    return rank_plan(num_batches, dist.rank(), dist.world_size())


def progress(num_batches: int, desc: str) -> Any:
    """A progress bar over this rank's share of ``num_batches``, drawn on rank 0 only."""
    from pipeline.progress import progress_bar

    total = -(-num_batches // dist.world_size())
    if dist.is_main():
        return progress_bar(total=total, desc=desc, unit="batch")
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=True)


def gather(items: list) -> list:
    """Every rank's ``items`` concatenated (in rank order); ``items`` itself without a process group."""
    if dist.world_size() == 1:
        return items
    import torch.distributed as tdist

    out: list = [None] * dist.world_size()
    tdist.all_gather_object(out, items)
    return [x for part in out for x in part]

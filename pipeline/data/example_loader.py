"""Fine-tuning data order: examples held in memory, batched per rank, deterministic and resumable.

The same layout as pre-training's samples (:func:`pipeline.data.sampler.rank_indices`: every
optimizer step's global batch split over ranks and micro-steps) and the same keyed Feistel
shuffle per epoch (:class:`pipeline.data.sampler.FeistelPermutation`), over a list of
examples instead of token windows: :class:`ExampleLoader` for training, :class:`FixedBatches`
for validation.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.sampler import FeistelPermutation, rank_indices
from pipeline.errors import UserError


class ExampleLoader:
    """Endless, deterministic, resumable iterator of this rank's micro-batches over a list
    of examples (fine-tuning data held in memory): each epoch is a keyed permutation of the
    examples, and optimizer steps are laid out over ranks like :func:`rank_indices`.

    Args:
        items: the examples (the same list on every rank).
        rank, world: this rank and the data-parallel world size.
        micro_batch: examples per micro-batch; grad_accum: micro-batches per optimizer step.
        seed: the order depends only on (items, seed, name).
        start_step: first optimizer step (its global batch starts at ``start_step * G``,
            ``G = micro_batch * grad_accum * world``, unless ``consumed_samples`` is given).
        collate: turns a list of examples into a batch.
        name: part of the shuffle key, so two kinds of data never share an order.
    """

    def __init__(self, items: list, rank: int, world: int, micro_batch: int, grad_accum: int, seed: int, start_step: int = 0, *,
                 collate, name: str = "examples", consumed_samples: int | None = None):
        if not items:
            raise UserError("no training example left (every example was dropped or bad); check the training data")
        self.items, self.rank, self.world = items, int(rank), int(world)
        self.micro_batch, self.grad_accum, self.seed, self.name = int(micro_batch), int(grad_accum), int(seed), name
        self.global_batch = self.micro_batch * self.grad_accum * self.world
        rank_indices(0, 0, self.rank, self.world, self.micro_batch, self.grad_accum)  # validates the layout
        self.collate = collate
        self._perms: dict[int, FeistelPermutation] = {}
        self._seek(start_step, start_step * self.global_batch if consumed_samples is None else consumed_samples)

    def _seek(self, step: int, consumed: int) -> None:
        self.step, self.consumed_samples, self.micro_step = int(step), int(consumed), 0

    def index(self, g: int) -> int:
        """Index into ``items`` of global example ``g`` (epoch ``g // n``, shuffled within it)."""
        epoch, p = divmod(int(g), len(self.items))
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[epoch] = FeistelPermutation(len(self.items), self.name, self.seed, epoch)
        return int(perm(p))

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Item indices this rank reads at ``micro_step`` of optimizer ``step`` (from the state's origin)."""
        base = self.consumed_samples - self.step * self.global_batch  # nonzero after a resume with another layout
        return [self.index(base + g) for g in rank_indices(step, micro_step, self.rank, self.world, self.micro_batch, self.grad_accum)]

    @property
    def epoch(self) -> float:
        """Epochs of the items completed by the start of the current step."""
        return self.consumed_samples / len(self.items)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.collate([self.items[i] for i in self.indices(self.step, self.micro_step)])
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self._seek(self.step + 1, self.consumed_samples + self.global_batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        """``{"consumed_samples", "step", "items"}`` at the start of the current (unfinished) step."""
        return {"consumed_samples": self.consumed_samples, "step": self.step, "items": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (the same items; any world/accumulation layout).

        Raises:
            UserError: the state was saved over a different number of items (other data).
        """
        if "items" in state and int(state["items"]) != len(self.items):
            raise UserError(f"the checkpoint's data order was made over {state['items']} examples, the data now "
                            f"gives {len(self.items)}; resume with the same data settings, or start a new run")
        self._seek(int(state["step"]), int(state["consumed_samples"]))

    def close(self) -> None:
        """Nothing to release (no read-ahead thread); present for symmetry with RankLoader."""


class FixedBatches:
    """A fixed list of validation micro-batches split evenly over ranks.

    The items are shuffled once with ``seed`` (None keeps their order) and cut into
    micro-batches (the last may be smaller); ``num_batches > 0`` keeps the first that many.
    Rank ``r`` runs batches ``r, r + world, ...``; every rank makes the same number of
    forward passes (ZeRO-3 needs that), a rank short of one repeats a batch flagged not
    real (count the loss of real batches only). Iterating yields ``(batch, real)``.
    """

    def __init__(self, items: list, rank: int, world: int, micro_batch: int, *, collate, num_batches: int = 0,
                 seed: int | None = None, name: str = "val"):
        if not (0 <= rank < world) or micro_batch < 1:
            raise ValueError(f"need 0 <= rank < world and micro_batch >= 1; got rank={rank} world={world} micro_batch={micro_batch}")
        order = list(range(len(items)))
        if seed is not None and items:
            order = FeistelPermutation(len(items), name, seed)(np.arange(len(items))).tolist()
        batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
        if num_batches > 0:
            batches = batches[:num_batches]
        self.items, self.batches, self.collate = items, batches, collate
        per_rank = -(-len(batches) // world)
        #: (batch index, real) per forward pass of this rank
        self.plan = [(b if b < len(batches) else rank % max(1, len(batches)), b < len(batches))
                     for b in (rank + k * world for k in range(per_rank))]

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for b, real in self.plan:
            yield self.collate([self.items[i] for i in self.batches[b]]), real

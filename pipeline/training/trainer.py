"""The training engine shared by pre-training and fine-tuning.

One optimizer step = ``grad_accum`` micro-batches per rank. The loss is normalised by the
number of target tokens in the whole window (every micro-batch of every rank), not a mean
of per-micro-batch means: each micro-batch contributes ``sum of token losses × (accum ×
D) / window tokens``, which DeepSpeed divides by ``accum`` (``engine.backward``) and by ``D``
after summing over ranks, leaving exactly ``sum / window tokens``. ``D`` is the world size,
except under sequence parallelism with ZeRO 0-2, where DeepSpeed divides by the data-parallel
size (:func:`pipeline.training.sequence_parallel.grad_divisor`).

Side concerns live elsewhere: :mod:`pipeline.training.monitor` (TensorBoard, throughput, MFU),
:mod:`pipeline.training.checkpoint` (step directories), :mod:`pipeline.training.preemption` (signals).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from pipeline import dist, faults
from pipeline.training.preemption import EXIT_REQUEUE, Preemption

IGNORE_INDEX = -100


@dataclass
class OptimConfig:
    micro_batch_size: int = 4
    """Sequences per rank per forward/backward pass."""
    grad_accum: int = 0
    """Micro-batches accumulated per optimizer step (0: derived from global_batch_size, else 1)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks (0: micro_batch_size × grad_accum × ranks).
    Must equal micro_batch_size × grad_accum × data-parallel ranks."""
    max_steps: int = 200
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate (reached after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear schedules)."""
    warmup_steps: int = 20
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to min_lr_ratio × lr at max_steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (never applied to biases and norm weights)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    seed: int = 1234
    """Seed of the model initialisation, the data order and dropout."""
    eval_every: int = 100
    """Validate every this many optimizer steps (0: only at the end)."""
    eval_batches: int = 20
    """Micro-batches per validation, over all ranks."""

    def check(self) -> list[tuple[str, str]]:
        p = []
        for key in ("micro_batch_size", "max_steps"):
            if getattr(self, key) <= 0:
                p.append((key, f"must be > 0, got {getattr(self, key)}"))
        for key in ("grad_accum", "global_batch_size", "warmup_steps", "eval_every", "eval_batches", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                p.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if not self.lr > 0:
            p.append(("lr", f"must be > 0, got {self.lr}"))
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"))
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                p.append((key, f"must be in [0, 1), got {getattr(self, key)}"))
        return p


def lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    """Multiplier of ``lr`` after ``s`` completed optimizer steps (warmup, then decay)."""
    warm, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if cfg.schedule == "constant" or total <= warm:
            return 1.0
        progress = min(1.0, (s - warm) / (total - warm))
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Task(Protocol):
    """What a stage trains: turns a micro-batch into ``(sum of losses, number of targets)``."""

    def loss(self, model, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def targets(self, batch: Any) -> int: ...

    def tokens(self, batch: Any) -> int:
        """Input tokens the model processes for ``batch`` (for throughput)."""
        ...

    # Optional, found by hasattr (pipeline.training.tasks.dpo.DPOLoss has them):
    # window_counts(window) -> [float]: more counts of a step's micro-batches, summed over ranks in
    #   the trainer's one all-reduce of the counts; window_totals(totals) receives
    #   [targets, tokens, *those counts] summed, before the step's first loss.
    # step_sums() -> ({name: sum}, count): metrics of the step, all-reduced with the loss and
    #   logged as train/<name> = sum / count.


class CausalLMTask:
    """Next-token prediction on ``{"input_ids", "labels", optional "attention_mask"/"position_ids"}``
    or on a ``(B, T+1)`` token tensor (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    Args:
        logits_tile: compute the head and the loss over tiles of this many tokens, never the
            whole ``(B, T, V)`` logits (:func:`pipeline.training.tiling.tiled_loss`); 0: at once.
    """

    def __init__(self, logits_tile: int = 0):
        self.logits_tile = logits_tile

    @staticmethod
    def _fields(batch) -> dict[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            return {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}
        return batch

    def targets(self, batch) -> int:
        return int((self._fields(batch)["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch) -> int:
        return int(self._fields(batch)["input_ids"].numel())

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._fields(batch)
        device = next(iter(model.parameters())).device if hasattr(model, "parameters") else "cpu"
        inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
        labels = b["labels"].to(device)
        if self.logits_tile:
            from pipeline.training.tiling import tiled_loss

            return tiled_loss(model, inputs, labels, self.logits_tile, IGNORE_INDEX)
        logits = model(**inputs).logits  # (B, T, V)
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, (labels != IGNORE_INDEX).sum()


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    loss_scale: float | None
    tokens: int  # input tokens processed over all ranks
    metrics: dict[str, float] = field(default_factory=dict)  # the task's step metrics (train/<key>)


class Trainer:
    """The loop: accumulate, step, log, validate, checkpoint, stop on signals.

    Args:
        engine: the DeepSpeed engine.
        task: the loss.
        batches: yields this rank's micro-batches in order, starting at ``start_step``.
        evaluate: ``evaluate(engine) -> {"loss": ..., ...}`` run by every rank, or None.
        periodic: further ``(every, fn)`` evaluations, ``fn(engine) -> metrics`` run by every rank
            every ``every`` steps (0: never) and after the last (the in-loop harness).
        save: ``save(step) -> Path`` writes a checkpoint collectively.
        grad_divisor: what DeepSpeed divides summed gradients by (default: the world size).
    """

    def __init__(self, *, engine, task: Task, batches: Iterator, grad_accum: int, max_steps: int, start_step: int,
                 monitor, evaluate: Callable | None, eval_every: int, save: Callable[[int], Path], save_every: int,
                 grad_divisor: int | None = None, periodic: Sequence[tuple[int, Callable]] = ()):
        self.engine, self.task, self.batches = engine, task, batches
        self.grad_accum, self.max_steps, self.step = grad_accum, max_steps, start_step
        self.monitor, self.evaluate, self.eval_every = monitor, evaluate, eval_every
        self.periodic = list(periodic)  # every 0: after the last step only
        self.save, self.save_every = save, save_every
        self.world = dist.world_size()
        # what DeepSpeed divides the summed gradients by: the world, except ZeRO-0 under sequence
        # parallelism (pipeline.training.sequence_parallel.grad_divisor)
        self.grad_divisor = grad_divisor or self.world
        self.last_saved = start_step
        self.history: list[float] = []

    def train_step(self, preemption: Preemption | None = None) -> StepResult | None:
        """One optimizer step; None, before any forward, when ``preemption`` says every rank is to stop."""
        engine, task = self.engine, self.task
        engine.train()
        window = [next(self.batches) for _ in range(self.grad_accum)]
        self.monitor.data_ready()
        # one all-reduce for the window's counts: targets, tokens, and any the task normalises by
        # (window_counts/window_totals: e.g. DPO's SFT term, per chosen token while the loss is per pair),
        # and last the ranks' stop votes (a separate collective per step before; issue 16)
        extra = task.window_counts(window) if hasattr(task, "window_counts") else []
        vote = [preemption.flag()] if preemption is not None else []
        totals = dist.all_reduce_sum_floats([sum(task.targets(b) for b in window), sum(task.tokens(b) for b in window),
                                             *extra, *vote])
        if vote and preemption.agreed(totals.pop()):
            return None
        total, tokens = totals[0], totals[1]
        if total <= 0:
            raise RuntimeError("a training window without any target token (every label masked)")
        if hasattr(task, "window_totals"):
            task.window_totals(totals)
        scale = self.grad_accum * self.grad_divisor / total
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in window:
            loss, _ = task.loss(engine, batch)
            engine.backward(loss * scale)
            engine.step()
            loss_sum += loss.detach().double().cpu()
        # one all-reduce for the loss and the task's step metrics (step_sums: sums and their count)
        sums, count = task.step_sums() if hasattr(task, "step_sums") else ({}, 0.0)
        reduced = dist.all_reduce_sum_floats([float(loss_sum), count, *sums.values()])
        loss = reduced[0] / total
        metrics = {k: v / reduced[1] for k, v in zip(sums, reduced[2:])} if reduced[1] > 0 else {}
        opt = getattr(engine, "optimizer", None)
        scale_attr = getattr(opt, "cur_scale", None) if engine.fp16_enabled() else None
        gnorm = engine.get_global_grad_norm()
        return StepResult(
            loss=loss,
            lr=engine.get_lr()[0],
            grad_norm=float(gnorm) if gnorm is not None else None,
            loss_scale=float(scale_attr) if scale_attr is not None else None,
            tokens=int(tokens),
            metrics=metrics,
        )

    def fit(self) -> int:
        """Train to ``max_steps``; returns 0, or EXIT_REQUEUE after a preemption checkpoint."""
        with Preemption() as preemption:
            while self.step < self.max_steps:
                self.monitor.step_start()
                # the stop is agreed inside the step's first collective, before its forward: the
                # checkpoint is of the step before (after its evaluation and checkpoint, if any)
                result = self.train_step(preemption)
                if result is None:
                    sig = preemption.signal_received()
                    dist.print0(f"stop requested ({sig.name if sig else 'signal on another rank'}): checkpointing at step {self.step}")
                    self._save()
                    return EXIT_REQUEUE
                self.step += 1
                self.history.append(result.loss)
                faults.after_step()  # a test's delay between steps (pipeline/faults.py)
                self.monitor.step_end(self.step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                                      loss_scale=result.loss_scale, force=self.step == self.max_steps, tokens=result.tokens,
                                      extra=result.metrics or None)
                if self.evaluate and self.eval_every and self.step % self.eval_every == 0 and self.step < self.max_steps:
                    self.monitor.eval(self.step, self.evaluate(self.engine))
                for every, fn in self.periodic:
                    if every and self.step % every == 0 and self.step < self.max_steps:
                        self.monitor.eval(self.step, fn(self.engine))
                if self.save_every and self.step % self.save_every == 0 and self.step < self.max_steps:
                    self._save()
        if self.evaluate:
            self.monitor.eval(self.step, self.evaluate(self.engine))
        for _every, fn in self.periodic:
            self.monitor.eval(self.step, fn(self.engine))
        self._save()
        return 0

    def _save(self) -> None:
        if self.last_saved == self.step:  # already saved at this step (or resumed from it)
            return
        t = time.time()
        path = self.save(self.step)
        self.last_saved = self.step
        dist.print0(f"checkpoint {path} ({time.time() - t:.1f} s)")


def evaluate_lm(engine, task: Task, batches) -> dict[str, float]:
    """Mean token loss and perplexity over ``batches`` of ``(tensor, real)`` (every rank)."""
    engine.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch, real in batches:
            loss, n = task.loss(engine, batch)  # every rank runs the same number of passes (ZeRO-3)
            if real:
                loss_sum += float(loss)
                count += int(n)
    loss_sum = dist.all_reduce_sum_float(loss_sum)
    count = dist.all_reduce_sum_float(float(count))
    engine.train()
    mean = loss_sum / max(count, 1.0)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}



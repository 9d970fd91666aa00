"""What every training stage does around its model: the run's DeepSpeed engine and files.

Pre-training and fine-tuning share this sequence (only the model, the data and the loss
differ)::

    resolved = resolve_run(cfg, conf, ...)             # world, precision, DeepSpeed JSON, memory plan
    run = Run(cfg, resolved, inputs=...)               # output and resume point checked
    run.start()                                        # process group, seeds
    engine = run.initialize(model)                     # deepspeed.initialize: AdamW groups, LR schedule
    step = run.resume(compat)                          # refuse an incompatible checkpoint, load it; run files
    monitor = run.monitor(...); save = run.saver(...)  # rank-0 logging; collective checkpoint writer
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.checkpoint_paths import read_meta
from pipeline.config import to_dict, to_yaml
from pipeline.inputs import check_output
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.training import checkpoint
from pipeline.training.ds_config import zero_stage
from pipeline.training.resolve import ResolvedRun


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """One launch of a training stage. ``cfg`` has ``output``, ``train`` (OptimConfig),
    ``checkpoint``, ``deepspeed``, ``dist`` and ``monitor`` sections; ``resolved`` is what
    :func:`pipeline.training.resolve.resolve_run` made of it (world, precision, DeepSpeed JSON).

    The constructor does only cheap checks (the output directory against ``inputs``, the
    resume point), so user errors surface before the process group or the model exist.
    """

    def __init__(self, cfg: Any, resolved: ResolvedRun, *, local_rank: int | None, inputs: Iterable[tuple[str, str]] = ()):
        self.cfg = cfg
        self.resolved = resolved
        self.local_rank = local_rank
        check_output(cfg.output, inputs=inputs)
        self.env = resolved.env
        self.ds = copy.deepcopy(resolved.ds)
        self.out = Path(cfg.output)
        self.root = self.out / "checkpoints"
        self.resume_from = resolved.resume_from
        # a checkpoint of another world size is refused here, before any heavy work, unless it
        # is a universal one, which DeepSpeed loads only when told so before initialize
        self.universal = self.resume_from is not None and checkpoint.check_world_size(
            self.resume_from, read_meta(self.resume_from), self.env.world_size)
        if self.universal:
            self.ds["checkpoint"] = {**self.ds.get("checkpoint", {}), "load_universal": True}
        self.micro, self.accum, self.precision = resolved.micro, resolved.accum, resolved.precision
        self.sp = resolved.sp
        self.mpu = None  # DeepSpeed's sequence-parallel groups (attach_sequence_parallel)
        self.engine = None
        self.compat: dict = {}
        self.consumed_samples: int | None = None  # global samples before the resumed step (None: fresh start)
        self.start_step = 0

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def dp_rank(self) -> int:
        return self.resolved.dp_rank

    @property
    def dp_world(self) -> int:
        return self.resolved.dp_world

    @property
    def sp_rank(self) -> int:
        return self.resolved.sp_rank

    @property
    def grad_divisor(self) -> int:
        """What DeepSpeed divides summed gradients by (:func:`pipeline.training.sequence_parallel.grad_divisor`)."""
        from pipeline.training.sequence_parallel import grad_divisor

        return grad_divisor(self.world, self.sp, zero_stage(self.ds))

    def attach_sequence_parallel(self, model, *, documents: bool = False) -> None:
        """With ``sp`` > 1: DeepSpeed's Ulysses attention for ``model`` and its groups (after :meth:`start`);
        ``documents``: the rows are packed documents that must not attend to each other."""
        from pipeline.training.sequence_parallel import attach

        self.mpu = attach(model, sp=self.sp, micro_batch=self.micro, attn=self.cfg.model.attn_implementation,
                          documents=documents)

    def shard(self, batches):
        """This rank's slices of its group's micro-batches (unchanged without sequence parallelism)."""
        if self.sp == 1:
            return batches
        from pipeline.training.sequence_parallel import ShardedBatches

        return ShardedBatches(batches, self.sp_rank, self.sp, self.micro)

    def start(self) -> None:
        """Start the process group and seed every generator."""
        self.env = dist.init(self.cfg.dist, self.local_rank)
        seed_everything(self.cfg.train.seed)
        if self.sp > 1 and self.env.local_world_size % self.sp and self.world > self.env.local_world_size:
            dist.print0(f"note: sequence-parallel groups of {self.sp} consecutive ranks span nodes ({self.env.local_world_size} "
                        f"rank(s) per node): exact, but every attention layer's all-to-alls cross the network; launch a "
                        f"multiple of {self.sp} tasks per node to keep each group on one")

    def _write_run_files(self) -> None:
        """The resolved config and DeepSpeed JSON beside the run (rank 0). Written only once the
        resume point is accepted, so a launch refused for a foreign checkpoint leaves the files
        of the run it would have continued untouched."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", to_yaml(self.cfg))
            atomic_write_json(self.out / "ds_config.json", self.ds)

    def initialize(self, model):
        """``deepspeed.initialize`` with AdamW groups (no decay on biases/norms) and the LR schedule."""
        import deepspeed
        import torch

        from pipeline.training.model import param_groups
        from pipeline.training.trainer import lr_lambda

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, self.cfg.train.weight_decay),
            config=self.ds,
            mpu=self.mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg.train)),
        )
        return self.engine

    def resume(self, compat: dict, before_load: Callable[[], None] | None = None) -> int:
        """Load ``resume_from`` if any (refusing an incompatible one); returns the start step.

        Args:
            compat: what must match a checkpoint to resume from it (architecture,
                tokenizer_fingerprint, world_size, zero_stage, model_summary).
            before_load: run once the resume point is accepted (or there is none), while the
                engine still holds the starting weights (e.g. DPO's reference log-probs).
        """
        self.compat = {**compat, "world_size": self.world, "zero_stage": zero_stage(self.ds), "sequence_parallel_size": self.sp}
        if self.resume_from is None:
            self._write_run_files()
            if before_load is not None:
                before_load()
            return 0
        meta = read_meta(self.resume_from)
        checkpoint.check_compatible(self.resume_from, meta, self.compat)
        self._write_run_files()
        if before_load is not None:
            before_load()
        checkpoint.load(self.engine, self.resume_from, universal=self.universal)
        # the data position in global samples: right even when this launch's global batch differs
        self.consumed_samples = int(meta["consumed_samples"]) if "consumed_samples" in meta else None
        self.start_step = int(meta["step"])
        if self.consumed_samples is None:  # a checkpoint without the count: this launch's global batch throughout
            self.consumed_samples = self.start_step * self.micro * self.accum * self.dp_world
        dist.print0(f"resumed from {self.resume_from} at step {meta['step']}")
        return self.start_step

    def monitor(self, *, flops_per_token: float, seq_len: int, hparams: dict):
        from pipeline.training.monitor import Monitor, peak_flops

        device = next(self.engine.module.parameters()).device
        peak = peak_flops(device, self.precision)[0] if self.rank == 0 else 0.0  # only rank 0 reports
        samples = self.micro * self.accum * self.dp_world
        mon = Monitor(
            self.cfg.monitor, self.out / "tensorboard", enabled=self.rank == 0, world_size=self.world,
            flops_per_token=flops_per_token, peak_flops_per_device=peak, tokens_per_step=samples * seq_len,
            samples_per_step=samples, device=device,
        )
        mon.log_hparams({**to_dict(self.cfg), **hparams, "world_size": self.world, "precision": self.precision,
                         "sequence_parallel_size": self.sp})
        return mon

    def saver(self, *, hf_files: Callable[[], dict[str, Path]], meta: dict) -> Callable[[int], Path]:
        """A collective ``save(step)``; ``hf_files()`` (rank 0) names what goes into ``hf/``."""
        samples = self.micro * self.accum * self.dp_world
        files = {"config.yaml": to_yaml(self.cfg), "ds_config.json": json.dumps(self.ds, indent=2) + "\n"}

        def save(step: int) -> Path:
            # counted from the resumed position: an earlier launch may have had another global batch
            consumed = (self.consumed_samples or 0) + (step - self.start_step) * samples
            full = {**self.compat, **meta, "consumed_samples": consumed, "global_batch": samples, "precision": self.precision,
                    "deepspeed_config": self.resolved.config}
            hf = hf_files() if self.rank == 0 else {}
            return checkpoint.save(self.engine, self.root, step, full, files, hf, self.cfg.checkpoint.keep_last)

        return save

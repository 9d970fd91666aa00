"""A training launch, resolved once: recipe + launch environment -> :class:`ResolvedRun`.

Everything a training stage decides before the process group exists is decided here, in
one place and one order, and every later part reads the result instead of deciding again:

1. where this process sits (:func:`pipeline.dist.detect`: world, rank, launcher) and the
   checkpoint it resumes from (``checkpoint.resume``);
2. the precision (``deepspeed.precision``; ``auto``: bf16 where the GPU has it, else fp32);
3. the DeepSpeed JSON: the file named by ``deepspeed.config``, or for ``auto`` the fastest
   shipped config that the memory planner says fits the detected target (when resuming, the
   config the checkpoint was trained with: a requeued job on a node with less free memory
   must not switch ZeRO stage under its own checkpoint);
4. that JSON with every ``"auto"`` filled (:func:`pipeline.training.ds_config.resolve_for_recipe`);
5. the planner's memory estimate for it, and the refusal when it cannot fit
   (``deepspeed.memory_check``).

The same function serves the stage (``run``), ``--print-config`` (which shows what a launch
with this world size would use) and the planner CLI (which builds the recipe the same way).
The recipe itself is never modified: ``cfg.deepspeed.config`` stays ``auto`` in the run's
``config.yaml``, and ``ds_config.json`` beside it records what ``auto`` became.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.checkpoint_paths import read_meta
from pipeline.dist import DistEnv
from pipeline.errors import UserError
from pipeline.training import checkpoint
from pipeline.training.ds_config import locate_ds_config, resolve_for_recipe, resolve_precision, summarize
from pipeline.training.plan import (
    CANDIDATES,
    CPU_RANK_RUNTIME,
    GPU_RANK_HOST_RUNTIME,
    Estimate,
    GiB,
    Recipe,
    Target,
    config_exists,
    detect_target,
    estimate,
    estimate_config,
    make_plan,
    model_facts,
)
from pipeline.training.sequence_parallel import check as check_sequence_parallel
from pipeline.training.sequence_parallel import dp_coords


@dataclass
class ResolvedRun:
    """What one launch of a training stage will use; built by :func:`resolve_run`."""

    env: DistEnv
    """This process in the job (world size, rank, launcher)."""
    precision: str
    """bf16, fp16 or fp32."""
    config: str
    """The DeepSpeed JSON file used (for ``deepspeed.config=auto``: the planner's choice)."""
    ds: dict
    """That JSON with every ``"auto"`` filled: what ``deepspeed.initialize`` gets."""
    recipe: Recipe
    """The model and batch facts the memory estimate is made of."""
    estimate: Estimate | None = None
    """The planner's memory estimate of ``config`` on ``target`` (None: not asked for)."""
    target: Target | None = None
    """The detected target (None when the memory was not checked)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the console (what ``auto`` chose and why)."""
    resume_from: Path | None = None
    """The checkpoint this launch continues (None: a fresh start)."""
    sp: int = 1
    """Sequence-parallel degree (``parallel.sequence_parallel_size``): ranks sharing one sequence."""

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel group (the index of its sequence-parallel group)."""
        return dp_coords(self.env.rank, self.env.world_size, self.sp)[0]

    @property
    def dp_world(self) -> int:
        """Groups that see different data: ``world / sp`` (every batch formula reads this)."""
        return dp_coords(self.env.rank, self.env.world_size, self.sp)[1]

    @property
    def sp_rank(self) -> int:
        return dp_coords(self.env.rank, self.env.world_size, self.sp)[2]

    @property
    def micro(self) -> int:
        return int(self.ds["train_micro_batch_size_per_gpu"])

    @property
    def accum(self) -> int:
        return int(self.ds["gradient_accumulation_steps"])

    def memory_line(self) -> str:
        if self.estimate is None or self.target is None:
            return ""
        e, unit = self.estimate, "GPU" if self.target.on_gpu else "rank"
        return (f"{_g(e.device_total)} GiB per {unit}, {_g(e.cpu_node)} GiB CPU per node estimated"
                f"{'' if e.fits else ' (does not fit: ' + e.why_not + ')'}; {self.target.describe()}")

    def describe(self) -> str:
        """``--print-config``'s addition: the DeepSpeed JSON this launch would use, and why."""
        head = [f"# DeepSpeed config for {self.world} rank(s): {self.config} -> {summarize(self.ds)}"]
        head += [f"# {n}" for n in self.notes]
        if self.memory_line() and not any(n.startswith("deepspeed.config=auto") for n in self.notes):  # auto's note says it
            head.append(f"# memory: {self.memory_line()}")
        return "\n".join(head) + "\n" + json.dumps(self.ds, indent=2) + "\n"


def _g(x: int) -> str:
    return f"{x / GiB:.2f}"


def recipe_from(cfg: Any, conf, *, seq_len: int, head: str, precision: str) -> Recipe:
    """The planner's view of a stage recipe (``cfg`` has ``model``, ``train`` and ``deepspeed``)."""
    t, m = cfg.train, cfg.model
    facts = model_facts(conf, head=head, attn_implementation=m.attn_implementation, tiled_mlp=m.tiled_mlp,
                        tiled_logits=m.tiled_logits, tile_tokens=m.tile_tokens,
                        activation_offload=m.activation_checkpointing and m.activation_offload)
    return Recipe(facts=facts, seq_len=seq_len,
                  micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, global_batch=t.global_batch_size,
                  checkpointing=m.activation_checkpointing, precision=precision, cfg=cfg,
                  sp=getattr(getattr(cfg, "parallel", None), "sequence_parallel_size", 1))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def stage_target(env: DistEnv, nvme_path: str) -> Target:
    """The detected target of a launched stage; host memory already held by its rank processes
    (which exist by now, each about as big as this one) counts as available to them."""
    per_node = max(env.local_world_size, 1)
    t = detect_target(per_node, nodes=max(env.world_size // per_node, 1), nvme_path=nvme_path)
    t.cpu_memory += per_node * min(_rss(), int(CPU_RANK_RUNTIME if not t.on_gpu else GPU_RANK_HOST_RUNTIME))
    # ranks read MemAvailable at slightly different moments: a coarse grid keeps their `auto` choice identical
    t.cpu_memory = t.cpu_memory // (GiB // 4) * (GiB // 4)
    t.gpu_memory = t.gpu_memory // (GiB // 4) * (GiB // 4)
    return t


def _hidden(conf) -> int | None:
    """The hidden size (ZeRO-3 bucket sizes derive from it) under the names transformers uses."""
    return getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", None) or getattr(conf, "d_model", None)


def candidates(recipe: Recipe, target: Target) -> list[Estimate]:
    """Every shipped config (:data:`~pipeline.training.plan.CANDIDATES`, fastest first) estimated
    at the recipe's micro batch and checkpointing on ``target``."""
    return [e for c in CANDIDATES if config_exists(c)
            and (e := estimate_config(recipe, c, target, recipe.micro_batch, recipe.checkpointing))]


def choose_auto(recipe: Recipe, target: Target) -> Estimate | None:
    """What ``deepspeed.config=auto`` becomes: the fastest candidate that fits (None: none)."""
    return next((e for e in candidates(recipe, target) if e.fits), None)


def resolve_run(cfg: Any, conf, *, seq_len: int, head: str, local_rank: int | None = None,
                refuse: bool = True, seq_len_key: str = "data.seq_len") -> ResolvedRun:
    """Resolve a training launch (see the module docstring).

    Args:
        cfg: the stage config (``model``, ``train``, ``deepspeed`` sections).
        conf: the model's transformers config (sizes the memory estimate and the ZeRO buckets).
        seq_len: tokens per example; head: ``causal_lm`` or ``classification``.
        refuse: raise when the chosen config cannot fit (the stage); ``--print-config`` shows
            the estimate instead.

    Raises:
        UserError: a bad DeepSpeed JSON or batch arithmetic; with ``refuse``, a config (or,
            for ``auto``, every config) that needs more memory than there is, naming the
            estimate, the available memory and what to use instead.
    """
    d = cfg.deepspeed
    env = dist.detect(local_rank_arg=local_rank)
    precision = resolve_precision(d.precision)
    recipe = recipe_from(cfg, conf, seq_len=seq_len, head=head, precision=precision)
    sp = recipe.sp
    check_sequence_parallel(conf, sp=sp, seq_len=seq_len, world=env.world_size, attn=cfg.model.attn_implementation,
                            key=seq_len_key)
    hidden = _hidden(conf)
    auto = d.config.strip() == "auto"
    from pipeline.training.model import check_offload

    notes: list[str] = [n for n in (check_offload(cfg.model),) if n]  # refuses a transformers without it
    target = stage_target(env, d.nvme_path or "/local_nvme") if (auto or d.memory_check) else None
    resume_from = checkpoint.find_resume(cfg.checkpoint.resume, Path(cfg.output) / "checkpoints")
    trained_with = read_meta(resume_from).get("deepspeed_config") if resume_from is not None else None

    if auto and trained_with and config_exists(trained_with):
        fit = estimate_config(recipe, trained_with, target, recipe.micro_batch, recipe.checkpointing)
        if fit is not None and not fit.fits and d.memory_check and refuse:
            raise UserError(
                f"deepspeed.config=auto: the run being resumed ({resume_from}) was trained with {trained_with}, which "
                f"no longer fits ({fit.why_not}; {target.describe()}); resume where it fits, or set deepspeed.config to "
                f"another config after converting the checkpoint (python launch/convert_checkpoint.py --checkpoint "
                f"{resume_from}), or set deepspeed.memory_check=false to start anyway.")
        if fit is not None:
            notes.append(f"deepspeed.config=auto: {trained_with} (the config of the checkpoint being resumed)")
            ds = resolve_for_recipe(cfg, trained_with, world=env.world_size // sp, sp=sp, precision=precision, hidden=hidden,
                                    strict_nvme=False)
            return ResolvedRun(env=env, precision=precision, config=trained_with, ds=ds, recipe=recipe, estimate=fit,
                               target=target, notes=notes, resume_from=resume_from, sp=sp)

    if auto:
        rows = candidates(recipe, target)
        fit = next((e for e in rows if e.fits), None) if d.memory_check else rows[0]
        if fit is None:
            if refuse:
                last = rows[-1]
                raise UserError(
                    f"deepspeed.config=auto: no DeepSpeed config fits micro batch {recipe.micro_batch} x seq_len {seq_len} "
                    f"on {target.describe()} (the most frugal, {Path(last.config).name}, needs {_g(last.device_total)} GiB "
                    f"per {'GPU' if target.on_gpu else 'rank'} and {_g(last.cpu_node)} GiB CPU per node; {last.why_not}); "
                    f"use: {make_plan(recipe, target).advice()} (see python launch/plan.py), or set "
                    "deepspeed.memory_check=false to start anyway.")
            fit = rows[-1]
            notes.append(f"deepspeed.config=auto: nothing fits; the most frugal is {fit.config}")
        else:
            notes.append(f"deepspeed.config=auto: {fit.config} (the fastest that fits: {_g(fit.device_total)} GiB per "
                         f"{'GPU' if target.on_gpu else 'rank'}, {_g(fit.cpu_node)} GiB CPU per node estimated; "
                         f"{target.describe()})")
        # an NVMe path in the recipe is for the case that auto picks the NVMe config
        ds = resolve_for_recipe(cfg, fit.config, world=env.world_size // sp, sp=sp, precision=precision, hidden=hidden,
                                strict_nvme=False)
        return ResolvedRun(env=env, precision=precision, config=fit.config, ds=ds, recipe=recipe, estimate=fit,
                           target=target, notes=notes, resume_from=resume_from, sp=sp)

    path = str(locate_ds_config(d.config))
    ds = resolve_for_recipe(cfg, path, world=env.world_size // sp, sp=sp, precision=precision, hidden=hidden)
    resolved = ResolvedRun(env=env, precision=precision, config=d.config, ds=ds, recipe=recipe, target=target,
                           notes=notes, resume_from=resume_from, sp=sp)
    if target is None:
        return resolved
    est = resolved.estimate = estimate(recipe.facts, ds, path, target, micro=recipe.micro_batch, seq=recipe.local_seq,
                                       precision=precision, checkpointing=recipe.checkpointing)
    if est.fits or not refuse:
        return resolved
    p = make_plan(recipe, target)
    raise UserError(
        f"{d.config} will not fit: {est.why_not} (estimated: model states {_g(est.states)} + activations "
        f"{_g(est.activations)} + buffers {_g(est.buffers)} GiB per {'GPU' if target.on_gpu else 'rank'} for micro batch "
        f"{recipe.micro_batch} x seq_len {seq_len}; {target.describe()}). "
        + (f"Use instead: {p.advice()}" if p.choice is not None else f"Nothing fits: {p.advice()[len('nothing fits: '):]}")
        + " (python launch/plan.py --config ... prints the table), or set deepspeed.memory_check=false if you know better.")

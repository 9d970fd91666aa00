"""Task ``dpo``: full-parameter preference tuning (Direct Preference Optimization) of a causal LM.

Data: pairs of answers to one prompt, ``chosen`` preferred over ``rejected``
(:mod:`pipeline.data.preference`; the chat template applied as in SFT). Each micro-batch of B
pairs is one forward pass over 2B rows; a row's log-probability ``log π(y|x)`` is the sum of
its trained tokens' log-probs (the answer and its end-of-turn token, never the prompt).

Losses, with ``Δ = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))``:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(βΔ)``; with ``label_smoothing`` ε > 0 the
  conservative form ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` (cDPO: ε is the chance a label is flipped);
* ``ipo`` (Azar et al. 2023): ``(Δ' - 1/(2β))²`` where Δ' uses log-probs averaged over each
  answer's trained tokens (TRL's normalisation, confirmed with the IPO authors);
* ``sft_weight`` α > 0 adds α × the mean negative log-likelihood per chosen token (RPO,
  Pang et al. 2024; TRL's ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``).

The pair losses are averaged over the pairs of an optimizer step and the SFT term over its
chosen tokens, across micro-batches and ranks, so accumulation and the world size change nothing.

The reference ``π_ref`` is the starting model. ``reference=precompute`` (default) computes its
log-probs of every train and validation pair once, before training, with the training engine
still holding the starting weights (one forward pass per pair, spread over the ranks), and
stores them in ``<output>/reference/`` with a fingerprint of the model and the encoded data: a
resumed or relaunched run reads them back, so training holds one model. ``reference=model``
keeps a frozen copy (a DeepSpeed inference engine, ZeRO-3 partitioned when training is) and
runs it on every micro-batch: more memory and compute, the same numbers.

Metrics (TensorBoard ``train/…`` every step, ``eval/…`` on validation pairs): ``loss``,
``reward_chosen`` = β(log π - log π_ref) of chosen, ``reward_rejected``, ``reward_margin``,
``reward_accuracy`` (share of pairs with reward chosen > rejected), ``logps_chosen``,
``logps_rejected`` (mean sequence log-probs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.data.preference import WHAT, PairBatches, PairLoader, PreferenceData, PreferenceDataConfig, prepare
from pipeline.data.preference import inspect as render
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.training.tasks.base import FinetuneTask, pad_id
from pipeline.training.trainer import IGNORE_INDEX

METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected")
"""The per-pair means logged beside the loss (see the module docstring)."""


@dataclass
class DPOConfig(PreferenceDataConfig):
    beta: float = 0.1
    """β: how far the policy may move from the reference (larger: closer to it). For ipo, the
    regularisation τ of the paper."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's logistic loss (with label_smoothing: conservative DPO); ipo: IPO's squared loss."""
    label_smoothing: float = 0.0
    """sigmoid only: the assumed share of pairs whose preference label is wrong (cDPO), in [0, 0.5)."""
    sft_weight: float = 0.0
    """α of an added SFT term on the chosen answers (mean NLL per chosen token; RPO); 0: none."""
    reference: Literal["precompute", "model"] = "precompute"
    """precompute: the starting model's log-probs of every pair computed once before training and
    stored in <output>/reference/ (one model in memory); model: a frozen copy of the starting model
    runs beside the trained one on every micro-batch."""

    def check(self) -> list[tuple[str, str]]:
        p = super().check()
        if not self.beta > 0:
            p.append(("beta", f"must be > 0, got {self.beta} (e.g. 0.1)"))
        if not 0.0 <= self.label_smoothing < 0.5:
            p.append(("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"))
        elif self.label_smoothing and self.loss != "sigmoid":
            p.append(("label_smoothing", f"applies to loss=sigmoid only; set it to 0 for loss={self.loss}"))
        if self.sft_weight < 0:
            p.append(("sft_weight", f"must be >= 0, got {self.sft_weight}"))
        return p


# ---------------------------------------------------------------------------- the numbers
def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, nll)``: each row's summed log-prob of its trained tokens (2B,) and the summed
    negative log-likelihood of the chosen rows' tokens (a scalar, for the SFT term)."""
    device = next(iter(model.parameters())).device if hasattr(model, "parameters") else "cpu"
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    tok = -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)  # 0 where not trained
    logps = tok.sum(-1)
    return logps, -logps[: labels.shape[0] // 2].sum()


def pair_losses(cfg: DPOConfig, pi: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each pair's preference loss (B,) from the policy's and reference's row log-probs (2B,)
    (chosen rows first) and the rows' trained-token counts (2B,); see the module docstring."""
    B = pi.shape[0] // 2
    ratio = pi - ref.to(pi)  # log π - log π_ref per row
    if cfg.loss == "ipo":
        ratio = ratio / counts.to(pi).clamp(min=1)
        return (ratio[:B] - ratio[B:] - 1 / (2 * cfg.beta)) ** 2
    z = cfg.beta * (ratio[:B] - ratio[B:])
    eps = cfg.label_smoothing
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def pair_metrics(cfg: DPOConfig, pi: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-pair quantities of :data:`METRICS`, each (B,) (detached)."""
    pi, ref = pi.detach().double(), ref.detach().double()
    B = pi.shape[0] // 2
    r = cfg.beta * (pi - ref)
    rc, rr = r[:B], r[B:]
    return {"reward_chosen": rc, "reward_rejected": rr, "reward_margin": rc - rr,
            "reward_accuracy": (rc > rr).double(), "logps_chosen": pi[:B], "logps_rejected": pi[B:]}


def _counts(batch: dict) -> torch.Tensor:
    return (batch["labels"] != IGNORE_INDEX).sum(-1)


class DPOLoss:
    """The trainer's :class:`~pipeline.training.trainer.Task` for preference pairs.

    ``loss`` returns ``(sum over the micro-batch's pairs of the pair loss [+ the SFT term's
    share], pairs)``; the trainer divides by the step's pairs over all ranks. The SFT term is
    normalised by the step's chosen tokens instead: :meth:`window_counts` gives them to the
    trainer's one all-reduce, :meth:`window_totals` receives the sums, and each micro-batch's
    SFT sum is scaled by pairs / chosen tokens so the trainer's division leaves
    ``α × NLL / chosen tokens``.

    Args:
        cfg: the task's section (β, loss, label smoothing, SFT weight).
        reference: a frozen model giving the reference log-probs, or None when the batches
            carry them (``batch["reference"]``, stored).
    """

    def __init__(self, cfg: DPOConfig, reference=None):
        self.cfg, self.reference = cfg, reference
        self._sft_scale = 0.0
        self._sums: torch.Tensor | None = None  # METRICS summed on the model's device: read once a step (no sync per micro-batch)
        self._pairs = 0

    def targets(self, batch) -> int:
        return int(batch["index"].numel())

    def tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def window_counts(self, window: list) -> list[float]:
        return [float(sum(int(_counts(b)[: b["index"].numel()].sum()) for b in window))] if self.cfg.sft_weight else []

    def window_totals(self, totals: list[float]) -> None:
        if self.cfg.sft_weight:  # totals: [pairs, tokens, chosen tokens] of the step over all ranks
            self._sft_scale = totals[0] / max(totals[2], 1.0)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """The reference's row log-probs (2B,): stored ones, or a forward of the frozen model."""
        if "reference" in batch:
            return batch["reference"].T.reshape(-1)  # (B, 2) chosen/rejected -> chosen rows then rejected rows
        with torch.no_grad():
            return sequence_logps(self.reference, batch)[0].double()

    def parts(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pair losses (B,), chosen NLL sum, policy row log-probs (2B,), reference row log-probs (2B,))``."""
        ref = self.reference_logps(batch)
        pi, nll = sequence_logps(model, batch)
        counts = _counts(batch).to(pi.device)
        return pair_losses(self.cfg, pi, ref, counts), nll, pi, ref

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, nll, pi, ref = self.parts(model, batch)
        total = losses.sum()
        if self.cfg.sft_weight:
            total = total + self.cfg.sft_weight * self._sft_scale * nll
        metrics = pair_metrics(self.cfg, pi, ref)
        sums = torch.stack([metrics[k].sum() for k in METRICS])
        self._sums = sums if self._sums is None else self._sums + sums
        self._pairs += losses.shape[0]
        return total, torch.tensor(losses.shape[0])

    def step_sums(self) -> tuple[dict[str, float], float]:
        """The metric sums and pair count since the last call (then reset): the trainer
        all-reduces them with the loss and logs ``sum / count``."""
        values = self._sums.tolist() if self._sums is not None else [0.0] * len(METRICS)
        sums, n = dict(zip(METRICS, values)), float(self._pairs)
        self._sums, self._pairs = None, 0
        return sums, n


def evaluate_pairs(engine, task: DPOLoss, batches) -> dict[str, float]:
    """Mean loss and :data:`METRICS` over ``batches`` of ``(batch, real)`` (every rank runs
    the same number of passes; only real batches count)."""
    engine.eval()
    sums = dict.fromkeys(("loss", "nll", "chosen_tokens", "pairs", *METRICS), 0.0)
    with torch.no_grad():
        for batch, real in batches:
            losses, nll, pi, ref = task.parts(engine, batch)
            if not real:
                continue
            sums["loss"] += float(losses.sum())
            sums["nll"] += float(nll)
            sums["chosen_tokens"] += float(_counts(batch)[: losses.shape[0]].sum())
            sums["pairs"] += losses.shape[0]
            for k, v in pair_metrics(task.cfg, pi, ref).items():
                sums[k] += float(v.sum())
    keys = list(sums)
    sums = dict(zip(keys, dist.all_reduce_sum_floats([sums[k] for k in keys])))
    engine.train()
    n = max(sums["pairs"], 1.0)
    out = {"loss": sums["loss"] / n + task.cfg.sft_weight * sums["nll"] / max(sums["chosen_tokens"], 1.0)}
    out.update({k: sums[k] / n for k in METRICS})
    return out


# ---------------------------------------------------------------------------- the reference
def model_identity(init: Path) -> dict[str, Any]:
    """What identifies the starting model's weights without reading them: its directory, config,
    the checkpoint it was exported from (``init_model``) and its weight files' sizes and times
    (a directory whose weights were rewritten, or re-exported from another step, differs)."""
    init = Path(init)
    files = sorted(p for p in init.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    made = init / "export_meta.json"
    return {"path": str(init.resolve()), "config": (init / "config.json").read_text(encoding="utf-8"),
            "exported_from": json.loads(made.read_text(encoding="utf-8")).get("source_checkpoint") if made.is_file() else None,
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def compute_reference(engine, data: PreferenceData, run: Any, pad: int) -> dict[str, np.ndarray]:
    """The engine's row log-probs of every train and validation pair, ``{split: (pairs, 2)}``
    float64 (chosen, rejected); the pairs are dealt over the data-parallel ranks in equal
    numbers of forward passes (ZeRO-3 gathers collectively) and summed back."""
    engine.eval()
    out = {}
    with torch.no_grad():
        for split, pairs in (("train", data.train), ("val", data.val)):
            table = np.zeros((len(pairs), 2), dtype=np.float64)
            for batch, real in PairBatches(pairs, run.dp_rank, run.dp_world, run.micro, pad_id=pad, seed=None,
                                           name=f"dpo-reference-{split}"):
                logps = sequence_logps(engine, batch)[0].double().cpu().view(2, -1).T.numpy()
                if real:
                    table[batch["index"].numpy()] = logps
            flat = dist.all_reduce_sum_floats(table.ravel().tolist()) if len(pairs) else []
            out[split] = np.asarray(flat, dtype=np.float64).reshape(len(pairs), 2)
    engine.train()
    return out


class DPOTask(FinetuneTask):
    """Preference tuning on (prompt, chosen, rejected) pairs: DPO, IPO, RPO (see the module docstring)."""

    name = "dpo"
    section = "dpo"
    config_class = DPOConfig
    head = "causal_lm"
    data_what = WHAT
    seq_len_field = "seq_len"
    rows_per_example = 2  # a pair is two rows of one forward pass (the planner sizes activations by it)

    def check(self) -> list[tuple[str, str]]:
        p = super().check()
        if self.cfg.model.tiled_logits:
            p.append(("model.tiled_logits", "task=dpo computes each row's log-probability from whole logits; set it to false"))
        return p

    def prepare(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.data = prepare(self.data_cfg, tokenizer, self.section)
        self.tables: dict[str, np.ndarray] | None = None
        self.reference_model = None

    def describe(self) -> str:
        return (f"dpo: {len(self.data.train)} train / {len(self.data.val)} val pairs; loss {self.data_cfg.loss}, "
                f"beta {self.data_cfg.beta}, reference {self.data_cfg.reference}")

    def inspect(self, tokenizer: Any, n: int) -> list[str]:
        return [render(tokenizer, self.data.train, n)]

    def meta(self) -> dict[str, Any]:
        c = self.data_cfg
        return {"task": self.name, "eos_token_ids": self.data.end_of_turn_ids, "data": self.data.stats,
                "dpo": {"loss": c.loss, "beta": c.beta, "label_smoothing": c.label_smoothing, "sft_weight": c.sft_weight,
                        "reference": c.reference}}

    def configure(self, conf: Any, tokenizer: Any) -> None:
        tokenizer.chat_template = self.data.template  # saved with every checkpoint and the export

    # ------------------------------------------------------------------ the reference
    def setup(self, run: Any, engine: Any, init: Path) -> None:
        """Before a checkpoint is loaded (the engine holds the starting weights): the stored
        reference log-probs, read back or computed now, or the frozen reference model."""
        if self.data_cfg.reference == "model":
            self.reference_model = self._reference_model(run, init)
            return
        d = run.out / "reference"
        fingerprint = {"data": self.data.fingerprint(), "model": model_identity(init)}
        try:
            stored = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            with np.load(d / "logps.npz") as z:
                tables = {k: z[k] for k in ("train", "val")}
            ok = stored.get("fingerprint") == fingerprint and all(
                tables[k].shape == (len(getattr(self.data, k)), 2) for k in tables)
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            dist.print0(f"reference log-probs: read from {d} ({len(self.data.train)} + {len(self.data.val)} pairs)")
        else:
            t = time.time()
            tables = compute_reference(engine, self.data, run, pad_id(self.tokenizer))
            if run.rank == 0:
                d.mkdir(parents=True, exist_ok=True)
                buf = BytesIO()
                np.savez(buf, **tables)
                atomic_write_bytes(d / "logps.npz", buf.getvalue())
                atomic_write_json(d / "meta.json", {"fingerprint": fingerprint, "pairs": {k: len(v) for k, v in tables.items()}})
            dist.barrier()
            dist.print0(f"reference log-probs: {len(self.data.train)} + {len(self.data.val)} pairs in "
                        f"{time.time() - t:.1f} s, stored in {d}")
        self.tables = tables

    def _reference_model(self, run: Any, init: Path):
        """A frozen copy of the starting model as a DeepSpeed inference engine (ZeRO-3 partitioned
        when training is; other stages hold it whole), as TRL's ``prepare_deepspeed`` builds it."""
        import copy

        import deepspeed
        from transformers import AutoConfig

        from pipeline.training.model import ModelConfig, build_model

        ds = copy.deepcopy(run.ds)
        for k in ("optimizer", "scheduler"):
            ds.pop(k, None)
        z = ds.setdefault("zero_optimization", {})
        z.pop("offload_optimizer", None)
        if z.get("stage", 0) != 3:
            ds["zero_optimization"] = {"stage": 0}
        conf = AutoConfig.from_pretrained(init)
        model = build_model(ModelConfig(path=str(init), attn_implementation=self.cfg.model.attn_implementation), conf, ds)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        engine.eval()
        return engine

    # ------------------------------------------------------------------ with the run
    def loaders(self, run: Any, start_step: int) -> tuple[Any, Any | None]:
        t, tables = self.cfg.train, self.tables or {}
        train = PairLoader(self.data.train, run.dp_rank, run.dp_world, run.micro, run.accum, t.seed, start_step,
                           pad_id=pad_id(self.tokenizer), reference=tables.get("train"), consumed_samples=run.consumed_samples)
        val = (PairBatches(self.data.val, run.dp_rank, run.dp_world, run.micro, pad_id=pad_id(self.tokenizer),
                           reference=tables.get("val"), num_batches=t.eval_batches, seed=0) if self.data.val else None)
        return train, val

    def loss(self) -> DPOLoss:
        return DPOLoss(self.data_cfg, self.reference_model)

    def evaluate(self, engine: Any, batches: Any) -> dict[str, float]:
        """Mean loss, rewards, reward accuracy and log-probs over the validation pairs."""
        return evaluate_pairs(engine, self.loss(), batches)

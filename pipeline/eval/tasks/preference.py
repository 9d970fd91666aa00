"""The preference task: how often a model prefers the chosen answer of held-out preference pairs.

Data: a JSONL file of pairs in the shapes DPO fine-tuning reads (:mod:`pipeline.data.preference`:
``prompt`` or ``messages``, ``chosen``, ``rejected``; strings or message lists, TRL's shapes).
Each pair is rendered with the evaluated model's chat template (``template``: its tokenizer's
own, as in training, else the builtin one), tokenized and masked exactly as DPO training does
(:func:`pipeline.data.preference.encode_pairs`), and scored in one forward pass over 2B rows
per batch of B pairs (:func:`pipeline.training.tasks.dpo.sequence_logps`): a row's
log-probability ``log π(y|x)`` is the sum of its answer's tokens' log-probs (the answer and the
end-of-turn token closing it, never the prompt).

Metrics, per model (means over the pairs):

* ``accuracy``: the share of pairs with ``log π(chosen) > log π(rejected)`` (a tie is wrong);
  ``accuracy_per_token``: the same on the mean log-prob per answer token (summed log-probs
  favour the shorter answer); ``margin``: the mean ``log π(chosen) - log π(rejected)``;
  ``logps_chosen``, ``logps_rejected``: the mean summed log-probs;
* with ``reference``: DPO's implicit rewards ``β (log π - log π_ref)``
  (:func:`pipeline.training.tasks.dpo.pair_metrics`, the numbers DPO training logs as
  ``eval/reward_*``): ``reward_accuracy`` (chosen's reward > rejected's; a tie is wrong),
  ``reward_margin``, ``reward_chosen``, ``reward_rejected``, and ``loss``, the sigmoid DPO loss
  at ``beta``. The reference runs once, before the evaluated models, on the token ids of each
  of them (its tokenizer must read those ids as the same tokens).

One row per model and pair goes to ``preferences.jsonl``. Every refusal comes before a weight
is read: the pairs (``file:line``), the templates, the tokenizers of the models and the
reference, and a pair set that nothing is left of after the length limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.errors import UserError
from pipeline.eval.models import Loaded, ModelRef, check_kind, resolve_model
from pipeline.eval.ranks import gather, progress
from pipeline.eval.tasks.base import EvalTask, no_examples, read_data
from pipeline.eval.tasks.perplexity import resolve_seq_len
from pipeline.inputs import max_positions

WHAT = "preference pairs (JSONL: prompt or messages, chosen, rejected)"
DEFAULT_SEQ = 2048  # tokens per row when no model names its positions
PLAIN = ("accuracy", "accuracy_per_token", "margin", "logps_chosen", "logps_rejected")
"""Headline metrics without a reference (``accuracy`` first: the one the console prints first)."""
REWARDS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
"""Headline metrics a reference adds, in front (the names DPO training logs)."""


@dataclass
class _Encoding:
    """One model's pairs as token ids, as its tokenizer and chat template make them."""

    pairs: list[Any]  # pipeline.data.preference.Encoded, index = position in this list
    wheres: list[str]  # file:line of each kept pair
    stats: dict[str, int]
    fingerprint: str  # of the ids and masks: the key of the reference's log-probs
    pad: int


@dataclass
class _State:
    """What :meth:`Preference.prepare` found before any weight is read."""

    seq_len: int
    encodings: dict[str, _Encoding]  # by role: model, compare_to
    reference: ModelRef | None = None
    tables: dict[str, Any] = field(default_factory=dict)  # fingerprint -> (pairs, 2) reference log-probs


def read_preference(cfg: Any) -> list[Any]:
    """The first ``max_batches`` (0: all) pairs of ``cfg.data``, each checked (``file:line`` on a bad one)."""
    from pipeline.data.preference import normalize_pair

    pairs = []
    for where, rec in read_data(cfg.data, WHAT):
        pairs.append(normalize_pair(rec, where))
        if cfg.max_batches and len(pairs) >= cfg.max_batches:
            break
    if not pairs:
        raise no_examples(cfg)
    return pairs


def _same_model(a: ModelRef, b: ModelRef) -> bool:
    return (a.checkpoint or str(Path(a.path).resolve())) == (b.checkpoint or str(Path(b.path).resolve()))


def _tokenizer(ref: ModelRef) -> Any:
    """The tokenizer :func:`pipeline.eval.models.load` gives the model, loaded alone (no weights)."""
    from pipeline import inputs
    from pipeline.training.hf_model import hf_tokenizer

    tok = hf_tokenizer(inputs.check_model(ref.path, ref.role).tokenizer_dir)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer of {ref.role} '{ref.path}' is a slow (Python) tokenizer; preference masks need the "
                        "character offsets of a fast one: give a model directory with a tokenizer.json")
    return tok


def _encode(cfg: Any, ref: ModelRef, tok: Any, pairs: list[Any], seq_len: int) -> _Encoding:
    """Render, tokenize and mask the pairs for one model, as DPO training would."""
    from pipeline.data import chat
    from pipeline.data.preference import PreferenceData, PreferenceDataConfig, encode_pairs

    pcfg = PreferenceDataConfig(seq_len=seq_len, template=cfg.template)
    template = chat.chat_template(tok, cfg.template)
    kept, stats = encode_pairs(tok, pairs, pcfg, template, fix=f"or use the builtin template (template=builtin) for {ref.role} "
                                                                f"'{ref.path}'")
    if not kept:
        raise UserError(f"no pair of '{cfg.data}' keeps an answer token within seq_len={seq_len} tokens for {ref.role} "
                        f"'{ref.path}' (every prompt fills it); raise seq_len (at most the model's positions) or shorten "
                        "the prompts")
    wheres = [e.where for e in kept]
    fingerprint = PreferenceData(template, [], kept, []).fingerprint()  # DPO's digest of the ids and masks
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return _Encoding(kept, wheres, stats, fingerprint, 0 if pad is None else int(pad))


def _check_ids(enc: _Encoding, ref: ModelRef, tok: Any, reader: ModelRef, reader_tok: Any) -> None:
    """Refuse ``reader`` (a model or the reference) whose embeddings or tokenizer do not fit ``ref``'s ids."""
    ids = sorted({i for e in enc.pairs for i in e.chosen[0] + e.rejected[0]})
    vocab = getattr(reader.config, "vocab_size", None)
    if vocab is not None and ids and ids[-1] >= vocab:
        raise UserError(f"{reader.role} '{reader.path}' has {vocab} embeddings, but the pairs tokenized for {ref.role} "
                        f"'{ref.path}' use token id {ids[-1]}; give models that share one tokenizer")
    if reader is not ref:
        mine, theirs = tok.convert_ids_to_tokens(ids), reader_tok.convert_ids_to_tokens(ids)
        diff = next(((i, a, b) for i, a, b in zip(ids, mine, theirs) if a != b), None)
        if diff is not None:
            raise UserError(f"the tokenizer of {reader.role} '{reader.path}' reads the pairs' token ids as other tokens than "
                            f"the one of {ref.role} '{ref.path}' (id {diff[0]}: {diff[2]!r}, not {diff[1]!r}); the reference "
                            "must score the same tokens: give the model the evaluated one was tuned from (same tokenizer)")


def _row_logps(model: Any, enc: _Encoding, batch_size: int, desc: str) -> Any:
    """Each pair's summed answer log-probs, ``(pairs, 2)`` float64 (chosen, rejected), in pair order.

    Batches of ``batch_size`` pairs in file order, dealt over the ranks (every rank runs the
    same number of forward passes: ZeRO-3 gathers parameters collectively); the rows of every
    rank are gathered, so every rank returns the whole table.
    """
    import numpy as np
    import torch

    from pipeline.data.preference import PairBatches
    from pipeline.training.tasks.dpo import sequence_logps

    batches = PairBatches(enc.pairs, dist.rank(), dist.world_size(), batch_size, pad_id=enc.pad, seed=None,
                          name="eval-preference")
    local: list[tuple[int, float, float]] = []
    with torch.no_grad(), progress(len(batches.batches), desc) as bar:
        for batch, real in batches:
            logps = sequence_logps(model, batch)[0].double().cpu().view(2, -1).T  # (B, 2): chosen, rejected
            if real:
                local += [(i, c, r) for i, (c, r) in zip(batch["index"].tolist(), logps.tolist())]
            bar.update()
    rows = sorted(gather(local))
    assert [i for i, _, _ in rows] == list(range(len(enc.pairs))), "every pair scored once"
    return np.asarray([[c, r] for _, c, r in rows], dtype=np.float64).reshape(len(rows), 2)


def score(pi: Any, counts: Any, ref: Any | None, beta: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Mean metrics and per-pair values from the row log-probs.

    Args:
        pi: the model's log-probs, (pairs, 2) float64 (chosen, rejected).
        counts: each answer's scored tokens, (pairs, 2).
        ref: the reference's log-probs, (pairs, 2), or None.
        beta: DPO's β of the rewards.

    Returns:
        ``(metrics, per-pair arrays)``; the reward metrics only with ``ref``.
    """
    import numpy as np
    import torch

    from pipeline.training.tasks.dpo import DPOConfig, pair_losses, pair_metrics

    dpo = DPOConfig(beta=beta)
    rows = torch.from_numpy(np.ascontiguousarray(pi.T).reshape(-1))  # chosen rows, then rejected rows
    ref_rows = torch.from_numpy(np.ascontiguousarray(ref.T).reshape(-1)) if ref is not None else torch.zeros_like(rows)
    per = {k: v.numpy() for k, v in pair_metrics(dpo, rows, ref_rows).items()}
    per_token = pi / np.maximum(counts, 1)
    per.update(correct=pi[:, 0] > pi[:, 1], correct_per_token=per_token[:, 0] > per_token[:, 1])
    m = {"accuracy": float(per["correct"].mean()), "accuracy_per_token": float(per["correct_per_token"].mean()),
         "margin": float((pi[:, 0] - pi[:, 1]).mean()), "logps_chosen": float(per["logps_chosen"].mean()),
         "logps_rejected": float(per["logps_rejected"].mean()),
         "logps_per_token_chosen": float(per_token[:, 0].mean()), "logps_per_token_rejected": float(per_token[:, 1].mean()),
         "ties": int((pi[:, 0] == pi[:, 1]).sum())}
    if ref is not None:
        counts_rows = torch.from_numpy(np.ascontiguousarray(counts.T).reshape(-1))
        m.update({k: float(per[k].mean()) for k in REWARDS})
        m.update(loss=float(pair_losses(dpo, rows, ref_rows, counts_rows).mean()),
                 reward_ties=int((per["reward_margin"] == 0).sum()), beta=beta)
    return m, per


class Preference(EvalTask):
    """Preference accuracy of held-out pairs; with a reference model, DPO's implicit reward accuracy."""

    name = "preference"
    headline = PLAIN
    counts = ("pairs",)
    rows_file = "preferences.jsonl"

    def read(self, cfg: Any) -> list[Any]:
        return read_preference(cfg)

    def prepare(self, cfg: Any, refs: list[ModelRef], pairs: list[Any]) -> _State:
        reference = None
        for r in refs:  # a classifier is named as such, not by what its tokenizer makes of the pairs
            check_kind(r, list(getattr(r.config, "architectures", None) or []), self.name, self.head)
        if cfg.reference:
            reference = resolve_model(cfg.reference, "reference", "")
            check_kind(reference, list(getattr(reference.config, "architectures", None) or []), self.name, self.head)
            if _same_model(reference, refs[0]):
                raise UserError(f"reference '{cfg.reference}' is the model evaluated (model '{cfg.model}'): every reward would "
                                "be 0; give the model it was tuned from (e.g. the SFT model), or leave reference empty")
        every = refs + ([reference] if reference else [])
        if cfg.seq_len:
            seq_len = resolve_seq_len(cfg, every)
        else:
            seq_len = min([n for n in (max_positions(r.config) for r in every if r.config is not None) if n] or [DEFAULT_SEQ])
        if seq_len < 2:
            raise UserError(f"seq_len={seq_len} leaves no answer token to score; set seq_len >= 2 (0: the models' positions)")
        toks = {r.role: _tokenizer(r) for r in every}
        encodings = {r.role: _encode(cfg, r, toks[r.role], pairs, seq_len) for r in refs}
        for r in refs:  # each model reads its own ids; the reference reads every model's
            for reader in [r] + ([reference] if reference else []):
                _check_ids(encodings[r.role], r, toks[r.role], reader, toks[reader.role])
        return _State(seq_len, encodings, reference)

    def before_models(self, cfg: Any, state: _State, load: Callable[[ModelRef], Loaded]) -> dict:
        """The reference's log-probs of every distinct encoding, before the evaluated models load."""
        ref = state.reference
        if ref is None:
            return {}
        t = time.perf_counter()
        lm = load(ref)
        loaded_s = time.perf_counter() - t
        try:
            for enc in state.encodings.values():
                if enc.fingerprint not in state.tables:
                    state.tables[enc.fingerprint] = _row_logps(lm.model, enc, cfg.batch_size, f"{ref.name} (reference)")
        finally:
            lm.close()
        dist.print0(f"reference {ref.name}: log-probs of {len(next(iter(state.encodings.values())).pairs)} pairs")
        return {"reference": {"role": ref.role, "name": ref.name, "path": ref.path, "checkpoint": ref.checkpoint,
                              "step": ref.step, "beta": cfg.beta,
                              "seconds": {"load": loaded_s, "evaluate": time.perf_counter() - t - loaded_s}}}

    def headline_for(self, state: _State, metrics: dict) -> tuple[str, ...]:
        return (*REWARDS, *PLAIN) if state.reference is not None else PLAIN

    def evaluate(self, lm: Loaded, cfg: Any, state: _State) -> tuple[dict, list[dict]]:
        import numpy as np

        enc = state.encodings[lm.ref.role]
        pi = _row_logps(lm.model, enc, cfg.batch_size, f"{lm.ref.name} preference")
        counts = np.asarray([[sum(e.chosen[1][1:]), sum(e.rejected[1][1:])] for e in enc.pairs], dtype=np.int64)
        ref = state.tables[enc.fingerprint] if state.reference is not None else None
        metrics, per = score(pi, counts, ref, cfg.beta)
        metrics.update(pairs=len(enc.pairs), mean_tokens_chosen=float(counts[:, 0].mean()),
                       mean_tokens_rejected=float(counts[:, 1].mean()), truncated=enc.stats["truncated"],
                       dropped=enc.stats["dropped_untrained"], seq_len=state.seq_len)
        rows = []
        for i, where in enumerate(enc.wheres):
            row = {"index": i, "model": lm.ref.name, "where": where, "logps_chosen": float(pi[i, 0]),
                   "logps_rejected": float(pi[i, 1]), "tokens_chosen": int(counts[i, 0]), "tokens_rejected": int(counts[i, 1]),
                   "correct": bool(per["correct"][i]), "correct_per_token": bool(per["correct_per_token"][i])}
            if ref is not None:
                row.update(reward_chosen=float(per["reward_chosen"][i]), reward_rejected=float(per["reward_rejected"][i]),
                           reward_correct=bool(per["reward_accuracy"][i]))
            rows.append(row)
        return metrics, rows


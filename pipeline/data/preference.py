"""Preference pairs: JSONL ``prompt``/``chosen``/``rejected`` -> masked token pairs -> per-rank micro-batches.

Pipeline::

    JSONL records --normalize--> (prompt messages, chosen messages, rejected messages)
        --chat template--> two conversations --tokenizer--> (ids, trained mask) each
        --cut after the last trained token, length limit--> pairs --shuffle/ranks--> batches

* **Records** (:func:`normalize_pair`), the shapes of TRL's preference datasets:

  - ``{"prompt": "...", "chosen": "...", "rejected": "...", "system": "..." (optional)}``:
    the prompt becomes a user message, each answer an assistant message;
  - ``{"messages": [...], "chosen": ..., "rejected": ...}`` or ``{"prompt": [...], ...}``:
    the prompt is a conversation (system/user/assistant turns, ending with a user turn);
  - ``chosen``/``rejected`` as strings, as one message object, or as message lists; a list that
    starts with the prompt's messages (UltraFeedback-style full conversations) has them removed;
  - without a prompt: ``chosen`` and ``rejected`` are whole conversations, the prompt is their
    common leading messages (TRL's implicit prompt).

  A malformed record stops with ``file:line`` (``bad_records=fail``) or is skipped and counted.
* **Masking**, as in SFT (:func:`pipeline.data.sft.encode_conversations`): each answer is
  rendered after the prompt with the chat template and tokenized as one text; the trained
  (log-prob carrying) tokens are the answer's assistant text and the end-of-turn token closing
  it, never the prompt (not even its own assistant turns) and not the template's separator
  after the end of turn. Tokens after an answer's last trained token are dropped (they carry
  no log-prob and, causally, change none). So a pair's log-probabilities are exactly those of
  ``tokenizer.apply_chat_template`` text for the same messages.
* **Length**: a sequence longer than ``seq_len`` keeps its start (TRL's ``keep_start``); a pair
  either of whose answers is left without a trained token (a prompt of ``seq_len`` tokens or
  more) is dropped and counted; ``overlong=drop`` drops every pair that would be cut.
* **Validation split**: ``val`` names its own files, else a pair goes to validation when a hash
  of its messages falls below ``val_fraction`` (stable across runs and file order).
* **Batches** (:func:`collate`): a micro-batch of B pairs is one forward pass over 2B rows, the
  chosen answers first then the rejected ones (as TRL does), right-padded to the longest row
  of the batch, with a 2-D attention mask, labels shifted (``labels[r, t]`` is token ``t+1``
  when trained, else -100) and ``index`` (B,) the pairs' positions in their split (the key of
  the stored reference log-probabilities).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple

import numpy as np

from pipeline.data import chat
from pipeline.data.example_loader import ExampleLoader, FixedBatches
from pipeline.data.records import read_records
from pipeline.data.sft import IGNORE_INDEX, decoded_pieces, encode_conversations, example_hash, split_and_length_problems
from pipeline.errors import UserError
from pipeline.inputs import data_files

KEY = "dpo"  # this config's key in the fine-tune stage config, named in error messages
WHAT = "a JSONL file of preference pairs (prompt or messages, chosen, rejected)"
_SHAPE = ('expected {"prompt": "...", "chosen": "...", "rejected": "..."} (strings, or message lists), or '
          '{"messages": [...prompt turns...], "chosen": ..., "rejected": ...}, or whole conversations in '
          '"chosen" and "rejected" sharing their prompt turns')


@dataclass
class PreferenceDataConfig:
    train: str = ""
    """Training pairs: a JSONL file (optionally .gz), a glob, a directory (its *.jsonl and
    *.jsonl.gz files) or several of these separated by commas. Each line is
    {"prompt": "...", "chosen": "...", "rejected": "..."} (an optional "system"), or
    {"messages": [prompt turns], "chosen": ..., "rejected": ...}; chosen/rejected may be
    strings or message lists (TRL's conversational format). Required."""
    val: str = ""
    """Validation pairs in the same form; "" takes val_fraction of the train pairs instead
    (chosen by a hash of each pair: stable across runs)."""
    val_fraction: float = 0.05
    """Fraction of the train pairs held out for validation when val is "" (0: none)."""
    seq_len: int = 512
    """Most tokens of prompt + answer (each of the two rows of a pair); longer ones keep their start."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Pairs with a row longer than seq_len: cut it (keeping the start) or drop and count the pair."""
    template: Literal["auto", "builtin", "tokenizer"] = "auto"
    """Chat template: the tokenizer's own if it has one (auto), the builtin <|user|>/<|assistant|>
    one with EOS closing replies, or strictly the tokenizer's (error if it has none). Use the one
    the model was fine-tuned with (a pipeline SFT model carries it in its tokenizer)."""
    bad_records: Literal["fail", "skip"] = "fail"
    """A malformed line or record: stop with file:line, or skip and count it."""

    def check(self) -> list[tuple[str, str]]:
        """Problems with these values as ``(field, problem and fix)`` pairs."""
        return split_and_length_problems(self.val_fraction, self.seq_len)


# ---------------------------------------------------------------------------- reading
class Pair(NamedTuple):
    """One record as read: the prompt's messages, the two answers' messages, and ``file:line``."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    where: str


def _messages(value: Any, what: str, bad) -> list[dict]:
    """A string (one message of the default role), one message object, or a list of them."""
    if isinstance(value, str):
        return [{"role": "assistant" if what != "prompt" else "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad(f"'{what}' is {'an empty array' if value == [] else chat._kind(value)}, not a string or a message list")
    out = []
    for i, m in enumerate(value):
        if type(m) is not dict:
            raise bad(f"{what}[{i}] is {chat._kind(m)}, not a message object")
        role, content = m.get("role"), m.get("content")
        if role not in chat.ROLES:
            raise bad(f"{what}[{i}] has role {role!r}, not one of system/user/assistant")
        if type(content) is not str:
            raise bad(f"{what}[{i}] ({role}) has 'content' {chat._kind(content)}, not a string")
        out.append({"role": role, "content": content})
    return out


def normalize_pair(obj: Any, where: str) -> Pair:
    """A JSON record as a :class:`Pair` (see the module docstring for the accepted shapes).

    Raises:
        UserError: ``"{where}: <what is wrong>; expected <shapes>"``.
    """
    def bad(problem: str) -> UserError:
        return UserError(f"{where}: {problem}; {_SHAPE}")

    if type(obj) is not dict:
        raise bad(f"record is {chat._kind(obj)}, not a JSON object")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise bad(f"no '{key}' (keys: {', '.join(list(obj)[:20]) or 'none'})")
    chosen, rejected = _messages(obj["chosen"], "chosen", bad), _messages(obj["rejected"], "rejected", bad)
    prompt_value = obj.get("messages", obj.get("prompt"))
    if prompt_value is not None:
        prompt = _messages(prompt_value, "messages" if "messages" in obj else "prompt", bad)
        if obj.get("system") is not None:
            if type(obj["system"]) is not str:
                raise bad(f"'system' is {chat._kind(obj['system'])}, not a string")
            if prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": obj["system"]}, *prompt]
        n = len(prompt)  # answers given as whole conversations repeat the prompt first
        if len(chosen) > n and chosen[:n] == prompt:
            chosen = chosen[n:]
        if len(rejected) > n and rejected[:n] == prompt:
            rejected = rejected[n:]
    else:  # whole conversations: the prompt is their common leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise bad("no 'prompt' or 'messages', and 'chosen' and 'rejected' share no leading message to take as the prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not any(m["role"] == "user" for m in prompt):
        raise bad("the prompt has no user message")
    if prompt[-1]["role"] == "assistant":
        raise bad("the prompt ends with an assistant message; it must end with the user turn the answers reply to")
    for key, ans in (("chosen", chosen), ("rejected", rejected)):
        if ans[0]["role"] != "assistant":
            raise bad(f"'{key}' starts with a {ans[0]['role']} message; the answer must be an assistant message")
    if chosen == rejected:
        raise bad("'chosen' and 'rejected' are the same answer (nothing to prefer)")
    if any(m["role"] == "system" for m in prompt[1:] + chosen + rejected):
        raise bad("a system message after the first message")
    return Pair(prompt, chosen, rejected, where)


def read_pairs(spec: str, bad_records: Literal["fail", "skip"] = "fail",
               key: str = f"{KEY}.train") -> tuple[list[Pair], dict[str, int]]:
    """Read and normalise every record of the files named by ``spec`` (in file and line order).

    Returns:
        (pairs, ``{"files", "records", "bad_records"}``).

    Raises:
        UserError: a bad line under ``bad_records=fail``, named ``file:line``.
    """
    stats = {"files": 0, "records": 0, "bad_records": 0}
    out: list[Pair] = []
    section = key.rpartition(".")[0] or KEY
    fix = f"Fix the line, or set {section}.bad_records=skip to skip and count such lines."
    for path in data_files(spec, key, WHAT):
        stats["files"] += 1
        for where, _, obj in read_records(path, "jsonl", bad_records=bad_records, fix=fix, stats=stats,
                                          utf8="strict", objects=False):
            try:
                out.append(normalize_pair(obj, where))
            except UserError as e:
                if bad_records != "skip":
                    raise UserError(f"{e}. {fix}") from None
                stats["bad_records"] += 1
    stats.pop("utf8_replaced", None)
    return out, stats


def pair_hash(p: Pair) -> float:
    """A stable number in [0, 1) for a pair's content (the validation split)."""
    return example_hash(p.prompt + [{"role": "chosen", "content": json.dumps(p.chosen)},
                                    {"role": "rejected", "content": json.dumps(p.rejected)}])


# ---------------------------------------------------------------------------- encoding
class Encoded(NamedTuple):
    """One tokenized pair: ``index`` in its split, ``(ids, trained mask)`` of each answer after the
    prompt, and where the record came from (``file:line``)."""

    index: int
    chosen: tuple[list[int], list[bool]]
    rejected: tuple[list[int], list[bool]]
    where: str = ""


def _cut(ids: list[int], mask: list[bool], seq_len: int) -> tuple[list[int], list[bool], bool]:
    """Drop the tokens after the last trained one, then keep the first ``seq_len``; (ids, mask, was cut)."""
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    ids, mask = ids[:last + 1], mask[:last + 1]
    return ids[:seq_len], mask[:seq_len], len(ids) > seq_len


def encode_pairs(tokenizer: Any, pairs: list[Pair], cfg: PreferenceDataConfig, template: str | None = None,
                 fix: str = f"use another template ({KEY}.template), or set {KEY}.bad_records=skip to skip and count such "
                            "records") -> tuple[list[Encoded], dict[str, int]]:
    """Render, tokenize, mask and length-limit pairs (``index`` = position among the kept pairs).

    ``fix`` ends the message of a pair the template rejects ("Fix the record, <fix>."): the keys
    of the stage that reads the pairs.

    Returns:
        the kept pairs and stats ``{pairs (given), truncated, dropped_overlong, dropped_untrained,
        bad_records, tokens, chosen_tokens, rejected_tokens}`` (``*_tokens``: trained targets).

    Raises:
        UserError: the template rejects a pair under ``bad_records=fail``.
    """
    template = template or chat.chat_template(tokenizer, cfg.template)
    eot = chat.end_of_turn_text(tokenizer, template)
    convs = [c for p in pairs for c in (p.prompt + p.chosen, p.prompt + p.rejected)]
    first = [len(p.prompt) for p in pairs for _ in range(2)]
    enc = encode_conversations(tokenizer, convs, template, eot, first_trained=first)
    stats = dict.fromkeys(("pairs", "truncated", "dropped_overlong", "dropped_untrained", "bad_records", "tokens",
                           "chosen_tokens", "rejected_tokens"), 0)
    kept: list[Encoded] = []
    for k, p in enumerate(pairs):
        stats["pairs"] += 1
        rows = enc[2 * k:2 * k + 2]
        err = next((r for r in rows if isinstance(r, Exception)), None)
        if err is not None:
            if cfg.bad_records != "skip":
                raise UserError(f"{p.where}: the chat template rejected this pair ({type(err).__name__}: {err}). Fix the "
                                f"record, {fix}.")
            stats["bad_records"] += 1
            continue
        (ci, cm, c_cut), (ri, rm, r_cut) = (_cut(*rows[0], cfg.seq_len), _cut(*rows[1], cfg.seq_len))
        if (c_cut or r_cut) and cfg.overlong == "drop":
            stats["dropped_overlong"] += 1
            continue
        if not any(cm[1:]) or not any(rm[1:]):  # a log-prob needs a trained token after the first
            stats["dropped_untrained"] += 1
            continue
        stats["truncated"] += int(c_cut or r_cut)
        kept.append(Encoded(len(kept), (ci, cm), (ri, rm), p.where))
        stats["tokens"] += len(ci) + len(ri)
        stats["chosen_tokens"] += sum(cm[1:])
        stats["rejected_tokens"] += sum(rm[1:])
    return kept, stats


# ---------------------------------------------------------------------------- batches
def collate(items: list[Encoded], pad_id: int, reference: np.ndarray | None = None) -> dict:
    """A micro-batch of pairs as one forward pass (see the module docstring).

    Args:
        items: the pairs.
        pad_id: id of padding tokens (masked out of attention and loss).
        reference: the split's stored reference log-probs, (pairs, 2) float64 (chosen, rejected),
            or None (a reference model computes them).

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` (2B, T) LongTensors, chosen rows first;
        ``index`` (B,); and ``reference`` (B, 2) float64 when given.
    """
    import torch

    rows = [it.chosen for it in items] + [it.rejected for it in items]
    T = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    attn = np.zeros((len(rows), T), dtype=np.int64)
    for r, (x, m) in enumerate(rows):
        n = len(x)
        xa = np.asarray(x, dtype=np.int64)
        ids[r, :n] = xa
        attn[r, :n] = 1
        labels[r, :n - 1] = np.where(np.asarray(m[1:], dtype=bool), xa[1:], IGNORE_INDEX)
    index = np.asarray([it.index for it in items], dtype=np.int64)
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn), "labels": torch.from_numpy(labels),
           "index": torch.from_numpy(index)}
    if reference is not None:
        out["reference"] = torch.from_numpy(np.ascontiguousarray(reference[index], dtype=np.float64))
    return out


class PairLoader(ExampleLoader):
    """Endless, deterministic, resumable iterator of this rank's pair micro-batches
    (:class:`pipeline.data.example_loader.ExampleLoader` over the pairs)."""

    def __init__(self, pairs: list[Encoded], rank: int, world: int, micro_batch: int, grad_accum: int, seed: int,
                 start_step: int = 0, *, pad_id: int, reference: np.ndarray | None = None,
                 consumed_samples: int | None = None):
        if not pairs:
            raise UserError(f"no training pair left after tokenization (every pair was dropped or bad); check {KEY}.train, "
                            f"{KEY}.seq_len and {KEY}.overlong")
        super().__init__(pairs, rank, world, micro_batch, grad_accum, seed, start_step, name="dpo",
                         collate=partial(collate, pad_id=pad_id, reference=reference), consumed_samples=consumed_samples)


class PairBatches(FixedBatches):
    """Fixed micro-batches of pairs split evenly over ranks, yielding ``(batch, real)``
    (:class:`pipeline.data.example_loader.FixedBatches`; ``seed`` None keeps the pairs' order)."""

    def __init__(self, pairs: list[Encoded], rank: int, world: int, micro_batch: int, *, pad_id: int,
                 reference: np.ndarray | None = None, num_batches: int = 0, seed: int | None = 0, name: str = "dpo-val"):
        super().__init__(pairs, rank, world, micro_batch, num_batches=num_batches, seed=seed, name=name,
                         collate=partial(collate, pad_id=pad_id, reference=reference))


# ---------------------------------------------------------------------------- all together
@dataclass
class PreferenceData:
    """Everything a preference task needs from :func:`prepare`."""

    template: str
    end_of_turn_ids: list[int]
    train: list[Encoded]
    val: list[Encoded]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A digest of every kept pair's tokens and masks, train then val (stored reference
        log-probs are reused only for the same encoded data)."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for split in (self.train, self.val):
            h.update(str(len(split)).encode())
            for e in split:
                for ids, mask in (e.chosen, e.rejected):
                    h.update(np.asarray(ids, dtype=np.int64).tobytes())
                    h.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
                    h.update(str(len(ids)).encode())
        return h.hexdigest()


def prepare(cfg: PreferenceDataConfig, tokenizer: Any, key: str = KEY) -> PreferenceData:
    """Read, split and tokenize train and validation pairs (``stats``: read/train/val)."""
    pairs, read = read_pairs(cfg.train, cfg.bad_records, f"{key}.train")
    if cfg.val.strip():
        val_pairs, vread = read_pairs(cfg.val, cfg.bad_records, f"{key}.val")
        read = {k: read[k] + vread[k] for k in read}
    else:
        train, val_pairs = [], []
        for p in pairs:
            (val_pairs if pair_hash(p) < cfg.val_fraction else train).append(p)
        pairs = train
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer at '{getattr(tokenizer, 'name_or_path', '?')}' is a slow (Python) tokenizer; "
                        f"preference masks need the character offsets of a fast one: use a tokenizer directory with a "
                        f"tokenizer.json")
    template = chat.chat_template(tokenizer, cfg.template)
    train, tstats = encode_pairs(tokenizer, pairs, cfg, template)
    val, vstats = encode_pairs(tokenizer, val_pairs, cfg, template)
    return PreferenceData(template, chat.end_of_turn_ids(tokenizer, template), train, val,
                          {"read": read, "train": tstats, "val": vstats})


# ---------------------------------------------------------------------------- inspection
def inspect(tokenizer: Any, pairs: list[Encoded], n: int, color: bool | None = None) -> str:
    """The first ``n`` pairs, each answer decoded with its log-prob tokens marked (``[[``
    ``]]``, or green when ``color``; default: when stdout is a terminal). The prompt is shown
    once per pair, unmarked: it carries no log-prob."""
    color = sys.stdout.isatty() if color is None else color
    open_, close = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out = []
    for k, e in enumerate(pairs[:max(0, n)]):
        for name, (ids, mask) in (("chosen", e.chosen), ("rejected", e.rejected)):
            out.append(f"--- pair {k} {name}: {len(ids)} tokens, {sum(mask)} with log-prob ---")
            out.append("".join(f"{open_}{t}{close}" if m else t for t, m in decoded_pieces(tokenizer, ids, mask)))
    return "\n".join(out)

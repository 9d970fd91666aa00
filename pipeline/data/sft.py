"""Supervised fine-tuning data: chat JSONL -> masked token rows -> packed, per-rank micro-batches.

Pipeline::

    JSONL records --normalize--> messages --chat template--> text --tokenizer--> (ids, trained mask)
        --truncate/drop--> examples --pack (best-fit decreasing)--> rows --shuffle/ranks--> batches

* **Records** (:func:`read_examples`, read by :func:`pipeline.data.records.read_records`): one
  JSON object per line, ``{"messages": [...]}`` or ``{"prompt", "response", "system"?}``
  (:func:`pipeline.data.chat.normalize_example`). A malformed line stops with ``file:line``
  (``bad_records=fail``) or is skipped and counted.
* **Validation split**: ``val`` names its own files; else an example goes to validation when
  a hash of its messages falls below ``val_fraction`` -- stable across runs, file order and
  file names, and duplicates always land in the same split.
* **Masking** (:func:`encode_conversation`): the ids are exactly
  ``tokenizer(text, add_special_tokens=False)`` of the rendered text. The loss covers the
  assistant's text and the end-of-turn token closing every assistant turn (EOS with the
  builtin template, ``<|im_end|>`` with ChatML), nothing else: not system/user text, not the
  markers before a reply (``<|assistant|>\\n``), not the separator after the end-of-turn
  token. Character spans come from rendering the conversation prefix by prefix: reply ``i``
  starts where ``render(messages[:i], add_generation_prompt=True)`` ends and the trained
  part ends after the last end-of-turn token before ``render(messages[:i+1])`` ends. (A
  template whose prefixes are not prefixes of the whole text, e.g. one that rewrites earlier
  turns, falls back on finding the reply's text and the end-of-turn token after it, before
  the next message's text.) A token is trained when its character span overlaps a trained
  span (``return_offsets_mapping`` of the fast tokenizer), so a token straddling the start
  of a reply is trained. Text in the data that spells a special token (``</s>``) becomes
  that token, as with ``apply_chat_template``.
* **Length**: examples longer than ``seq_len`` tokens are cut (the start is kept) or dropped
  (``overlong``); examples left without a trained target are dropped and counted.
* **Packing** (:func:`pack`): best-fit decreasing into rows of ``seq_len`` tokens,
  deterministic. :func:`collate` gives ``input_ids``/``labels``/``position_ids`` (B, T=seq_len)
  and, for packed rows, a 4-D additive float ``attention_mask`` (B, 1, T, T): 0 where query
  and key belong to the same example and key <= query, the dtype's minimum elsewhere (a
  padding position sees only itself, so no softmax row is empty). Per-example position ids
  alone do not isolate examples with the sdpa/eager attention; this mask does, exactly. It
  costs B*T*T elements (4 x 2048 x 2048 bf16: 32 MiB); pass the model's compute dtype to
  :func:`collate` (``dtype``). Rows are always padded to ``seq_len`` (fixed shapes, the
  memory peak shows at the first step). Without packing a row holds one
  example and ``attention_mask`` is the ordinary 2-D (B, T) 1/0 padding mask. ``labels`` are
  already shifted: ``labels[b, t]`` is the target of position ``t`` -- token ``t + 1`` of the
  same example when that token is trained, else -100 (so never across examples).
* **Order** (:class:`SFTLoader`): global row ``g`` is row ``perm_e(g % n)`` of epoch
  ``e = g // n`` (a Feistel permutation keyed by the seed and epoch); optimizer step ``t``
  reads global rows laid out by :func:`pipeline.data.sampler.rank_indices`, so the data of a
  step is the same for every layout with the same global batch, and a run resumes exactly.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.data import chat
from pipeline.data.example_loader import ExampleLoader, FixedBatches
from pipeline.data.records import read_records
from pipeline.errors import UserError
from pipeline.inputs import data_files

KEY = "sft"  # this config's key in the fine-tune stage config, named in error messages
IGNORE_INDEX = -100  # same as pipeline.training.trainer.IGNORE_INDEX (not imported: keeps torch optional here)
_CHUNK = 512  # conversations rendered and tokenized per batch call

Example = tuple[list[int], list[bool]]  # (token ids, trained mask), equal lengths


@dataclass
class SFTDataConfig:
    train: str = ""
    """Training data: a JSONL file (optionally .gz), a glob, a directory (its *.jsonl and
    *.jsonl.gz files) or several of these separated by commas. Each line is
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or
    {"prompt": "...", "response": "...", "system": "..." (optional)}. Required."""
    val: str = ""
    """Validation data in the same form; "" takes val_fraction of the train examples instead
    (chosen by a hash of each example: stable across runs)."""
    val_fraction: float = 0.05
    """Fraction of the train examples held out for validation when val is "" (0: none)."""
    seq_len: int = 512
    """Tokens per packed row, and the most tokens of one example."""
    packing: bool = True
    """Pack several examples per row, isolated by a block-diagonal attention mask (no
    attention across examples); false: one example per row, padded."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Examples longer than seq_len tokens: cut them (keeping the start) or drop and count them."""
    template: Literal["auto", "builtin", "tokenizer"] = "auto"
    """Chat template: the tokenizer's own if it has one (auto), the builtin <|user|>/<|assistant|>
    one with EOS closing replies, or strictly the tokenizer's (error if it has none)."""
    bad_records: Literal["fail", "skip"] = "fail"
    """A malformed line or record (bad JSON, wrong shape, rejected by the template): stop
    with file:line, or skip and count it."""

    def check(self) -> list[tuple[str, str]]:
        """Problems with these values as ``(field, problem and fix)`` pairs."""
        return split_and_length_problems(self.val_fraction, self.seq_len)


def split_and_length_problems(val_fraction: float, seq_len: int) -> list[tuple[str, str]]:
    """The ``val_fraction`` and ``seq_len`` problems of a chat data section (SFT, preference pairs)."""
    p: list[tuple[str, str]] = []
    if not 0.0 <= val_fraction < 1.0:
        p.append(("val_fraction", f"must be in [0, 1), got {val_fraction} (e.g. 0.05)"))
    if seq_len < 2:
        p.append(("seq_len", f"must be >= 2 tokens, got {seq_len} (e.g. 512)"))
    return p


# ---------------------------------------------------------------------------- reading
@dataclass
class Record:
    """One example as read: its messages and where it came from (``file:line``)."""

    messages: list[dict]
    where: str


def resolve_files(spec: str, key: str = f"{KEY}.train") -> list[Path]:
    """Files named by ``spec``: comma-separated files, globs and directories (*.jsonl, *.jsonl.gz),
    resolved and checked as every data setting is (:func:`pipeline.inputs.data_files`)."""
    return data_files(spec, key, "a JSONL file, glob or directory of chat examples (messages, or prompt/response)")


def read_examples(spec: str, bad_records: Literal["fail", "skip"] = "fail",
                  key: str = f"{KEY}.train") -> tuple[list[Record], dict[str, int]]:
    """Read and normalise every record of the files named by ``spec``.

    Returns:
        (records in file and line order, ``{"files", "records", "bad_records"}``).

    Raises:
        UserError: a bad line under ``bad_records=fail``, named ``file:line``.
    """
    stats = {"files": 0, "records": 0, "bad_records": 0}
    out: list[Record] = []
    fix = f"Fix the line, or set {key.rpartition('.')[0] or KEY}.bad_records=skip to skip and count such lines."
    for path in resolve_files(spec, key):
        stats["files"] += 1
        # utf8=strict: a chat example with replaced characters would train on them; objects=False:
        # normalize_example names the accepted shapes when a line holds another JSON value
        for where, _, obj in read_records(path, "jsonl", bad_records=bad_records, fix=fix, stats=stats,
                                          utf8="strict", objects=False):
            try:
                out.append(Record(chat.normalize_example(obj, where), where))
            except UserError as e:
                if bad_records != "skip":
                    raise UserError(f"{e}. {fix}") from None
                stats["bad_records"] += 1
    stats.pop("utf8_replaced", None)  # always 0 under utf8=strict
    return out, stats


def example_hash(messages: list[dict]) -> float:
    """A stable number in [0, 1) for the content of a conversation (the validation split)."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(canon.encode(), digest_size=8).digest(), "little") / 2.0**64


def split_val(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, val): an example is in val when :func:`example_hash` < ``fraction``."""
    train, val = [], []
    for r in records:
        (val if example_hash(r.messages) < fraction else train).append(r)
    return train, val


# ---------------------------------------------------------------------------- masking
def _spans(text: str, msgs: list[dict], gen_prefixes: dict[int, str], prefixes: dict[int, str],
           eot: str, first: int = 0, cursor: int = 0) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``text`` that carry loss, one per assistant turn from
    message ``first`` on (``cursor``: where the search for a reply's text may start)."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first:
            continue
        a, b = gen_prefixes[i], prefixes[i + 1] if i + 1 < len(msgs) else text
        if text.startswith(a) and text.startswith(b) and len(a) <= len(b):
            start, end = len(a), len(b)
        else:  # the template rewrites earlier turns: find this reply's text after the previous one
            start = text.find(m["content"], cursor) if m["content"] else -1
            if start < 0:
                raise ValueError("the chat template renders the conversation's prefixes differently from the whole "
                                 "conversation, and the assistant text cannot be found in it")
            end = start + len(m["content"])
            # the end-of-turn token that follows, if it comes before the next message's text
            later = msgs[i + 1]["content"] if i + 1 < len(msgs) else ""
            limit = text.find(later, end) if later else len(text)
            nxt = text.find(eot, end) if eot else -1
            if 0 <= nxt and nxt + len(eot) <= (limit if limit >= 0 else len(text)):
                end = nxt + len(eot)
            spans.append((start, end))
            cursor = end
            continue
        at = text.rfind(eot, start, end) if eot else -1
        end = at + len(eot) if at >= 0 else start + len(text[start:end].rstrip())
        spans.append((start, end))
        cursor = end
    return spans


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(off), dtype=bool)
    for s, e in spans:
        mask |= (off[:, 0] < e) & (off[:, 1] > s)
    return mask.tolist()


def encode_conversations(tokenizer: Any, conversations: list[list[dict]], template: str,
                         eot: str | None = None, first_trained: list[int] | None = None) -> list[Example | Exception]:
    """(ids, trained mask) of each conversation, or the exception that rejected it.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets needed).
        conversations: normalised message lists.
        template: the Jinja chat template.
        eot: the end-of-turn text (default: :func:`pipeline.data.chat.end_of_turn_text`).
        first_trained: per conversation, the index of the first message whose assistant turns
            are trained (preference pairs: the completion after the prompt); default all.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer at '{getattr(tokenizer, 'name_or_path', '?')}' is a slow (Python) tokenizer; "
                        f"SFT loss masks need the character offsets of a fast one: use a tokenizer directory with a "
                        f"tokenizer.json")
    eot = chat.end_of_turn_text(tokenizer, template) if eot is None else eot
    out: list[Example | Exception] = []
    for lo in range(0, len(conversations), _CHUNK):
        convs = conversations[lo:lo + _CHUNK]
        texts: list[str | Exception] = []
        spans: list[list[tuple[int, int]] | None] = []
        for k, msgs in enumerate(convs):  # renders per conversation: a template error names one example
            try:
                first = first_trained[lo + k] if first_trained is not None else 0
                asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= first]
                full = chat.render(tokenizer, [msgs], template)[0]
                gen = chat.render(tokenizer, [msgs[:i] for i in asst], template, add_generation_prompt=True)
                ends = [i + 1 for i in asst if i + 1 < len(msgs)]
                pre = chat.render(tokenizer, [msgs[:j] for j in ends], template)
                # the text before the first trained message is never searched for a reply's text
                cursor = len(chat.render(tokenizer, [msgs[:first]], template)[0]) if first else 0
                texts.append(full)
                spans.append(_spans(full, msgs, dict(zip(asst, gen)), dict(zip(ends, pre)), eot, first, cursor))
            except Exception as e:  # jinja TemplateError, raise_exception(...), or ValueError above
                texts.append(e)
                spans.append(None)
        good = [i for i, t in enumerate(texts) if not isinstance(t, Exception)]
        enc = tokenizer([texts[i] for i in good], add_special_tokens=False, return_offsets_mapping=True) if good else None
        results: list[Example | Exception] = list(texts)  # type: ignore[arg-type]
        for k, i in enumerate(good):
            ids = list(enc["input_ids"][k])
            results[i] = (ids, _mask(enc["offset_mapping"][k], spans[i]))
        out.extend(results)
    return out


def encode_conversation(tokenizer: Any, messages: list[dict], template: str) -> Example:
    """(ids, trained mask) of one conversation; see the module docstring for what is trained."""
    res = encode_conversations(tokenizer, [messages], template)[0]
    if isinstance(res, Exception):
        raise res
    return res


def tokenize_examples(tokenizer: Any, examples: list, cfg: SFTDataConfig) -> tuple[list[Example], dict[str, int]]:
    """Render, tokenize, mask and length-limit examples.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        examples: :class:`Record` objects or plain message lists.
        cfg: uses ``template``, ``seq_len``, ``overlong``, ``bad_records``.

    Returns:
        ``[(ids, trained mask)]`` of the kept examples (in order) and stats ``{examples (given),
        truncated, dropped_overlong, dropped_untrained, bad_records, tokens, trained_tokens}``;
        ``trained_tokens`` counts loss targets (trained tokens after an example's first).

    Raises:
        UserError: the template rejects an example under ``bad_records=fail``.
    """
    template = chat.chat_template(tokenizer, cfg.template)
    eot = chat.end_of_turn_text(tokenizer, template)
    stats = dict.fromkeys(("examples", "truncated", "dropped_overlong", "dropped_untrained", "bad_records", "tokens",
                           "trained_tokens"), 0)
    convs = [e.messages if isinstance(e, Record) else e for e in examples]
    kept: list[Example] = []
    for ex, res in zip(examples, encode_conversations(tokenizer, convs, template, eot)):
        stats["examples"] += 1
        if isinstance(res, Exception):
            if cfg.bad_records != "skip":
                where = ex.where if isinstance(ex, Record) else f"example {stats['examples'] - 1}"
                raise UserError(f"{where}: the chat template rejected this conversation ({type(res).__name__}: {res}). "
                                f"Fix the record (e.g. alternate user/assistant turns), use another template "
                                f"({KEY}.template), or set {KEY}.bad_records=skip to skip and count such records.")
            stats["bad_records"] += 1
            continue
        ids, mask = res
        if len(ids) > cfg.seq_len:
            if cfg.overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            ids, mask = ids[:cfg.seq_len], mask[:cfg.seq_len]
            stats["truncated"] += 1
        targets = sum(mask[1:])
        if not targets:
            stats["dropped_untrained"] += 1
            continue
        kept.append((ids, mask))
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += targets
    return kept, stats


# ---------------------------------------------------------------------------- packing
def pack(examples: list[Example], seq_len: int, packing: bool = True) -> list[list[Example]]:
    """Rows of at most ``seq_len`` tokens: best-fit decreasing (``packing``) or one example per row.

    Deterministic: examples are placed longest first (ties in input order), each into the
    open row with the least room that fits it, else a new row.
    """
    if any(len(ids) > seq_len for ids, _ in examples):
        raise ValueError(f"an example is longer than seq_len={seq_len}; truncate or drop it first")
    if not packing:
        return [[e] for e in examples]
    rows: list[list[Example]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row) of open rows, sorted
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i)):
        n = len(examples[i][0])
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, r = room.pop(at)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(examples[i])
        if free - n > 0:
            bisect.insort(room, (free - n, r))
    return rows


def collate(rows: list[list[Example]], seq_len: int, pad_id: int, packed: bool = True, dtype: Any = None,
            mask: bool = True) -> dict:
    """A micro-batch of rows as model inputs (see the module docstring).

    Args:
        rows: each a list of ``(ids, mask)`` examples, ``seq_len`` tokens at most in total.
        seq_len: T, the row length (every batch has the same shape).
        pad_id: id of padding tokens (no loss, never attended to by real tokens).
        packed: 4-D block-diagonal additive ``attention_mask`` (B, 1, T, T); False: 2-D (B, T)
            1/0 mask, one example per row.
        dtype: float dtype of the 4-D mask; use the model's compute dtype (sdpa requires a
            float mask of the query's dtype). Default float32.
        mask: False: no 4-D mask for packed rows, the position ids (restarting at every
            example) say where documents begin (sequence parallelism: the attention keeps them
            apart from those; a ``T²`` mask would only be dropped).

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` LongTensors (B, T) and ``attention_mask``
        (not with ``mask=False``).
    """
    import torch

    B, T = len(rows), int(seq_len)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    start = np.arange(T, dtype=np.int64)[None, :].repeat(B, 0)  # first position of each token's example
    real = np.zeros((B, T), dtype=bool)
    for b, row in enumerate(rows):
        if not packed and len(row) != 1:
            raise ValueError(f"unpacked rows hold one example, row {b} holds {len(row)}")
        o = 0
        for x, m in row:
            n = len(x)
            if o + n > T:
                raise ValueError(f"row {b} holds more than seq_len={T} tokens")
            xa = np.asarray(x, dtype=np.int64)
            ids[b, o:o + n] = xa
            labels[b, o:o + n - 1] = np.where(np.asarray(m[1:], dtype=bool), xa[1:], IGNORE_INDEX)
            pos[b, o:o + n] = np.arange(n)
            start[b, o:o + n] = o
            real[b, o:o + n] = True
            o += n
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    if packed:
        if mask:
            dtype = dtype or torch.float32
            k = np.arange(T, dtype=np.int64)
            # query q sees key k iff start[q] <= k <= q: its own example, causally (a pad: itself only)
            blocked = (k[None, None, :] < start[:, :, None]) | (k[None, None, :] > k[None, :, None])  # (B, Tq, Tk)
            dense = torch.zeros(B, 1, T, T, dtype=dtype)
            out["attention_mask"] = dense.masked_fill_(torch.from_numpy(blocked)[:, None], torch.finfo(dtype).min)
        out["position_ids"] = torch.from_numpy(pos)
    else:
        out["attention_mask"] = torch.from_numpy(real.astype(np.int64))
        out["position_ids"] = torch.arange(T, dtype=torch.long)[None, :].repeat(B, 1)
    return out


# ---------------------------------------------------------------------------- loading order
class SFTLoader(ExampleLoader):
    """Endless iterator of this rank's collated micro-batches of packed rows, deterministic
    and resumable (:class:`pipeline.data.sampler.ExampleLoader` over the rows).

    Args:
        rows: packed rows (the same list on every rank).
        seq_len, pad_id, packed, dtype, mask: passed to :func:`collate`.
    """

    def __init__(self, rows: list[list[Example]], rank: int, world: int, micro_batch: int, grad_accum: int, seed: int,
                 start_step: int = 0, *, seq_len: int, pad_id: int, packed: bool = True, dtype: Any = None, mask: bool = True,
                 consumed_samples: int | None = None):
        if not rows:
            raise UserError("no training example left after tokenization (every example was dropped or bad); "
                            "check data.train, data.seq_len and data.overlong")
        super().__init__(rows, rank, world, micro_batch, grad_accum, seed, start_step, name="sft",
                         collate=partial(collate, seq_len=seq_len, pad_id=pad_id, packed=packed, dtype=dtype, mask=mask),
                         consumed_samples=consumed_samples)
        self.rows = rows


class ValBatches(FixedBatches):
    """A fixed set of validation micro-batches of packed rows, split evenly across ranks
    (:class:`pipeline.data.sampler.FixedBatches`, shuffled once with ``seed``)."""

    def __init__(self, rows: list[list[Example]], rank: int, world: int, micro_batch: int, *, seq_len: int, pad_id: int,
                 packed: bool = True, dtype: Any = None, mask: bool = True, num_batches: int = 0, seed: int = 0):
        super().__init__(rows, rank, world, micro_batch, num_batches=num_batches, seed=seed, name="sft-val",
                         collate=partial(collate, seq_len=seq_len, pad_id=pad_id, packed=packed, dtype=dtype, mask=mask))
        self.rows = rows


# ---------------------------------------------------------------------------- all together
@dataclass
class SFTData:
    """Everything the fine-tune stage needs from :func:`prepare`."""

    template: str
    end_of_turn_ids: list[int]
    train: list[Example]
    val: list[Example]
    train_rows: list[list[Example]]
    val_rows: list[list[Example]]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)


def prepare(cfg: SFTDataConfig, tokenizer: Any) -> SFTData:
    """Read, split, tokenize and pack train and validation data (``stats``: read/train/val)."""
    records, read = read_examples(cfg.train, cfg.bad_records, f"{KEY}.train")
    if cfg.val.strip():
        val_records, vread = read_examples(cfg.val, cfg.bad_records, f"{KEY}.val")
        read = {k: read[k] + vread[k] for k in read}
    else:
        records, val_records = split_val(records, cfg.val_fraction)
    template = chat.chat_template(tokenizer, cfg.template)
    train, tstats = tokenize_examples(tokenizer, records, cfg)
    val, vstats = tokenize_examples(tokenizer, val_records, cfg)
    train_rows, val_rows = pack(train, cfg.seq_len, cfg.packing), pack(val, cfg.seq_len, cfg.packing)
    tstats["rows"], vstats["rows"] = len(train_rows), len(val_rows)
    return SFTData(template, chat.end_of_turn_ids(tokenizer, template), train, val, train_rows, val_rows,
                   {"read": read, "train": tstats, "val": vstats})


# ---------------------------------------------------------------------------- inspection
_GREEN, _RESET = "\033[32m", "\033[0m"


def decoded_pieces(tokenizer: Any, ids: list[int], mask: list[bool]) -> list[tuple[str, bool]]:
    """(text, trained) of the runs of equally-masked tokens; their concatenation is the decoded example."""
    bounds = [0] + [i for i in range(1, len(ids)) if mask[i] != mask[i - 1]] + [len(ids)]
    pieces, prev = [], ""
    for lo, hi in zip(bounds, bounds[1:]):
        text = tokenizer.decode(ids[:hi], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = text[len(prev):] if text.startswith(prev) else tokenizer.decode(ids[lo:hi], skip_special_tokens=False)
        pieces.append((piece, bool(mask[lo])))
        prev = text
    return pieces


def inspect(tokenizer: Any, examples: list[Example], n: int, color: bool | None = None) -> str:
    """Human-readable view of the first ``n`` examples with the trained tokens marked.

    Trained text is wrapped in ``[[`` ``]]`` (or shown green when ``color``; default: when
    stdout is a terminal). Each example is headed by its token counts; totals over all
    ``examples`` end the text.
    """
    color = sys.stdout.isatty() if color is None else color
    open_, close = (_GREEN, _RESET) if color else ("[[", "]]")
    out = []
    for k, (ids, mask) in enumerate(examples[:max(0, n)]):
        out.append(f"--- example {k}: {len(ids)} tokens, {sum(mask)} trained ---")
        out.append("".join(f"{open_}{t}{close}" if trained else t for t, trained in decoded_pieces(tokenizer, ids, mask)))
    total, trained = sum(len(i) for i, _ in examples), sum(sum(m) for _, m in examples)
    legend = "green" if color else "double brackets"
    out.append(f"--- {len(examples)} examples, {total} tokens, {trained} trained ({trained / max(total, 1):.1%}); "
               f"trained text in {legend} ---")
    return "\n".join(out) + "\n"

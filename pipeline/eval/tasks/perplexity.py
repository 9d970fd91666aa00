"""The perplexity task: mean token loss (and exp of it) on token shards or a JSONL/CSV text file.

On the shards of the preprocess stage the windows are exactly the samples training validates
on; on a text file each document is tokenized with the model's own tokenizer. Every refusal
comes before a weight is read: the text file's records (read with their fields checked), the
split holding a window, and a model whose tokenizer (loaded alone) would read the shards' ids
differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import dist, inputs
from pipeline.errors import UserError
from pipeline.eval.metrics import perplexity
from pipeline.eval.models import Loaded, ModelRef
from pipeline.eval.ranks import my_batches, progress
from pipeline.eval.tasks.base import EvalTask, field_of, read_data
from pipeline.inputs import max_positions

MAX_DEFAULT_SEQ = 1024  # tokens: perplexity window when seq_len=0 (capped model positions)


def _is_shards(path: str) -> bool:
    return Path(path).is_dir()


@dataclass
class _State:
    """What :meth:`Perplexity.prepare` found before any weight is read."""

    seq_len: int
    shards: Any = None  # the split's TokenDataset (data is a preprocessed dataset)
    windows: int = 0  # windows of the split at seq_len
    records: list[tuple[str, str]] | None = None  # (file:line, text) of a text file


def _check_shard_tokenizer(manifest: dict, data_dir: Path, ref: ModelRef) -> None:
    """Refuse a model whose tokenizer would read the shards' token ids differently (its config
    and tokenizer files only: no weight is read)."""
    from pipeline.data.tokenizer import TRICKY_TEXTS, load_tokenizer, tokenizer_fingerprint
    from pipeline.training.hf_model import hf_tokenizer

    info = manifest["tokenizer"]
    vocab = getattr(ref.config, "vocab_size", None)
    if vocab is not None and vocab < info["vocab_size"]:
        raise UserError(f"{ref.role} '{ref.path}' has {vocab} embeddings but '{data_dir}' was tokenized with "
                        f"{info['vocab_size']} tokens; evaluate it on data preprocessed with its own tokenizer")
    mine = hf_tokenizer(inputs.check_model(ref.path, ref.role).tokenizer_dir)  # the tokenizer load() gives the model
    try:
        same = tokenizer_fingerprint(mine) == info["fingerprint"]
    except (AttributeError, ValueError):  # a slow tokenizer: compare encodings below
        same = False
    if same:
        return
    # A fine-tune may add chat tokens to the tokenizer (another fingerprint, same ids for text).
    theirs = load_tokenizer(data_dir / info.get("dir", "tokenizer")).hf
    for text in TRICKY_TEXTS:
        if theirs(text, add_special_tokens=False)["input_ids"] != mine(text, add_special_tokens=False)["input_ids"]:
            raise UserError(f"the tokenizer of {ref.role} '{ref.path}' encodes text differently from the one '{data_dir}' "
                            f"was tokenized with (e.g. {text!r}); preprocess the data with the model's tokenizer "
                            "(tokenizer.path=MODEL_DIR) or evaluate on a JSONL text file instead")


def resolve_seq_len(cfg: Any, refs: list[ModelRef]) -> int:
    """Window length: ``cfg.seq_len``, else the smallest model's positions capped at :data:`MAX_DEFAULT_SEQ`.

    Raises:
        UserError: ``cfg.seq_len`` beyond a model's positions.
    """
    limits = [(r, max_positions(r.config)) for r in refs if r.config is not None]
    if cfg.seq_len:
        for r, n in limits:
            if n and cfg.seq_len > n:
                raise UserError(f"seq_len={cfg.seq_len} is beyond the {n} positions of {r.role} '{r.path}'; lower seq_len")
        return cfg.seq_len
    return min([MAX_DEFAULT_SEQ] + [n for _, n in limits if n])


class Perplexity(EvalTask):
    """Token-weighted mean loss over windows of ``seq_len + 1`` tokens (one shared boundary token).

    Shards: windows ``[i * seq_len, (i + 1) * seq_len + 1)`` of the split's concatenated
    tokens, exactly the samples training validates on, so every token after the first is a
    target once. A text file: each document is tokenized (with the tokenizer's own special
    tokens) plus EOS and cut the same way; a document's last window may be shorter.
    """

    name = "perplexity"
    headline = ("loss", "ppl")
    counts = ("tokens",)

    def read(self, cfg: Any) -> list[tuple[str, str]] | None:
        """A text file's ``(file:line, text)`` records, every one checked; None for shards."""
        if not Path(cfg.data).exists():
            raise UserError(f"data '{cfg.data}' does not exist; give a preprocessed dataset directory or a JSONL text file")
        if _is_shards(cfg.data):
            return None
        return [(where, field_of(where, rec, cfg.text_field, "text_field"))
                for where, rec in read_data(cfg.data, "text to score (a JSONL/CSV file) or a preprocessed dataset directory")]

    def prepare(self, cfg: Any, refs: list[ModelRef], data: list[tuple[str, str]] | None) -> _State:
        seq_len = resolve_seq_len(cfg, refs)
        if data is not None:
            return _State(seq_len, records=data)
        from pipeline.data.shards import TokenDataset

        ds = TokenDataset(cfg.data, cfg.split, verify="fast")
        n = ds.num_samples(seq_len)
        if n == 0:
            raise UserError(f"split '{cfg.split}' of '{cfg.data}' has {ds.num_tokens} tokens, fewer than one window of "
                            f"seq_len+1={seq_len + 1}; lower seq_len or use another split")
        return _State(seq_len, shards=ds, windows=n)

    def check_model(self, ref: ModelRef, cfg: Any, state: _State) -> None:
        if state.shards is not None:
            _check_shard_tokenizer(state.shards.manifest, Path(cfg.data), ref)

    def split(self, cfg: Any) -> str | None:
        return cfg.split if _is_shards(cfg.data) else None

    def evaluate(self, lm: Loaded, cfg: Any, state: _State) -> tuple[dict, list[dict]]:
        import torch

        from pipeline.training.trainer import CausalLMTask

        seq_len = state.seq_len
        n, num_batches, batch, extra = (self._shards if state.shards is not None else self._text)(lm, cfg, state)
        if cfg.max_batches:
            num_batches = min(num_batches, cfg.max_batches)
        task, loss_sum, count = CausalLMTask(), 0.0, 0
        with torch.no_grad(), progress(num_batches, f"{lm.ref.name} perplexity") as bar:
            for b, real in my_batches(num_batches):
                loss, targets = task.loss(lm.model, batch(b))
                if real:
                    loss_sum += float(loss)
                    count += int(targets)
                bar.update()
        loss_sum, count = dist.all_reduce_sum_float(loss_sum), int(dist.all_reduce_sum_float(float(count)))
        mean = loss_sum / max(count, 1)
        return {"loss": mean, "ppl": perplexity(mean), "tokens": count, "windows": min(n, num_batches * cfg.batch_size),
                "batches": num_batches, "seq_len": seq_len, **extra}, []

    @staticmethod
    def _shards(lm: Loaded, cfg: Any, state: _State) -> tuple[int, int, Any, dict]:
        """``(windows, batches, batch(b) -> token tensor (B, seq_len + 1), extra metrics)``."""
        import numpy as np
        import torch

        B, ds, n, seq_len = cfg.batch_size, state.shards, state.windows, state.seq_len

        def batch(b: int) -> Any:
            return torch.from_numpy(np.stack([ds.sample(i, seq_len) for i in range(b * B, min(n, (b + 1) * B))]))

        return n, -(-n // B), batch, {}

    @staticmethod
    def _text(lm: Loaded, cfg: Any, state: _State) -> tuple[int, int, Any, dict]:
        """``(windows, batches, batch(b) -> {input_ids, attention_mask, labels} (B, T), extra metrics)``."""
        import torch

        from pipeline.training.trainer import IGNORE_INDEX

        tok, B, seq_len = lm.tokenizer, cfg.batch_size, state.seq_len
        docs, skipped = [], 0
        for _, text in state.records:
            ids = list(tok(text, verbose=False)["input_ids"])
            if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
                ids.append(tok.eos_token_id)
            if len(ids) >= 2:
                docs.append(ids)
            else:  # a lone EOS: nothing to predict
                skipped += 1
        windows = [(d, s) for d, ids in enumerate(docs) for s in range(0, len(ids) - 1, seq_len)]
        if not windows:
            raise UserError(f"no document of '{cfg.data}' has 2 tokens or more; nothing to score")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

        def batch(b: int) -> dict:
            rows = [docs[d][s:s + seq_len + 1] for d, s in windows[b * B:(b + 1) * B]]
            T = max(len(r) for r in rows) - 1
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for i, r in enumerate(rows):  # right padding: causal attention never looks at it
                ids[i, :len(r) - 1] = torch.tensor(r[:-1])
                labels[i, :len(r) - 1] = torch.tensor(r[1:])
                mask[i, :len(r) - 1] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        return len(windows), -(-len(windows) // B), batch, {"documents": len(docs), "skipped_documents": skipped}

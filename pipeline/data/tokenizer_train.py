"""Training a SentencePiece tokenizer saved as a Hugging Face directory (see :mod:`pipeline.data.tokenizer`).

Split from :mod:`pipeline.data.tokenizer`, which re-exports :func:`train_sentencepiece`;
:func:`train_on_sources` is the preprocess stage's sampling of its corpora for it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.tokenizer_files import BOS, EOS, PAD, SP_MODEL_FILE, UNK
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, publish_dir

if TYPE_CHECKING:
    from pipeline.data.clean import CleanConfig
    from pipeline.data.tokenizer import TokenizerConfig

log = logging.getLogger(__name__)

_SP_SEED = 1234  # SentencePiece's global random seed (only used for sampling; set for safety)

# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _bounded_sample(texts: Iterable[str], sample_chars: int, piece_chars: int) -> list[str]:
    """The first ``sample_chars`` characters of ``texts``, cut into pieces of <= ``piece_chars``."""
    out: list[str] = []
    left = sample_chars
    for text in texts:
        for start in range(0, len(text), piece_chars):
            piece = text[start:start + min(piece_chars, left)]
            if piece:
                out.append(piece)
                left -= len(piece)
            if left <= 0:
                return out
    return out


def train_on_sources(sources: list, clean: CleanConfig, bad_records: str, cfg: TokenizerConfig, dest: Path,
                     threads: int) -> None:
    """Train SentencePiece on the first ``cfg.sample_chars`` cleaned, de-duplicated characters.

    Each source contributes a share of the budget proportional to its weight, taken from
    its beginning (cheap and deterministic; shuffle the inputs if their start is atypical).

    Args:
        sources: ``(SourceConfig, name, files)`` of each source, as the preprocess stage resolves them.
        clean: the stage's cleaning settings; ``bad_records``: its ``fail``/``skip`` choice.
    """
    # imported here: every stage imports this module (through pipeline.data.tokenizer), only
    # preprocessing reads corpora
    from pipeline.data.clean import Cleaner, content_hash
    from pipeline.data.sources import iter_records

    total_w = sum(s.weight for s, _, _ in sources)
    cleaner = Cleaner(clean, {})

    def texts():
        seen: set[bytes] = set()
        for src, _, files in sources:
            budget = cfg.sample_chars * src.weight / total_w
            for text, _, _ in iter_records(files, src, bad_records=bad_records, stats={}):
                text = cleaner(text)
                if text is None:
                    continue
                digest = content_hash(text)
                if digest in seen:
                    continue
                seen.add(digest)
                yield text
                budget -= len(text)
                if budget <= 0:
                    break

    train_sentencepiece(texts(), cfg, dest, threads)


def train_sentencepiece(texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path, threads: int) -> None:
    """Train a SentencePiece tokenizer and save it as a Hugging Face tokenizer directory.

    Llama-style settings (byte fallback, identity normalization, dummy prefix, digits split, ids
    ``<unk>=0 <s>=1 </s>=2 <pad>=3``) so that the Hugging Face conversion is exact. The directory
    gets ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos/pad/unk set,
    ``add_bos_token``/``add_eos_token`` false, no chat template); it is written under a temporary
    name and renamed into place.

    The model is a deterministic function of (the sample, ``cfg``, ``threads``): two runs give the
    same bytes. Unigram training sums in per-thread order, so its pieces depend on ``threads``:
    pass a value from the config, not ``os.cpu_count()``, if retraining must be reproducible on
    other machines.

    Args:
        texts: cleaned documents; only the first ``cfg.sample_chars`` characters are read (the
            caller makes them representative, e.g. by striding over the corpus).
        cfg: tokenizer settings (``cfg.path`` is ignored).
        out_dir: directory to create (replaced if it exists).
        threads: SentencePiece training threads.

    Raises:
        UserError: empty sample, or a vocabulary too large for the sample / too small for its
            characters.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    sample = _bounded_sample(texts, cfg.sample_chars, cfg.max_sentence_chars)
    if not sample:
        raise UserError("tokenizer training: the corpus sample is empty (no non-empty text after cleaning); "
                        "check the input data and cleaning settings, or set tokenizer.path to an existing "
                        "Hugging Face tokenizer directory")
    n_chars = sum(map(len, sample))
    log.info("training %s SentencePiece tokenizer: vocab_size=%d, sample %d characters in %d pieces, %d threads",
             cfg.model_type, cfg.vocab_size, n_chars, len(sample), threads)

    model = io.BytesIO()
    spm.set_random_generator_seed(_SP_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model,
            model_type=cfg.model_type, vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            max_sentence_length=4 * cfg.max_sentence_chars,  # bytes: a character is <= 4 UTF-8 bytes
            input_sentence_size=0, shuffle_input_sentence=False,  # use the whole (already bounded) sample
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            num_threads=max(1, int(threads)), minloglevel=4,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg:
            hint = re.search(r"<= *(\d+)", msg)
            most = f" (SentencePiece says at most {hint.group(1)} for this sample)" if hint else ""
            raise UserError(
                f"tokenizer training failed: corpus sample too small for vocab_size={cfg.vocab_size}{most}; "
                f"the sample had {n_chars} characters. Lower tokenizer.vocab_size or raise "
                "tokenizer.sample_chars (or provide more data)") from None
        if "required_chars" in msg or "smaller than" in msg:
            detail = msg.rsplit("] ", 1)[-1].strip()  # drop SentencePiece's source location and assertion
            raise UserError(
                f"tokenizer training failed: vocab_size={cfg.vocab_size} is too small for the characters of the "
                f"sample (SentencePiece: {detail}). Raise tokenizer.vocab_size or lower "
                "tokenizer.character_coverage") from None
        raise

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_hf_dir(model.getvalue(), tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved tokenizer to %s", out_dir)


def _write_hf_dir(model_bytes: bytes, directory: Path) -> None:
    """Write ``tokenizer.model`` and its exact Hugging Face fast conversion into ``directory``."""
    from transformers import PreTrainedTokenizerFast

    atomic_write_bytes(directory / SP_MODEL_FILE, model_bytes)
    # The generic fast class converts tokenizer.model following its normalizer spec (exact for bpe
    # and unigram); legacy=True: every text chunk between added tokens gets the dummy prefix, as
    # SentencePiece does for each text. LlamaTokenizer is not exact (see module docstring).
    hf = PreTrainedTokenizerFast.from_pretrained(
        str(directory), local_files_only=True, legacy=True,
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        add_bos_token=False, add_eos_token=False)
    hf.save_pretrained(str(directory))
    # save_pretrained records load-time arguments; keep a clean, portable config
    cfg_path = directory / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path", "vocab_file", "chat_template"):
        config.pop(key, None)
    if config.get("extra_special_tokens") and set(map(str, config["extra_special_tokens"])) <= {UNK, BOS, EOS, PAD}:
        config.pop("extra_special_tokens")
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
                  unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    atomic_write_json(cfg_path, config)
    if not (directory / SP_MODEL_FILE).is_file():  # save_pretrained must not have removed it
        atomic_write_bytes(directory / SP_MODEL_FILE, model_bytes)

"""Task ``sft``: chat and instruction tuning of a causal LM.

Conversations are rendered with the chat template; the loss covers assistant tokens (and
the end-of-turn token closing each reply) only; examples are packed into rows with a
block-diagonal attention mask (:mod:`pipeline.data.sft`). The template used is put into
the tokenizer, so every checkpoint and the export render prompts exactly as training did.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.sft import SFTDataConfig, SFTLoader, ValBatches, prepare
from pipeline.data.sft import inspect as render
from pipeline.precision import torch_dtype
from pipeline.training.tasks.base import FinetuneTask, pad_id
from pipeline.training.trainer import CausalLMTask, Task, evaluate_lm


class SFTTask(FinetuneTask):
    """Supervised fine-tuning on conversations: next-token loss on the assistant's tokens."""

    name = "sft"
    section = "sft"
    config_class = SFTDataConfig
    head = "causal_lm"
    data_what = "a JSONL file of chat examples (messages, or prompt/response)"
    seq_len_field = "seq_len"
    sequence_parallel = True  # a sum over target tokens: each rank's slice adds its part

    def check(self) -> list[tuple[str, str]]:
        p = super().check()
        sp = self.cfg.parallel.sequence_parallel_size
        attn = self.cfg.model.attn_implementation
        if self.data_cfg.packing and sp > 1 and attn != "sdpa" and not attn.startswith("flash_attention"):
            # DeepSpeed's Ulysses wrapper drops dense masks and rebuilds flex block masks as plain
            # causal ones: packed documents would attend to each other. sdpa runs per document
            # (sequence_parallel.document_attention); flash attention separates them by the
            # position ids, which restart at every document and survive the all-to-all.
            p.append(("sft.packing", f"packed rows under parallel.sequence_parallel_size={sp} need "
                      "model.attn_implementation=sdpa or flash_attention_2 to keep documents apart; with "
                      f"{attn} set sft.packing=false (each example its own row) or sequence_parallel_size=1"))
        elif self.data_cfg.packing and sp == 1 and attn not in ("sdpa", "eager"):
            p.append(("model.attn_implementation", "packing needs sdpa or eager (its block-diagonal mask is 4-D); or set sft.packing=false"))
        return p

    @property
    def packed(self) -> bool:
        """Rows hold several examples (sft.packing): attention must keep them apart."""
        return self.data_cfg.packing

    def prepare(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.data = prepare(self.data_cfg, tokenizer)

    def describe(self) -> str:
        s = self.data.stats
        return f"sft: {s['train']['examples']} train / {s['val']['examples']} val examples in {s['train']['rows']} rows"

    def inspect(self, tokenizer: Any, n: int) -> list[str]:
        return [render(tokenizer, self.data.train, n)]

    def meta(self) -> dict[str, Any]:
        # the end-of-turn ids: the export makes them the generation stop tokens
        return {"task": self.name, "eos_token_ids": self.data.end_of_turn_ids, "data": self.data.stats}

    def configure(self, conf: Any, tokenizer: Any) -> None:
        tokenizer.chat_template = self.data.template  # saved with every checkpoint and the export
        m = self.cfg.model
        if m.tiled_logits:  # the head and the loss over tiles (pipeline/training/tiling.py)
            from pipeline.training.tiling import logits_tile_tokens

            self.logits_tile = logits_tile_tokens(conf.get_text_config().vocab_size, m.tile_tokens)

    def loaders(self, run: Any, start_step: int) -> tuple[Any, Any | None]:
        t = self.cfg.train
        # the 4-D packing mask in the model's compute dtype (bf16 on GPUs: half the memory of fp32)
        dtype = torch_dtype(run.precision)
        # under sequence parallelism no 4-D mask: the attention finds the documents from the position ids
        kw = {"seq_len": self.seq_len, "pad_id": pad_id(self.tokenizer), "packed": self.data_cfg.packing, "dtype": dtype,
              "mask": run.sp == 1}
        # data-parallel groups: the members of a sequence-parallel group read the same rows (Run.shard slices them)
        train = SFTLoader(self.data.train_rows, run.dp_rank, run.dp_world, run.micro, run.accum, t.seed, start_step,
                          consumed_samples=run.consumed_samples, **kw)
        val = (ValBatches(self.data.val_rows, run.dp_rank, run.dp_world, run.micro, num_batches=t.eval_batches, **kw)
               if self.data.val_rows else None)
        return run.shard(train), (run.shard(val) if val is not None else None)

    def loss(self) -> Task:
        return CausalLMTask(getattr(self, "logits_tile", 0))

    def evaluate(self, engine: Any, batches: Any) -> dict[str, float]:
        """Mean loss and perplexity over the trained (assistant) tokens."""
        return evaluate_lm(engine, self.loss(), batches)

"""The generation task: decode each chat prompt and compare the answer with its reference.

Data: JSONL of ``{"messages": [...]}`` (the final assistant message is the reference) or
``{"prompt", "response"}`` records. Prompts are rendered with the tokenizer's chat template
(or the built-in one), left-padded, and decoded greedily or by sampling with a seed per batch
(results do not depend on the number of ranks). Metrics: exact match and containment
(:mod:`pipeline.eval.metrics`); one row per model and example goes to ``generations.jsonl``.
"""

from __future__ import annotations

from typing import Any

from pipeline import dist
from pipeline.errors import UserError
from pipeline.eval.metrics import contains, exact_match, generation_scores
from pipeline.eval.models import Loaded
from pipeline.eval.ranks import gather, my_batches, progress
from pipeline.eval.tasks.base import EvalTask, no_examples, read_data
from pipeline.inputs import max_positions

Example = tuple[str, list, str]  # (where, prompt messages, reference)


def read_generation(cfg: Any) -> list[Example]:
    """``(where, prompt messages, reference)``: the reference is the final assistant message."""
    from pipeline.data import chat

    out = []
    for where, rec in read_data(cfg.data, "prompts with references (JSONL)"):
        given = rec.get("messages")
        last = given[-1] if isinstance(given, list) and given else None
        messages = [] if isinstance(last, dict) and last.get("role") != "assistant" else list(chat.normalize_example(rec, where))
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise UserError(f"{where} has no reference: give a \"response\" (with \"prompt\") or end \"messages\" with the "
                            "expected assistant message, after at least one message to answer")
        out.append((where, messages[:-1], str(messages[-1].get("content", ""))))
        if cfg.max_batches and len(out) >= cfg.max_batches:
            break
    if not out:
        raise no_examples(cfg)
    return out


class Generation(EvalTask):
    """Generated answers against references: exact match, containment, new tokens."""

    name = "generation"
    headline = ("exact_match", "contains")
    counts = ("examples", "mean_new_tokens")
    rows_file = "generations.jsonl"

    def read(self, cfg: Any) -> list[Example]:
        return read_generation(cfg)

    def evaluate(self, lm: Loaded, cfg: Any, examples: list[Example]) -> tuple[dict, list[dict]]:
        import torch
        from transformers import GenerationConfig

        from pipeline.data import chat

        tok, model = lm.tokenizer, lm.model
        template = chat.chat_template(tok, cfg.template)
        prompts = [list(chat.render_prompt(tok, msgs, template)) for _, msgs, _ in examples]
        stops = sorted({i for i in [tok.eos_token_id, *chat.end_of_turn_ids(tok, template)] if i is not None})
        positions = max_positions(model.config)
        limit = positions - cfg.max_new_tokens if positions else None
        if limit is not None and limit < 1:
            raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the {positions} positions of "
                            f"{lm.ref.role} '{lm.ref.path}'; lower max_new_tokens")
        truncated = sum(limit is not None and len(p) > limit for p in prompts)
        prompts = [p[-limit:] if limit is not None else p for p in prompts]  # keep the end: the turn to answer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
        # top_k=0: nucleus sampling only (GenerationConfig would otherwise also keep only the top 50).
        sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.do_sample else {}
        gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, eos_token_id=stops or None,
                                   pad_token_id=pad, use_cache=True, **sampling)
        world = dist.world_size()
        B, nb, local = cfg.batch_size, -(-len(prompts) // cfg.batch_size), []
        with torch.no_grad(), progress(nb, f"{lm.ref.name} generation") as bar:
            for b, real in my_batches(nb):
                part = prompts[b * B:(b + 1) * B]
                T = max(len(p) for p in part)
                ids = torch.full((len(part), T), pad, dtype=torch.long)
                mask = torch.zeros((len(part), T), dtype=torch.long)
                for i, p in enumerate(part):  # left padding: every prompt ends where generation starts
                    ids[i, T - len(p):] = torch.tensor(p)
                    mask[i, T - len(p):] = 1
                torch.manual_seed(cfg.seed + b)
                out = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), generation_config=gen_cfg,
                                     synced_gpus=cfg.zero3 and world > 1)
                if real:
                    for i, row in enumerate(out[:, T:].tolist()):
                        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                        local.append((b * B + i, tok.decode(row[:cut], skip_special_tokens=True), cut))
                bar.update()
        gens = sorted(gather(local))
        rows = [{"index": i, "model": lm.ref.name, "prompt": tok.decode(prompts[i]), "reference": examples[i][2],
                 "generation": g, "exact": exact_match(g, examples[i][2]), "contains": contains(g, examples[i][2]),
                 "new_tokens": n} for i, g, n in gens]
        metrics = generation_scores([r["generation"] for r in rows], [r["reference"] for r in rows])
        metrics.update(mean_new_tokens=sum(r["new_tokens"] for r in rows) / max(len(rows), 1), truncated_prompts=truncated)
        return metrics, rows

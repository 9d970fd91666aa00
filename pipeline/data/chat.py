"""Chat templates: the text a conversation becomes, for fine-tuning and for generation prompts.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``
(at most one system message, first). It is rendered to text by a Jinja *chat template*, the
way ``tokenizer.apply_chat_template`` does, and the text is tokenized with
``tokenizer(text, add_special_tokens=False)``: fine-tuning (:mod:`pipeline.data.sft`) and the
evaluate stage's generation prompts (:func:`render_prompt`) see exactly the same token ids
for the same messages.

Which template (``template`` setting, :func:`chat_template`):

* ``auto``: the tokenizer's own ``chat_template`` when it has one, else the builtin one;
* ``tokenizer``: the tokenizer's own (an error if it has none);
* ``builtin``: :data:`BUILTIN_TEMPLATE`, below.

The builtin template. The pipeline's trained tokenizers hold only ``<unk> <s> </s> <pad>``,
so the turn markers are plain text (several ordinary tokens each; no new embedding rows are
needed); the only special tokens are the tokenizer's BOS at the start and its EOS closing
every assistant turn::

    {bos_token}<|system|>
    {system content}
    <|user|>
    {user content}
    <|assistant|>
    {assistant content}{eos_token}
    <|user|>
    ...

and the generation prompt is ``<|assistant|>\\n``: the model writes the reply and ends it
with EOS, which is the stop token (:func:`end_of_turn_ids`). The ``\\n`` after EOS only
separates turns in the text; it is not trained.

End of turn (:func:`end_of_turn_ids`): the token that closes an assistant turn is found by
rendering a probe conversation and reading the first token after the assistant's text when
it is a single added/special token (EOS for the builtin template, ``<|im_end|>`` for ChatML,
``<|eot_id|>`` for Llama 3); the tokenizer's EOS follows as a second stop token. Fine-tuning
trains that token at the end of every assistant turn, and generation stops on it.
"""

from __future__ import annotations

from typing import Any, Literal

from pipeline.errors import UserError

ROLES = ("system", "user", "assistant")

BUILTIN_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
"""The template used when the tokenizer has none (see the module docstring)."""

# Probe conversation used to find the end-of-turn token; the reply is unlikely to be trimmed
# or otherwise rewritten by a template.
_PROBE_REPLY = "PROBE-REPLY-7f3a"
_PROBE = [{"role": "user", "content": "probe question"}, {"role": "assistant", "content": _PROBE_REPLY}]


def _own_template(tokenizer: Any) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def chat_template(tokenizer: Any, choice: Literal["auto", "builtin", "tokenizer"] = "auto") -> str:
    """The Jinja chat template to use.

    Args:
        tokenizer: a Hugging Face tokenizer.
        choice: ``auto`` (the tokenizer's own if it has one, else builtin), ``builtin`` or
            ``tokenizer``.

    Raises:
        UserError: ``tokenizer`` chosen but the tokenizer has no chat template; ``builtin``
            with a tokenizer without an EOS token.
    """
    own = _own_template(tokenizer)
    if choice == "tokenizer":
        if own is None:
            raise UserError(f"template=tokenizer, but the tokenizer at '{getattr(tokenizer, 'name_or_path', '?')}' has "
                            f"no chat template (no chat_template in tokenizer_config.json nor chat_template.jinja); "
                            f"use template=builtin (or auto), or add a chat template to the tokenizer directory")
        return own
    if choice == "auto" and own is not None:
        return own
    if choice not in ("auto", "builtin"):
        raise ValueError(f"unknown template choice {choice!r}")
    if not getattr(tokenizer, "eos_token", None):
        raise UserError(f"the builtin chat template ends assistant turns with the EOS token, but the tokenizer at "
                        f"'{getattr(tokenizer, 'name_or_path', '?')}' has none; set eos_token in its "
                        f"tokenizer_config.json, or use a tokenizer with its own chat template (template=tokenizer)")
    return BUILTIN_TEMPLATE


def render(tokenizer: Any, conversations: list[list[dict]], template: str, add_generation_prompt: bool = False) -> list[str]:
    """Texts of several conversations, as ``apply_chat_template(..., tokenize=False)`` gives them.

    Raises:
        jinja2 errors: the template rejected a conversation (e.g. roles that do not alternate).
    """
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
    return list(out)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text: ``tokenizer(text, add_special_tokens=False)`` (what training sees)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer: Any, messages: list[dict], template: str) -> list[int]:
    """Token ids of a generation prompt: every message, then the template's generation prompt.

    Tokenized exactly as fine-tuning tokenizes a rendered conversation.
    """
    try:
        text = render(tokenizer, [messages], template, add_generation_prompt=True)[0]
    except Exception as e:  # jinja's TemplateError, or a template's raise_exception
        raise UserError(f"the chat template rejected the prompt conversation ({type(e).__name__}: {e}); "
                        f"fix the messages (roles system/user/assistant, system first, usually alternating)") from e
    return encode_text(tokenizer, text)


def _added_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end an assistant turn, the main one first (generation stop tokens).

    The main one is the first token after the assistant's text in a rendered probe
    conversation when that is an added/special token (``</s>`` for the builtin template,
    ``<|im_end|>`` for ChatML); the tokenizer's EOS follows when it differs. A template that
    writes no such token gives ``[eos]`` (or ``[]`` without an EOS).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    try:
        text = render(tokenizer, [_PROBE], template)[0]
    except Exception:  # a template that refuses the probe: fall back on EOS
        text = ""
    at = text.rfind(_PROBE_REPLY)
    if at >= 0:
        tail = text[at + len(_PROBE_REPLY):].lstrip()
        if tail:
            ids = encode_text(tokenizer, tail)
            if ids and ids[0] in _added_ids(tokenizer):
                out.append(int(ids[0]))
    if eos is not None and int(eos) not in out:
        out.append(int(eos))
    return out


def end_of_turn_text(tokenizer: Any, template: str) -> str:
    """The text of the main end-of-turn token (``"</s>"``, ``"<|im_end|>"``), "" if there is none."""
    ids = end_of_turn_ids(tokenizer, template)
    return str(tokenizer.convert_ids_to_tokens(ids[0])) if ids else ""


# ---------------------------------------------------------------------------- examples
_SHAPE = ('expected {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} (an optional '
          'system message first, then a user message, at least one assistant message), or '
          '{"prompt": "...", "response": "...", "system": "..." (optional)}')


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def normalize_example(obj: Any, where: str) -> list[dict]:
    """A JSON record as a list of ``{"role", "content"}`` messages.

    Accepted shapes: ``{"messages": [{"role", "content"}, ...]}`` (roles system/user/
    assistant, a user message first (after an optional system message), at least one
    assistant message, a system message only first; other keys of
    the record and of the messages are ignored) and ``{"prompt", "response"}`` with an
    optional ``"system"`` (all strings).

    Args:
        obj: the parsed JSON value.
        where: ``"file:line"``, named in the error.

    Raises:
        UserError: ``"{where}: <what is wrong>; expected <shapes>"``.
    """
    def bad(problem: str) -> UserError:
        return UserError(f"{where}: {problem}; {_SHAPE}")

    if type(obj) is not dict:
        raise bad(f"record is {_kind(obj)}, not a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if type(msgs) is not list or not msgs:
            raise bad(f"'messages' is {'an empty array' if msgs == [] else _kind(msgs)}")
        out = []
        for i, m in enumerate(msgs):
            if type(m) is not dict:
                raise bad(f"messages[{i}] is {_kind(m)}, not an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise bad(f"messages[{i}] has role {role!r}, not one of system/user/assistant")
            if type(content) is not str:
                raise bad(f"messages[{i}] ({role}) has 'content' {_kind(content)}, not a string")
            if role == "system" and i > 0:
                raise bad(f"messages[{i}] is a system message; only the first message may be one")
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise bad("no assistant message (nothing to train on)")
        first = 1 if out[0]["role"] == "system" else 0
        if out[first]["role"] != "user":
            raise bad(f"messages[{first}] is an assistant message; the conversation must start with a user "
                      f"message (after an optional system message)")
        return out
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if type(obj.get(key)) is not str:
                raise bad(f"'{key}' is {'missing' if key not in obj else _kind(obj[key])}, not a string")
        out = []
        if obj.get("system") is not None:
            if type(obj["system"]) is not str:
                raise bad(f"'system' is {_kind(obj['system'])}, not a string")
            out.append({"role": "system", "content": obj["system"]})
        return out + [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    keys = ", ".join(list(obj)[:20]) or "none"
    raise bad(f"neither 'messages' nor 'prompt'/'response' (keys: {keys})")

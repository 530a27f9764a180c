"""Render one example to token ids and a loss mask, by token position rather than template markers.

An example is either chat (``messages``: a list of ``{"role", "content"}``, loss on every assistant
turn) or ``prompt`` + ``completion`` (loss on the completion). Chat examples, and prompt/completion
examples when the tokenizer has a chat template, are rendered with the tokenizer's chat template;
the character span of each assistant turn is found by rendering the conversation up to that turn,
and a token is trained on when it overlaps such a span. This works for templates without
``{% generation %}`` markers (SmolLM2, Qwen, Llama 3) and trains on the end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from .errors import PearError

PROBE = "\u2063pear-probe\u2063"  # content no template rewrites, to find where a turn's content starts


def example_id(example: dict[str, Any]) -> str:
    """Return the example's ``id``, or a stable hash of its content when it has none."""
    if example.get("id") is not None:
        return str(example["id"])
    content = {k: example.get(k) for k in ("messages", "prompt", "completion")}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def to_messages(example: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """Return the example as chat messages, or None for a prompt/completion example.

    Raises:
        PearError: if the example has neither ``messages`` nor ``prompt`` + ``completion``.
    """
    both = [k for k in ("prompt", "completion") if example.get(k) is not None]
    if example.get("messages") is not None and both:
        raise PearError(
            f"{where}: has both `messages` and {' and '.join(f'`{k}`' for k in both)}; an example is one or the "
            "other: keep one form per row"
        )
    if example.get("messages") is not None:
        messages = example["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PearError(f"{where}: `messages` must be a list of {{'role': str, 'content': str}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise PearError(f"{where}: `messages` has no assistant turn to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(example.get("prompt"), str) and isinstance(example.get("completion"), str):
        return None
    wrong = [
        f"`{k}` is {type(example[k]).__name__}"
        for k in ("prompt", "completion")
        if example.get(k) is not None and not isinstance(example[k], str)
    ]
    if wrong:
        raise PearError(f"{where}: `prompt` and `completion` must be strings, but {' and '.join(wrong)}")
    present = sorted(k for k, v in example.items() if v is not None)
    raise PearError(f"{where}: needs `messages` (chat) or `prompt` + `completion` (strings); found fields {present}")


def _assistant_spans(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str):
    """Return the rendered text and the character span of each assistant turn in it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else _opening(tokenizer, where)
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise PearError(
                f"{where}: the chat template renders turn {i} differently once later turns follow, so the "
                "loss mask cannot be found by position; give this example as `prompt` + `completion` instead"
            )
        # The span ends at the end-of-turn token; the template's trailing newline is not a response token.
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def _opening(tokenizer: PreTrainedTokenizerBase, where: str) -> str:
    """What the template writes before the content of a conversation's first turn when that turn is the
    assistant's (its role header, and any default system prompt): not response tokens."""
    probe = tokenizer.apply_chat_template([{"role": "assistant", "content": PROBE}], tokenize=False)
    if PROBE not in probe:
        raise PearError(
            f"{where}: the conversation starts with an assistant turn and the chat template does not show where "
            "its content starts; begin the conversation with a user (or system) turn"
        )
    return probe[: probe.index(PROBE)]


def tokenize_example(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int, where: str
) -> dict[str, Any]:
    """Tokenise one example.

    Args:
        example: a row with ``messages`` or ``prompt`` + ``completion``.
        tokenizer: a fast tokenizer (it must return offsets).
        max_length: keep at most this many tokens, cutting from the end.
        where: names the example in error messages, e.g. ``"data/train.jsonl row 3 (id a1)"``.

    Returns:
        ``input_ids`` and ``loss_mask`` (lists of equal length), ``num_loss_tokens``, ``prompt_length``
        (tokens before the last assistant turn, what a model is given to generate it), ``truncated``, and
        ``untrainable_first`` (the example began with a response token, which is left out of the loss).
    """
    messages = to_messages(example, where)
    if messages is None and tokenizer.chat_template is not None:
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
    if messages is not None:
        if tokenizer.chat_template is None:
            raise PearError(
                f"{where}: chat `messages` need a tokenizer with a chat template, and {tokenizer.name_or_path!r} "
                "has none; give `prompt` + `completion` or set `chat_template` in its tokenizer_config.json"
            )
        text, spans = _assistant_spans(messages, tokenizer, where)
        add_special_tokens = False  # chat templates write their own BOS
    else:
        eos = tokenizer.eos_token or ""
        text = example["prompt"] + example["completion"] + eos
        spans = [(len(example["prompt"]), len(text))]
        add_special_tokens = True
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    loss_mask = [any(s < end and start < e for s, e in spans) for start, end in encoding["offset_mapping"]]
    # The first token has no context to be predicted from (no prompt, no BOS): it cannot be trained on.
    untrainable_first = bool(loss_mask) and loss_mask[0]
    loss_mask[:1] = [False] * len(loss_mask[:1])
    prompt_length = next(i for i in range(len(input_ids)) if encoding["offset_mapping"][i][1] > spans[-1][0])
    return {
        "input_ids": input_ids[:max_length],
        "loss_mask": loss_mask[:max_length],
        "num_loss_tokens": sum(loss_mask[:max_length]),
        "prompt_length": prompt_length,
        "truncated": len(input_ids) > max_length,
        "untrainable_first": untrainable_first,
    }

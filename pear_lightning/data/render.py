"""Render one example to token ids and a loss mask, by token position rather than template markers.

An example is either chat (``messages``: a list of ``{"role", "content"}``, loss on every assistant
turn) or ``prompt`` + ``completion`` (loss on the completion). Chat examples, and prompt/completion
examples when the tokenizer has a chat template, are rendered with the tokenizer's chat template;
the character span of each assistant turn is found by rendering the conversation up to that turn,
and a token is trained on when it overlaps such a span. This works for templates without
``{% generation %}`` markers (SmolLM2, Qwen, Llama 3) and trains on the end-of-turn token.

An example that comes with its generator's response ``token_ids`` is trained on exactly those ids after
its prompt rendered with the generation prompt (what the generator was given): re-tokenising sampled text
can give other ids than were sampled (merges across boundaries, normalisation, special tokens).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pear_lightning.errors import LOAD_ERRORS, PearError, load_error, refuse_missing

PROBE = "\u2063pear-probe\u2063"  # content no template rewrites, to find where a turn's content starts


def example_id(example: dict[str, Any]) -> str:
    """Return the example's ``id``, or a stable hash of its content when it has none."""
    if example.get("id") is not None:
        return str(example["id"])
    content = {k: example.get(k) for k in ("messages", "prompt", "completion")}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def chat_messages(example: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """The example's ``messages``, checked, or None when it has none.

    Raises:
        PearError: if ``messages`` is not a list of ``{"role": str, "content": str}``.
    """
    messages = example.get("messages")
    if messages is None:
        return None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise PearError(f"{where}: `messages` must be a list of {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_messages(example: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """Return the example as chat messages, or None for a prompt/completion example.

    Raises:
        PearError: if the example has neither ``messages`` nor ``prompt`` + ``completion``.
    """
    messages = chat_messages(example, where)
    both = [k for k in ("prompt", "completion") if example.get(k) is not None]
    if messages is not None and both:
        raise PearError(
            f"{where}: has both `messages` and {' and '.join(f'`{k}`' for k in both)}; an example is one or the "
            "other: keep one form per row"
        )
    if messages is not None:
        if not any(m["role"] == "assistant" for m in messages):
            raise PearError(f"{where}: `messages` has no assistant turn to train on, and no generator `token_ids`")
        return messages
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
    raise PearError(
        f"{where}: needs `messages` (chat) or `prompt` + `completion` (strings), or a prompt with its generator's "
        f"`token_ids`; found fields {present}"
    )


def request(example: dict[str, Any], where: str) -> list[dict[str, str]] | str:
    """What a generator answers for ``example``: its ``messages`` without trailing assistant turns, or its ``prompt``.

    Raises:
        PearError: if the example has no prompt.
    """
    messages = chat_messages(example, where)
    if messages is None:
        if isinstance(example.get("prompt"), str):
            return example["prompt"]
        present = sorted(k for k, v in example.items() if v is not None)
        raise PearError(f"{where}: needs a `prompt` (string) or chat `messages` to answer; found fields {present}")
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise PearError(f"{where}: `messages` holds only assistant turns, so there is no prompt to answer")
    return messages


def prompt_ids(prompt: list[dict[str, str]] | str, tokenizer: PreTrainedTokenizerBase, where: str) -> list[int]:
    """The token ids a generator is given: the prompt rendered by the chat template with its generation prompt (a
    plain prompt is one user turn); without a chat template, a plain prompt with the tokenizer's special tokens.

    Raises:
        PearError: if chat messages meet a tokenizer without a chat template.
    """
    if isinstance(prompt, str) and tokenizer.chat_template is None:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    _check_template(tokenizer, where)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TurnEnd:
    """What closes a response: ``trained``, the end-of-turn tokens (``<|im_end|>``; EOS without a chat template), and
    ``untrained``, what the rendering writes after them (the template's newline); ``special``: the tokenizer's special
    token ids, among which a sampler's stop tokens are."""

    trained: tuple[int, ...]
    untrained: tuple[int, ...]
    special: frozenset[int]


@lru_cache(maxsize=16)
def turn_end(tokenizer: PreTrainedTokenizerBase) -> TurnEnd:
    """How the tokenizer's rendering closes an assistant turn, read from a one-turn conversation; EOS alone when the
    template does not write an assistant's content verbatim."""
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    special = frozenset(tokenizer.all_special_ids)
    if tokenizer.chat_template is None:
        return TurnEnd(eos, (), special)
    user = [{"role": "user", "content": "x"}]
    before = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "y"}], tokenize=False)
    if not through.startswith(before + "y"):
        return TurnEnd(eos, (), special)
    end = through[len(before) + 1 :]
    trained = end.rstrip()  # as for text: the template's trailing newline is not a response token
    ids = tokenizer([trained, end[len(trained) :]], add_special_tokens=False)["input_ids"]
    return TurnEnd(tuple(ids[0]), tuple(ids[1]), special)


def _check_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    if tokenizer.chat_template is None:
        raise PearError(
            f"{where}: chat `messages` need a tokenizer with a chat template, and {tokenizer.name_or_path!r} "
            "has none; give `prompt` + `completion` or set `chat_template` in its tokenizer_config.json"
        )


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
    example: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    where: str,
    response_ids: list[int] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """Tokenise one example: its text, or its prompt followed by its generator's response ids.

    With ``response_ids``, the example is trained on exactly those ids after its prompt (see ``request``; an example
    with several assistant turns is the exception: its text is rendered, and the ids must equal all its response
    tokens). The end-of-turn token is added only when ``finish_reason`` is ``"stop"`` and the ids end with no special
    token (the sampler stopped on a stop token the ids leave out); the template's text after it (a newline) follows a
    closed turn, untrained.

    Args:
        example: a row with ``messages`` or ``prompt`` (+ ``completion``).
        tokenizer: a fast tokenizer (it must return offsets).
        max_length: keep at most this many tokens, cutting from the end.
        where: names the example in error messages, e.g. ``"data/train.jsonl row 3 (id a1)"``.
        response_ids: the generator's response token ids, if the example has them.
        finish_reason: why the generator stopped: ``"stop"`` (an end-of-sequence token) or ``"length"``.

    Returns:
        ``input_ids`` and ``loss_mask`` (lists of equal length), ``num_loss_tokens``, ``prompt_length``
        (tokens before the last assistant turn, what a model is given to generate it), ``truncated``,
        ``untrainable_first`` (the example began with a response token, which is left out of the loss), and how the
        response was made: ``generated`` (from ``response_ids``), ``end_of_turn_added``, ``unfinished`` (generated
        ids that do not close the turn, trained as they are).
    """
    messages = chat_messages(example, where)
    several = messages is not None and sum(m["role"] == "assistant" for m in messages) > 1
    if response_ids is not None and not (several and messages[-1]["role"] == "assistant"):
        prompt = prompt_ids(request(example, where), tokenizer, where)
        end = turn_end(tokenizer)
        response = list(response_ids)
        closed = bool(end.trained) and tuple(response[-len(end.trained) :]) == end.trained
        stopped = bool(response) and response[-1] in end.special  # on another stop token, e.g. <|endoftext|>
        added = not closed and not stopped and bool(end.trained) and finish_reason == "stop"
        response += end.trained if added else ()
        after = list(end.untrained) if closed or added else []
        input_ids = prompt + response + after
        loss_mask = [False] * len(prompt) + [True] * len(response) + [False] * len(after)
        made = {"generated": True, "end_of_turn_added": added, "unfinished": not (closed or added or stopped)}
        return _cut(input_ids, loss_mask, len(prompt), max_length) | made
    messages = to_messages(example, where)
    if messages is None and tokenizer.chat_template is not None:
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
    if messages is not None:
        _check_template(tokenizer, where)
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
    prompt_length = next(i for i in range(len(input_ids)) if encoding["offset_mapping"][i][1] > spans[-1][0])
    made = {"generated": False, "end_of_turn_added": False, "unfinished": False}
    return _cut(input_ids, loss_mask, prompt_length, max_length) | made


def _cut(input_ids: list[int], loss_mask: list[bool], prompt_length: int, max_length: int) -> dict[str, Any]:
    """The tokens and mask of one example, cut to ``max_length``; a first token is never trained on: nothing
    precedes it to predict it from (an empty prompt without a template or BOS)."""
    untrainable_first = bool(loss_mask) and loss_mask[0]
    loss_mask = [False, *loss_mask[1:]] if untrainable_first else loss_mask
    return {
        "input_ids": input_ids[:max_length],
        "loss_mask": loss_mask[:max_length],
        "num_loss_tokens": sum(loss_mask[:max_length]),
        "prompt_length": prompt_length,
        "truncated": len(input_ids) > max_length,
        "untrainable_first": untrainable_first,
    }


def load_tokenizer(
    path: str, trust_remote_code: bool = False, setting: str = "data.tokenizer_name_or_path"
) -> PreTrainedTokenizerBase:
    """Load a fast tokenizer (offsets are needed to render by position); without a pad token, its EOS pads.

    Raises:
        PearError: naming ``setting`` and ``path``, if it is missing, cannot be loaded, or is not a fast tokenizer.
    """
    refuse_missing(setting, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as err:
        raise load_error(setting, path, "a tokenizer", err) from err
    if not tokenizer.is_fast:
        raise PearError(f"{path}: a fast (Rust) tokenizer is needed for offsets")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

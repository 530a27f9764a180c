"""What the experiment measures: the verifiable reward, the unbiased pass@k estimator, sampled evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pear_lightning.demo.task import extract_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 − C(n−c, k) / C(n, k) (Chen et al., 2021).

    Args:
        n: samples drawn for the problem (at least ``k``).
        c: how many of them are correct.
        k: the budget of attempts.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion, plain or conversational (TRL passes ``[{"role": "assistant", "content": ...}]``)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def correctness_reward(completions: Sequence[str | list[dict]], answer: Sequence[str], **_: object) -> list[float]:
    """1.0 where the completion's final ``#### <int>`` equals the reference answer, else 0.0 (malformed too).

    The signature is TRL's reward-function contract: the dataset's ``answer`` column arrives as a keyword.
    """
    return [float(extract_answer(completion_text(c)) == str(a)) for c, a in zip(completions, answer)]


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The chat-template tokens of a one-turn question, ending with the assistant's turn opening."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


@torch.no_grad()
def sample_correct_counts(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    n: int,
    max_new_tokens: int,
    batch_size: int = 512,
    seed: int = 0,
) -> list[int]:
    """Sample ``n`` completions per question at temperature 1 (no top-k/top-p) and count the correct ones."""
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    counts = [0] * len(questions)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        width = max(len(p) for _, p in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for _, p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in chunk])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for (i, _), reward in zip(chunk, correctness_reward(texts, [answers[i] for i, _ in chunk])):
            counts[i] += int(reward)
    torch.random.set_rng_state(generator_state)
    return counts


def pass_rates(counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems for each k, from per-problem correct counts out of ``n`` samples."""
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}

"""The distribution a sampler really draws from: the logits scaled by a temperature and cut by top-k, top-p and min-p,
as ``transformers`` and vLLM apply them, renormalised over the tokens they keep.

PEAR's π_β is the distribution that sampled the data. Data drawn at temperature 0.7 with top-p 0.9 was drawn from
q(y) = softmax(z / T) restricted to the kept set and renormalised, so log q(y) is what an importance ratio must
divide by; the raw log-softmax at temperature 1 is that only when nothing is processed. Pure torch.

The two engines apply the same four steps in different orders:

- ``transformers`` (``GenerationMixin._get_logits_processor``): temperature, top-k, top-p, min-p;
- ``vllm`` (its V1 sampler): temperature, min-p, top-k, top-p.

Each step is implemented as both engines implement it: top-k keeps every token whose logit reaches the k-th
largest (ties included); top-p sorts ascending and drops the tokens whose cumulative probability is at most
1 − top_p, always keeping the most likely one; min-p drops the tokens whose probability is below min_p times the
largest. The orders give the same kept set unless both min-p and top-p are set (min-p first renormalises the mass
that top-p counts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pear_lightning.errors import PearError

ORDERS = {
    "transformers": ("temperature", "top_k", "top_p", "min_p"),
    "vllm": ("temperature", "min_p", "top_k", "top_p"),
}


@dataclass(frozen=True)
class SamplingSettings:
    """How a sampler processed the logits before drawing each token.

    Args:
        temperature: the logits are divided by it (> 0; greedy decoding has no distribution to divide by).
        top_k: keep the ``top_k`` most likely tokens (ties at the k-th included); 0 (or vLLM's -1) keeps all.
        top_p: keep the most likely tokens whose probabilities add up to ``top_p`` (nucleus sampling); 1 keeps all.
        min_p: keep the tokens at least ``min_p`` times as likely as the most likely one; 0 keeps all.
        order: the engine whose order of steps was used: ``transformers`` (temperature, top-k, top-p, min-p) or
            ``vllm`` (temperature, min-p, top-k, top-p); they differ only when ``min_p`` and ``top_p`` are both set.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    order: Literal["transformers", "vllm"] = "transformers"

    def __post_init__(self) -> None:
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)  # vLLM's spelling of "off"

    def check(self, setting: str) -> SamplingSettings:
        """Return the settings if they describe a distribution.

        Raises:
            PearError: naming ``setting`` and every value out of range.
        """
        problems = []
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (greedy data has no π_β to divide by), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 or -1: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.order not in ORDERS:
            problems.append(f"order must be one of {sorted(ORDERS)}, got {self.order!r}")
        if problems:
            raise PearError(f"{setting}: {'; '.join(problems)}")
        return self

    @property
    def raw(self) -> bool:
        """Whether nothing is processed: the distribution is the model's own log-softmax."""
        return self.temperature == 1 and self.top_k == 0 and self.top_p == 1 and self.min_p == 0

    def as_dict(self) -> dict[str, Any]:
        """The settings as a manifest records them."""
        return asdict(self)

    def describe(self) -> str:
        """The settings in words, for messages."""
        if self.raw:
            return "temperature 1, no top-k/top-p/min-p (the raw distribution)"
        parts = [f"temperature {self.temperature:g}"]
        parts += [f"top_k {self.top_k}"] if self.top_k else []
        parts += [f"top_p {self.top_p:g}"] if self.top_p < 1 else []
        parts += [f"min_p {self.min_p:g}"] if self.min_p > 0 else []
        if self.min_p > 0 and self.top_p < 1:
            parts.append(f"{self.order} order")
        return ", ".join(parts)


def process_logits(logits: Tensor, settings: SamplingSettings) -> Tensor:
    """The sampler's processed logits: ``logits / temperature``, with -inf outside the kept set.

    Args:
        logits: [N, V] float32 logits, one row per position.
        settings: the sampler's settings.

    Returns:
        [N, V] float32; a softmax over it is the distribution the sampler drew from.
    """
    x = logits / settings.temperature if settings.temperature != 1 else logits
    for step in ORDERS[settings.order][1:]:
        x = _STEPS[step](x, getattr(settings, step))
    return x


def processed_logprobs(logits: Tensor, targets: Tensor, settings: SamplingSettings | None) -> Tensor:
    """log q(target) of each row under the sampler's distribution; -inf for a target outside the kept set.

    Args:
        logits: [N, V] logits (any float dtype; computed in float32).
        targets: [N] token ids.
        settings: the sampler's settings; None (or raw settings) gives the plain log-softmax.
    """
    x = logits.float()
    if settings is not None and not settings.raw:
        x = process_logits(x, settings)
    return x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def _top_k(x: Tensor, k: int) -> Tensor:
    if not 0 < k < x.shape[-1]:
        return x
    return x.masked_fill(x < torch.topk(x, k).values[..., -1:], float("-inf"))


def _top_p(x: Tensor, p: float) -> Tensor:
    if p >= 1:
        return x
    ascending, order = torch.sort(x, descending=False)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False  # the most likely token always stays
    return x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _min_p(x: Tensor, p: float) -> Tensor:
    if p <= 0:
        return x
    probs = x.softmax(dim=-1)
    return x.masked_fill(probs < p * probs.amax(dim=-1, keepdim=True), float("-inf"))


_STEPS = {"top_k": _top_k, "top_p": _top_p, "min_p": _min_p}

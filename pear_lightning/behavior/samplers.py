"""Sampling responses with their per-token log-probs under the distribution that sampled them: ``transformers``
``generate`` (CPU or GPU), or vLLM (GPU) when it is installed.

Both backends return, per prompt, ``n`` samples: the sampled token ids (ending with the stop token when the sampler
stopped on one), log q(y_t) of each under the processed distribution (``processing``), and whether it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from pear_lightning.errors import PearError
from pear_lightning.sampling import SamplingSettings, process_logits


@dataclass
class Sample:
    """One sampled response: its token ids, log q of each, and whether the sampler stopped on a stop token."""

    token_ids: list[int]
    logprobs: list[float]
    stopped: bool


class ProcessedSampling(LogitsProcessor):
    """Turns ``generate``'s logits into the sampler's processed distribution, and records log q of every token drawn
    from it: at each step it keeps the log-softmax it hands over, and reads the drawn token's entry at the next step
    (or from the finished sequences), so only one [rows, V] step is held."""

    def __init__(self, settings: SamplingSettings) -> None:
        self.settings = settings
        self.last: Tensor | None = None
        self.recorded: list[Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Record the previous step's drawn tokens, and return this step's processed logits."""
        if self.last is not None:
            self.recorded.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        processed = process_logits(scores.float(), self.settings)
        self.last = processed.log_softmax(dim=-1)
        return processed

    def finish(self, sequences: Tensor) -> Tensor:
        """[rows, steps] log q of every drawn token, given ``generate``'s output sequences."""
        self.recorded.append(self.last.gather(-1, sequences[:, -1:]).squeeze(-1))
        return torch.stack(self.recorded, dim=1)


class TransformersSampler:
    """Samples with ``model.generate``, through ``ProcessedSampling`` alone: the model's own generation config is set
    aside, so no other logits processor (repetition penalty, a default top-k) changes the distribution.

    Args:
        model: a causal LM, in eval mode, on its device.
        settings: the sampling distribution.
        n: samples per prompt.
        max_new_tokens: the most tokens per response.
        stop_ids: token ids that end a response (EOS, the chat template's end-of-turn token).
        pad_id: the padding token id.
        batch_size: prompts per ``generate`` call.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        settings: SamplingSettings,
        n: int,
        max_new_tokens: int,
        stop_ids: list[int],
        pad_id: int,
        batch_size: int,
    ) -> None:
        self.model, self.settings, self.n, self.stop_ids, self.pad_id = model, settings, n, stop_ids, pad_id
        self.batch_size = batch_size
        # Explicit neutral values: generate fills unset ones from the model's config, then its defaults (top_k 50).
        self.config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
        )

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids), seeded by ``seed``."""
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        out: list[list[Sample]] = []
        own, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                width = max(len(p) for p in batch)
                input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch], device=device)
                attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                processor = ProcessedSampling(self.settings)
                sequences = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=self.config,
                    logits_processor=LogitsProcessorList([processor]),
                )
                logprobs = processor.finish(sequences).tolist()
                rows = [self._sample(ids, lps) for ids, lps in zip(sequences[:, width:].tolist(), logprobs)]
                out += [rows[i : i + self.n] for i in range(0, len(rows), self.n)]
        finally:
            self.model.generation_config = own
        return out

    def _sample(self, ids: list[int], logprobs: list[float]) -> Sample:
        """One response, cut after its first stop token (what follows is padding)."""
        end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
        return Sample(ids[:end], logprobs[: len(ids[:end])], end is not None)


def require_vllm(settings: SamplingSettings) -> None:
    """Check that vLLM can be used, before anything is written.

    Raises:
        PearError: if vLLM is not installed, or the settings' order is not vLLM's.
    """
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise PearError(
            "generate --backend vllm: vLLM is not installed (pip install vllm, on a machine with a GPU); "
            "--backend transformers needs nothing more"
        ) from err
    if settings.order != "vllm":
        raise PearError(
            "generate --backend vllm: vLLM applies min-p before top-k and top-p; set --sampling.order vllm so that "
            "the manifest records the distribution it samples from"
        )


class VllmSampler:
    """Samples with vLLM (GPU), whose log-probs are set to those of the processed distribution
    (``logprobs_mode="processed_logprobs"``, vLLM >= 0.10.2); its own order of steps is ``vllm``.

    Args:
        model_name_or_path: the model folder or hub name.
        settings: the sampling distribution (its ``order`` must be ``vllm``).
        n: samples per prompt.
        max_new_tokens: the most tokens per response.
        stop_ids: token ids that end a response.
        dtype: the model's dtype in vLLM (``auto``, ``bfloat16``, ``float32``…).
        trust_remote_code: allow the model folder to run its own code.
    """

    def __init__(
        self,
        model_name_or_path: str,
        settings: SamplingSettings,
        n: int,
        max_new_tokens: int,
        stop_ids: list[int],
        dtype: str,
        trust_remote_code: bool,
    ) -> None:
        require_vllm(settings)
        from vllm import LLM, SamplingParams

        self.params = SamplingParams
        self.settings, self.n, self.max_new_tokens, self.stop_ids = settings, n, max_new_tokens, stop_ids
        # generation_config="vllm": the model's generation_config.json must not add its own sampling defaults.
        self.llm = LLM(
            model=model_name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
        )

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids); prompt i is seeded by ``seed`` and i."""
        s = self.settings
        params = [
            self.params(
                n=self.n,
                temperature=s.temperature,
                top_k=s.top_k or -1,
                top_p=s.top_p,
                min_p=s.min_p,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                max_tokens=self.max_new_tokens,
                stop_token_ids=self.stop_ids,
                logprobs=1,  # the sampled token's log-prob is always among them
                seed=seed * 1_000_003 + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [
            [
                Sample(
                    list(c.token_ids),
                    [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)],
                    c.finish_reason == "stop",
                )
                for c in output.outputs
            ]
            for output in outputs
        ]

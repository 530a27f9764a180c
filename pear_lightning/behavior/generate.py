"""``python -m pear_lightning generate``: sample responses to prompts, with their token ids and log-probs.

Prompts in (``--prompts``: rows with ``prompt`` or chat ``messages``, any columns besides), responses out: an
``--output`` folder of Parquet shards that ``data.train_path`` reads as it is. Each response row keeps its prompt's
columns and adds ``id``, ``prompt_id``, ``completion`` (the decoded text), ``token_ids`` (exactly as sampled, the stop
token included), ``logprobs`` (log q of each under the sampling distribution: temperature, top-k, top-p, min-p, see
``processing``) and ``finish_reason`` (``stop`` or ``length``). ``manifest.json`` records the model, the tokenizer
fingerprint and the sampling settings, which training and ``cache_logprobs`` read back. With ``--verifier``, only the
responses it accepts are kept. Prompts are generated ``--shard_size`` at a time, each shard seeded by ``--seed`` and
its number and written atomically, so a stopped run resumes where it was and ends as an uninterrupted one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from lightning.fabric import Fabric
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from pear_lightning import __version__
from pear_lightning.behavior.samplers import Sample, TransformersSampler, VllmSampler, require_vllm
from pear_lightning.behavior.shards import ShardWriter
from pear_lightning.data import cache
from pear_lightning.data.checks import check_unique_ids
from pear_lightning.data.render import example_id, load_tokenizer, prompt_ids, request, turn_end
from pear_lightning.data.sources import GENERATED, load_examples, no_examples
from pear_lightning.errors import LOAD_ERRORS, PearError, load_error
from pear_lightning.model.load import check_positions, load_model, position_limit
from pear_lightning.sampling import SamplingSettings

FORMAT_VERSION = 1
Verifier = Callable[[dict[str, Any], str], bool]
GENERATION_INPUTS = "model, tokenizer, prompts or settings"
GENERATED_COLUMNS = {"id", "prompt_id", "completion", "token_ids", "logprobs", "finish_reason"}


def load_verifier(spec: str | None) -> Verifier | None:
    """The function ``module.function`` (or ``module:function``) names, or None.

    Raises:
        PearError: if it cannot be imported or is not callable.
    """
    if spec is None:
        return None
    module, _, name = spec.replace(":", ".").rpartition(".")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        function, problem = None, f"{type(err).__name__}: {err}"
    else:
        problem = "not callable"
    if not callable(function):
        raise PearError(
            f"--verifier {spec}: cannot be used ({problem}); give a function as module.function taking "
            "(prompt row, completion text) and returning True to keep the response"
        )
    return function


def stop_ids(tokenizer: PreTrainedTokenizerBase, model_name_or_path: str, config: Any) -> list[int]:
    """The tokens that end a response: the EOS of the tokenizer, of the model's config and of its generation config,
    and the chat template's end-of-turn token."""
    try:
        generation = GenerationConfig.from_pretrained(model_name_or_path).eos_token_id
    except OSError:  # the model has no generation_config.json
        generation = None
    ids = [tokenizer.eos_token_id, getattr(config, "eos_token_id", None), generation, *turn_end(tokenizer).trained[-1:]]
    return sorted({i for x in ids for i in (x if isinstance(x, list) else [x]) if i is not None})


def describe_inputs(
    job: Generation, prompts: Dataset, tokenizer: PreTrainedTokenizerBase, config: Any
) -> dict[str, Any]:
    """Everything the responses depend on; a resumed run must match it exactly. Under ``transformers`` the batch
    (prompts sampled together draw from one random stream, padded together), the device and the attention
    implementation change the samples; vLLM seeds each prompt on its own."""
    precision = job.precision if job.backend == "transformers" else f"vllm dtype {job.vllm_dtype}"
    local = job.backend == "transformers"
    device = job.accelerator if job.accelerator != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "kind": GENERATED,
        "format_version": FORMAT_VERSION,
        "pear_lightning_version": __version__,
        "model": job.model,
        "model_config_fingerprint": cache.model_fingerprint(config.to_dict()),
        "tokenizer": job.tokenizer or job.model,
        "tokenizer_fingerprint": cache.tokenizer_fingerprint(tokenizer),
        "sampling": job.sampling.as_dict(),
        "stop_token_ids": stop_ids(tokenizer, job.model, config),
        "backend": job.backend,
        "precision": precision,
        "batch_size": job.batch_size if local else None,
        "accelerator": device if local else "cuda",
        "attn_implementation": job.attn_implementation,
        "n": job.n,
        "max_new_tokens": job.max_new_tokens,
        "seed": job.seed,
        "verifier": job.verifier,
        "shard_size": job.shard_size,
        "prompts": {"path": job.prompts, "fingerprint": cache.data_fingerprint(job.prompts), "count": len(prompts)},
    }


def make_sampler(job: Generation, stops: list[int], pad_id: int) -> tuple[TransformersSampler | VllmSampler, Any]:
    """The backend, with its model loaded (in fp32, then converted to ``precision`` on ``accelerator``, for
    ``transformers``), and the context its sampling runs in."""
    if job.backend == "vllm":
        args = (job.sampling, job.n, job.max_new_tokens, stops, job.vllm_dtype, job.trust_remote_code)
        return VllmSampler(job.model, *args), nullcontext()
    fabric = Fabric(accelerator=job.accelerator, devices=1, precision=job.precision)
    model, _ = load_model(job.model, job.trust_remote_code, attn_implementation=job.attn_implementation)
    fabric.setup_module(model)  # converted and moved in place
    sampler = TransformersSampler(model.eval(), job.sampling, job.n, job.max_new_tokens, stops, pad_id, job.batch_size)
    return sampler, fabric.autocast()


def keep(verifier: Verifier | None, spec: str, row: dict[str, Any], text: str, where: str) -> bool:
    """Whether the verifier accepts a response (all are kept without one).

    Raises:
        PearError: if the verifier fails, naming the prompt.
    """
    if verifier is None:
        return True
    try:
        return bool(verifier(row, text))
    except Exception as err:  # the user's code: its failure is reported with the prompt it failed on
        raise PearError(f"--verifier {spec} failed on {where}: {type(err).__name__}: {err}") from err


def shard_table(
    job: Generation,
    prompts: Dataset,
    start: int,
    samples: list[list[Sample]],
    verifier: Verifier | None,
    tokenizer: PreTrainedTokenizerBase,
) -> pa.Table:
    """The kept responses to prompts ``start``, ``start + 1``…: each prompt's columns (``messages`` without assistant
    turns after the prompt), then the generated ones."""
    rows = prompts.select(range(start, start + len(samples))).to_list()
    kept = []  # (prompt index in the shard, response id, prompt id, text, sample)
    for i, (row, responses) in enumerate(zip(rows, samples)):
        prompt_id = example_id(row)
        where = f"{job.prompts} row {start + i + 1} (id {prompt_id})"
        for k, sample in enumerate(responses):
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            if keep(verifier, job.verifier, row, text, where):
                kept.append((i, f"{prompt_id}-{k}" if job.n > 1 else prompt_id, prompt_id, text, sample))
    table = prompts.with_format("arrow")[start : start + len(samples)].take(pa.array([k[0] for k in kept], pa.int64()))
    if "messages" in table.column_names:
        trimmed = [request(rows[k[0]], "") if rows[k[0]].get("messages") is not None else None for k in kept]
        index = table.column_names.index("messages")
        table = table.set_column(index, "messages", pa.array(trimmed, table.schema.field("messages").type))
    table = table.drop_columns([name for name in table.column_names if name in GENERATED_COLUMNS])
    table = table.add_column(0, "prompt_id", pa.array([k[2] for k in kept], pa.string()))
    table = table.add_column(0, "id", pa.array([k[1] for k in kept], pa.string()))
    generated = {
        "completion": pa.array([k[3] for k in kept], pa.string()),
        "token_ids": pa.array([k[4].token_ids for k in kept], pa.list_(pa.int32())),
        "logprobs": pa.array([k[4].logprobs for k in kept], pa.list_(pa.float32())),
        "finish_reason": pa.array(["stop" if k[4].stopped else "length" for k in kept], pa.string()),
    }
    for name, column in generated.items():
        table = table.append_column(name, column)
    return table


@dataclass(frozen=True)
class Generation:
    """What ``generate`` draws: the arguments of ``generate`` (see there), checked and kept together."""

    prompts: str
    model: str
    tokenizer: str | None
    sampling: SamplingSettings
    n: int
    max_new_tokens: int
    verifier: str | None
    backend: Literal["transformers", "vllm"]
    batch_size: int
    shard_size: int
    seed: int
    vllm_dtype: str
    precision: str
    accelerator: str
    trust_remote_code: bool
    attn_implementation: str | None


def generate(
    prompts: str,
    output: str | Path,
    model: str,
    tokenizer: str | None = None,
    sampling: SamplingSettings | None = None,
    n: int = 1,
    max_new_tokens: int = 512,
    verifier: str | None = None,
    backend: Literal["transformers", "vllm"] = "transformers",
    batch_size: int = 16,
    shard_size: int = 1000,
    seed: int = 0,
    vllm_dtype: str = "auto",
    precision: str = "32-true",
    accelerator: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """Sample ``n`` responses to each prompt from ``model`` into the ``output`` folder (see the module's docstring).

    Args:
        prompts: rows with ``prompt`` or chat ``messages`` (any ``datasets`` source), any columns besides.
        output: the folder to write, or to finish (a stopped run resumes).
        model: the model to sample from (hub name or folder).
        tokenizer: its tokenizer and chat template (default: the model's).
        sampling: the sampling distribution (default: temperature 1, nothing truncated).
        n: samples per prompt.
        max_new_tokens: the most tokens per response.
        verifier: keep only responses this function accepts: ``module.function`` taking (prompt row, completion text).
        backend: ``transformers`` (CPU or GPU) or ``vllm`` (GPU).
        batch_size: prompts per generate call (transformers).
        shard_size: prompts per shard (and per resume step).
        seed: seeds the sampling of every shard.
        vllm_dtype: the model's dtype under vLLM.
        precision: Lightning's precision for the transformers backend (``32-true``, ``bf16-mixed``…).
        accelerator: Lightning's accelerator for the transformers backend (``cpu``, ``cuda``, ``auto``).
        trust_remote_code: allow the model folder to run its own code.
        attn_implementation: transformers' attention implementation.

    Returns:
        The folder's manifest.

    Raises:
        PearError: for bad settings, prompts, a verifier that cannot be used, or an output of other inputs.
    """
    job = Generation(
        prompts, model, tokenizer, (sampling or SamplingSettings()).check("--sampling"), n, max_new_tokens, verifier,
        backend, batch_size, shard_size, seed, vllm_dtype, precision, accelerator, trust_remote_code,
        attn_implementation,
    )  # fmt: skip
    if min(n, max_new_tokens, batch_size, shard_size) < 1:
        raise PearError("generate: --n, --max_new_tokens, --batch_size and --shard_size must be >= 1")
    if backend == "vllm":
        require_vllm(job.sampling)
    check = load_verifier(verifier)
    writer = ShardWriter(output, "generation", GENERATION_INPUTS)
    writer.check()
    rows = load_examples(prompts)
    if len(rows) == 0:
        raise PearError(no_examples(prompts))
    check_unique_ids(rows.map(lambda ex: {"id": example_id(ex)}, remove_columns=rows.column_names), prompts)
    vocab = load_tokenizer(tokenizer or model, trust_remote_code, "data.tokenizer_name_or_path")
    requests = []
    for i, row in enumerate(rows):
        where = f"{prompts} row {i + 1} (id {example_id(row)})"
        requests.append(prompt_ids(request(row, where), vocab, where))
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as err:
        raise load_error("model.model_name_or_path", model, "a model config", err) from err
    longest = max(range(len(requests)), key=lambda i: len(requests[i]))
    size = len(requests[longest])
    what = f"prompt {example_id(rows[longest])} of {prompts} ({size} tokens) + --max_new_tokens {max_new_tokens}"
    room = (position_limit(config) or 0) - size
    fix = f"lower --max_new_tokens to at most {room}" if room > 0 else "shorten that prompt"
    check_positions(model, config, size + max_new_tokens, what, fix)
    writer.start(describe_inputs(job, rows, vocab, config))
    sampler = context = None
    for k, start in enumerate(range(0, len(rows), shard_size)):
        count = min(shard_size, len(rows) - start)

        def make(k: int = k, start: int = start, count: int = count) -> pa.Table:
            nonlocal sampler, context
            if sampler is None:
                sampler, context = make_sampler(job, writer.inputs["stop_token_ids"], vocab.pad_token_id)
            with context:
                samples = sampler.sample(requests[start : start + count], seed * 1_000_003 + k)
            table = shard_table(job, rows, start, samples, check, vocab)
            rank_zero_info(f"{Path(output) / f'part-{k:05d}.parquet'}: kept {table.num_rows} of {count * n} responses")
            return table

        writer.shard(f"part-{k:05d}.parquet", make, prompts=count)
    return writer.finish(counts(Path(output), writer.shards, len(rows) * n))


def counts(output: Path, shards: list[dict[str, Any]], samples: int) -> dict[str, int]:
    """The manifest's totals: responses sampled, kept, stopped, and cut at ``max_new_tokens``."""
    reasons = [pq.read_table(output / s["file"], columns=["finish_reason"]).column(0).to_pylist() for s in shards]
    stopped = sum(r.count("stop") for r in reasons)
    kept = sum(s["rows"] for s in shards)
    rank_zero_info(f"{output}: kept {kept} of {samples} responses ({kept - stopped} cut at max_new_tokens)")
    return {"samples": samples, "kept": kept, "stopped": stopped, "cut_at_max_new_tokens": kept - stopped}

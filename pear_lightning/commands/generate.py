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
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from .. import __version__, cache
from ..atomic import atomic_write
from ..cache import MANIFEST, PROGRESS, read_manifest, shard_rows, write_json
from ..checks import check_unique_ids
from ..errors import PearError
from ..generation import Sample, TransformersSampler, VllmSampler, require_vllm
from ..lightning_cli import PearArgumentParser, PearCLI, tool_cli
from ..processing import SamplingSettings
from ..render import example_id, prompt_ids, request, turn_end
from ..sources import GENERATED, load_examples, no_examples

FORMAT_VERSION = 1
Verifier = Callable[[dict[str, Any], str], bool]
GENERATED_COLUMNS = {"id", "prompt_id", "completion", "token_ids", "logprobs", "finish_reason"}


class GenerateCLI(PearCLI):
    """The run's config (the model to sample from, its tokenizer and chat template) plus the generation's options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add the prompts, the output folder, the sampling distribution and the generation's settings."""
        super().add_arguments_to_parser(parser)
        parser.add_argument("--prompts", type=str, required=True, help="Prompts: rows with `prompt` or `messages`.")
        parser.add_argument("--output", type=str, required=True, help="The folder to write (or to finish).")
        parser.add_argument("--sampling", type=SamplingSettings, default=SamplingSettings())
        parser.add_argument("--n", type=int, default=1, help="Samples per prompt.")
        parser.add_argument("--max_new_tokens", type=int, default=512, help="The most tokens per response.")
        parser.add_argument(
            "--verifier",
            type=str | None,
            default=None,
            help="Keep only responses this function accepts: `module.function` taking (prompt row, completion text) "
            "and returning True to keep; the demo's is pear_lightning.demo.task.check_answer.",
        )
        parser.add_argument(
            "--backend", type=Literal["transformers", "vllm"], default="transformers", help="vllm needs a GPU."
        )
        parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call (transformers).")
        parser.add_argument("--shard_size", type=int, default=1000, help="Prompts per shard (and per resume step).")
        parser.add_argument("--seed", type=int, default=0, help="Seeds the sampling of every shard.")
        parser.add_argument("--vllm_dtype", type=str, default="auto", help="The model's dtype under vLLM.")


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


def describe_inputs(cli: GenerateCLI, prompts: Dataset, settings: SamplingSettings) -> dict[str, Any]:
    """Everything the responses depend on; a resumed run must match it exactly."""
    c = cli.config
    model_path = cli.model.hparams.model_name_or_path
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cli.model.hparams.trust_remote_code)
    tokenizer = cli.datamodule.load_tokenizer()
    return {
        "kind": GENERATED,
        "format_version": FORMAT_VERSION,
        "pear_lightning_version": __version__,
        "model": model_path,
        "model_config_fingerprint": cache.model_fingerprint(config.to_dict()),
        "tokenizer": cli.datamodule.tokenizer_name_or_path,
        "tokenizer_fingerprint": cache.tokenizer_fingerprint(tokenizer),
        "sampling": settings.as_dict(),
        "stop_token_ids": stop_ids(tokenizer, model_path, config),
        "backend": c.backend,
        "precision": str(cli.trainer.precision) if c.backend == "transformers" else f"vllm dtype {c.vllm_dtype}",
        "n": c.n,
        "max_new_tokens": c.max_new_tokens,
        "seed": c.seed,
        "verifier": c.verifier,
        "shard_size": c.shard_size,
        "prompts": {"path": c.prompts, "fingerprint": cache.data_fingerprint(c.prompts), "count": len(prompts)},
    }


def make_sampler(cli: GenerateCLI, settings: SamplingSettings, stops: list[int]) -> TransformersSampler | VllmSampler:
    """The backend, with its model loaded (by the run's model loader and precision, for ``transformers``)."""
    c, hp = cli.config, cli.model.hparams
    if c.backend == "vllm":
        return VllmSampler(
            hp.model_name_or_path, settings, c.n, c.max_new_tokens, stops, c.vllm_dtype, hp.trust_remote_code
        )
    cli.model.configure_model()
    model = cli.trainer.precision_plugin.convert_module(cli.model.model).to(cli.trainer.strategy.root_device).eval()
    pad_id = cli.datamodule.load_tokenizer().pad_token_id
    return TransformersSampler(model, settings, c.n, c.max_new_tokens, stops, pad_id, c.batch_size)


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
    cli: GenerateCLI, prompts: Dataset, start: int, samples: list[list[Sample]], verifier: Verifier | None
) -> pa.Table:
    """The kept responses to prompts ``start``, ``start + 1``…: each prompt's columns (``messages`` without assistant
    turns after the prompt), then the generated ones."""
    c, tokenizer = cli.config, cli.datamodule.load_tokenizer()
    rows = prompts.select(range(start, start + len(samples))).to_list()
    kept = []  # (prompt index in the shard, response id, prompt id, text, sample)
    for i, (row, responses) in enumerate(zip(rows, samples)):
        prompt_id = example_id(row)
        where = f"{c.prompts} row {start + i + 1} (id {prompt_id})"
        for k, sample in enumerate(responses):
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            if keep(verifier, c.verifier, row, text, where):
                kept.append((i, f"{prompt_id}-{k}" if c.n > 1 else prompt_id, prompt_id, text, sample))
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


def check_output(output: Path, inputs: dict[str, Any]) -> None:
    """Refuse an ``--output`` folder that holds a generation (finished or not) made from other inputs.

    Raises:
        PearError: saying which, and that the folder is left as it is.
    """
    finished, progress = read_manifest(output), output / PROGRESS
    if finished is not None and {k: finished.get(k) for k in inputs} != inputs:
        raise PearError(
            f"--output {output}: holds a finished generation made from other inputs (model, tokenizer, prompts or "
            "settings); it is left as it is: choose another --output, or delete that folder first"
        )
    if finished is None and progress.exists() and json.loads(progress.read_text()) != inputs:
        raise PearError(
            f"--output {output}: holds an unfinished generation for other inputs; delete that folder or choose "
            "another --output"
        )


def run(args: list[str]) -> None:
    """Run the ``generate`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(GenerateCLI, args, "generate", __doc__.splitlines()[0])
    c, output, settings = cli.config, Path(cli.config.output), cli.config_init.sampling.check("--sampling")
    if min(c.n, c.max_new_tokens, c.batch_size, c.shard_size) < 1:
        raise PearError("generate: --n, --max_new_tokens, --batch_size and --shard_size must be >= 1")
    if c.backend == "vllm":
        require_vllm(settings)
    verifier = load_verifier(c.verifier)
    prompts = load_examples(c.prompts)
    if len(prompts) == 0:
        raise PearError(no_examples(c.prompts))
    ids = prompts.map(lambda ex: {"id": example_id(ex)}, remove_columns=prompts.column_names, desc="Reading ids")
    check_unique_ids(ids, c.prompts)
    tokenizer = cli.datamodule.load_tokenizer()
    requests = []
    for i, row in enumerate(prompts):
        where = f"{c.prompts} row {i + 1} (id {example_id(row)})"
        requests.append(prompt_ids(request(row, where), tokenizer, where))
    inputs = describe_inputs(cli, prompts, settings)
    check_output(output, inputs)
    output.mkdir(parents=True, exist_ok=True)
    if read_manifest(output) is None:
        write_json(output / PROGRESS, inputs)

    sampler, shards, precision = None, [], cli.trainer.precision_plugin
    for k, start in enumerate(range(0, len(prompts), c.shard_size)):
        shard = {"file": f"part-{k:05d}.parquet", "prompts": min(c.shard_size, len(prompts) - start)}
        path = output / shard["file"]
        if shard_rows(path) is None:  # written atomically: a shard that exists is complete
            sampler = sampler or make_sampler(cli, settings, inputs["stop_token_ids"])
            with precision.forward_context() if c.backend == "transformers" else nullcontext():
                samples = sampler.sample(requests[start : start + shard["prompts"]], c.seed * 1_000_003 + k)
            table = shard_table(cli, prompts, start, samples, verifier)
            atomic_write(path, lambda tmp, table=table: pq.write_table(table, tmp))
            rank_zero_info(f"{path}: kept {table.num_rows} of {shard['prompts'] * c.n} responses")
        shard["rows"] = shard_rows(path)
        shards.append(shard)
    reasons = [pq.read_table(output / s["file"], columns=["finish_reason"]).column(0).to_pylist() for s in shards]
    stopped = sum(r.count("stop") for r in reasons)
    kept = sum(s["rows"] for s in shards)
    counts = {"samples": len(prompts) * c.n, "kept": kept, "stopped": stopped, "cut_at_max_new_tokens": kept - stopped}
    write_json(output / MANIFEST, {**inputs, "shards": shards, **counts})
    (output / PROGRESS).unlink(missing_ok=True)
    rank_zero_info(f"{output}: kept {kept} of {counts['samples']} responses ({kept - stopped} cut at max_new_tokens)")

"""``python -m pear_lightning cache_logprobs``: score SFT data with the behaviour model, through Lightning predict.

The run's own config decides the data, tokenizer, chat template and ``max_length``, so the cached
tokens are exactly the ones training will see; ``--model.model_name_or_path`` names the behaviour
model, and ``--trainer.devices`` / ``--trainer.strategy ddp`` / ``--trainer.precision`` spread and
speed up the scoring. Each split is scored under the distribution that sampled it (``data.sampling``,
or what a ``generate`` folder records: temperature, top-k, top-p, min-p), so the log-probs are log q(y)
of that distribution; a response token outside its kept set is an error. With ``--teacher_top_k K`` each
response token also gets a teacher's K most likely next tokens, their log-probs and the log-mass outside them
(``--teacher``, by default the behaviour model; see ``pear_lightning.teacher``), for distillation (``model.loss kl``).
Shards are written one at a time, atomically; a run that is stopped resumes where it was, and a finished cache is
never overwritten.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoConfig

from .. import __version__
from ..cache import (
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    data_fingerprint,
    model_fingerprint,
    read_manifest,
    shard_rows,
    tokenizer_fingerprint,
    write_json,
    write_shard,
)
from ..checks import check_unique_ids
from ..collate import collate
from ..data import PearDataModule
from ..distill import TEACHER_COLUMNS
from ..errors import PearError
from ..lightning_cli import PearArgumentParser, PearCLI, tool_cli
from ..module import PearModule
from ..preflight import check_writable
from ..processing import SamplingSettings
from ..sampling import loader_workers
from ..teacher import TeacherScorer, teacher_entry


class CacheCLI(PearCLI):
    """The run's config plus the cache's own options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``--output``, ``--shard_size``, ``--splits`` and the teacher's options."""
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output", type=str, required=True, help="The cache folder to write (or to finish).")
        parser.add_argument("--shard_size", type=int, default=10_000, help="Examples per Parquet shard.")
        parser.add_argument(
            "--splits", type=list[str], default=["train"], help="The data splits to score (training uses `train`)."
        )
        parser.add_argument(
            "--teacher_top_k", type=int, default=0, help="Store a teacher's top k per response token (0: none)."
        )
        parser.add_argument(
            "--teacher", type=str | None, default=None, help="The teacher model (default: the behaviour model)."
        )
        parser.add_argument(
            "--teacher_dtype",
            type=Literal["float32", "float16"],
            default="float32",
            help="float32 or float16: the top-k log-probs' type.",
        )


def describe_inputs(cli: CacheCLI, splits: dict[str, Dataset]) -> dict[str, Any]:
    """Everything the cached numbers depend on; a resumed run must match it exactly."""
    model_path = cli.model.hparams.model_name_or_path
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cli.model.hparams.trust_remote_code)
    data: PearDataModule = cli.datamodule
    return {
        "format_version": FORMAT_VERSION,
        "pear_lightning_version": __version__,
        "behavior_model": model_path,
        "behavior_model_config_fingerprint": model_fingerprint(config.to_dict()),
        "tokenizer": data.tokenizer_name_or_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(data.load_tokenizer()),
        "max_length": data.max_length,
        "precision": str(cli.trainer.precision),
        "teacher": teacher_of(cli, model_path, data),
        "splits": {
            split: {
                "data_path": data.paths[split],
                "data_fingerprint": data_fingerprint(data.paths[split]),
                "examples": len(ds),
                "sampling": data.sampling_of(split).as_dict(),
            }
            for split, ds in splits.items()
        },
    }


def teacher_of(cli: CacheCLI, behavior: str, data: PearDataModule) -> dict[str, Any] | None:
    """The manifest's ``teacher`` entry, or None without ``--teacher_top_k``."""
    options = cli.config
    if not options.get("teacher_top_k"):
        return None
    path, trust = options.teacher or behavior, cli.model.hparams.trust_remote_code
    return teacher_entry(path, options.teacher_top_k, options.teacher_dtype, data.load_tokenizer(), trust)


def scorers(cli: CacheCLI, teacher: dict[str, Any] | None) -> list[PearModule]:
    """The modules whose predictions make a shard's rows: the behaviour model's; with a teacher, the teacher's, which
    also gives the behaviour log-probs when it is the behaviour model."""
    if teacher is None:
        return [cli.model]
    hp = cli.model.hparams
    scorer = TeacherScorer(teacher["model"], teacher["top_k"], hp.logprob_chunk_size, hp.trust_remote_code)
    return [scorer] if teacher["model"] == hp.model_name_or_path else [cli.model, scorer]


def score(cli: CacheCLI, subset: Dataset, modules: list[PearModule], sampling: SamplingSettings) -> list[dict]:
    """Score ``subset`` with each of ``modules`` in turn (the behaviour log-probs from the first, under ``sampling``;
    the teacher's columns from the last) and return the merged rows, in ``subset``'s order, on every rank."""
    rows = [dict(row) for row in _score(cli, subset, modules[0], sampling)]
    for module in modules[1:]:
        for row, scored in zip(rows, _score(cli, subset, module, None)):
            row.update({c: scored[c] for c in TEACHER_COLUMNS})
    return rows


def _score(cli: CacheCLI, subset: Dataset, module: PearModule, sampling: SamplingSettings | None) -> list[dict]:
    """Score ``subset`` on every rank's share of it and return all rows, in ``subset``'s order, on every rank."""
    module.scoring = sampling
    data: PearDataModule = cli.datamodule
    collate_fn = partial(collate, pad_id=data.load_tokenizer().pad_token_id)
    workers = loader_workers(data.num_workers, cli.trainer)
    loader = DataLoader(subset, batch_size=data.batch_size, collate_fn=collate_fn, **workers)
    predictions = cli.trainer.predict(module, dataloaders=loader, return_predictions=True) or []
    rows = [row for prediction in predictions for row in prediction_rows(prediction)]
    if cli.trainer.world_size > 1:
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(cli.trainer.world_size)]
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    by_id = {row["id"]: row for row in rows}
    return [by_id[ex_id] for ex_id in subset["id"]]


def run(args: list[str]) -> None:
    """Run the ``cache_logprobs`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(CacheCLI, args, "cache_logprobs", __doc__.splitlines()[0])
    output, shard_size = Path(cli.config.output), cli.config.shard_size
    data: PearDataModule = cli.datamodule
    unknown = [s for s in cli.config.splits if s not in data.paths]
    if unknown or shard_size < 1:
        raise PearError(f"cache_logprobs: --splits must name data splits {list(data.paths)} and --shard_size be >= 1")
    if output.exists() and not output.is_dir():
        raise PearError(f"--output {output}: a file; the cache is a folder: choose another name")
    check_writable(output, "--output")
    splits = {s: data.tokenized(s) for s in cli.config.splits if data.paths[s]}
    if not splits:
        raise PearError(f"cache_logprobs: none of the splits {cli.config.splits} has a data path in the config")
    for split, dataset in splits.items():
        check_unique_ids(dataset, data.paths[split])  # the cache is keyed by id: one row per id
    inputs = describe_inputs(cli, splits)
    is_main = cli.trainer.is_global_zero

    finished = read_manifest(output)
    if finished is not None:
        if {k: finished.get(k) for k in inputs} == inputs:
            rank_zero_info(f"{output}: complete already, nothing to do")
            return
        raise PearError(
            f"--output {output}: holds a finished cache made from other inputs (model, tokenizer, data or "
            "max_length); it is left as it is: choose another --output, or delete that folder first"
        )
    progress = output / PROGRESS
    if progress.exists() and read_progress(progress) != inputs:
        raise PearError(
            f"--output {output}: holds an unfinished cache for other inputs; "
            "delete that folder or choose another --output"
        )
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_json(progress, inputs)
    modules = scorers(cli, inputs["teacher"])
    teacher_dtype = inputs["teacher"]["dtype"] if inputs["teacher"] else None

    shards: dict[str, list[dict[str, Any]]] = {}
    tokens: dict[str, int] = {}
    for split, dataset in splits.items():
        shards[split], tokens[split] = [], 0
        for k, start in enumerate(range(0, len(dataset), shard_size)):
            shard = {"file": f"{split}-{k:05d}.parquet", "rows": min(shard_size, len(dataset) - start)}
            if shard_rows(output / shard["file"]) != shard["rows"]:  # missing, or cut short by a crash
                sampling = data.sampling_of(split)
                rows = score(cli, dataset.select(range(start, start + shard["rows"])), modules, sampling)
                check_kept(rows, data.paths[split], sampling)
                if is_main:
                    write_shard(output / shard["file"], rows, teacher_dtype)
                rank_zero_info(f"{output / shard['file']}: {len(rows)} examples scored")
            shards[split].append(shard)
        tokens[split] = sum(dataset["num_loss_tokens"])
    if is_main:
        write_json(output / MANIFEST, {**inputs, "shards": shards, "tokens": tokens})
        progress.unlink()
    rank_zero_info(f"{output}: cache complete ({', '.join(f'{s}: {len(d)} examples' for s, d in splits.items())})")


def read_progress(path: Path) -> dict[str, Any]:
    """The inputs recorded by an unfinished run."""
    return json.loads(path.read_text())


def check_kept(rows: list[dict[str, Any]], path: str, sampling: SamplingSettings) -> None:
    """Refuse scored rows with a token the sampling distribution cannot produce (log q = -inf).

    Raises:
        PearError: naming how many examples, and the first one's id, position and token.
    """
    bad = [row for row in rows if row["logprobs"] and min(row["logprobs"]) == -math.inf]
    if not bad:
        return
    position = bad[0]["logprobs"].index(-math.inf)
    raise PearError(
        f"{path}: {len(bad)} of {len(rows)} examples scored here hold a response token outside the kept set of "
        f"{sampling.describe()} (first: id {bad[0]['id']}, response token {position}, id "
        f"{bad[0]['token_ids'][position]}), so they were not sampled with those settings; set data.sampling to the "
        "settings the generator used, or remove those examples"
    )


def prediction_rows(prediction: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``{"id", "token_ids", "logprobs"}`` row per example of a ``PearModule.predict_step`` output (with a
    ``TeacherScorer``'s, the teacher columns too: each token's top-k flattened, token-major)."""
    columns = ["token_ids", "logprobs", *(c for c in TEACHER_COLUMNS if c in prediction)]
    flat = {c: prediction[c].flatten().tolist() for c in columns}
    width = {c: prediction[c].shape[1] if prediction[c].dim() == 2 else 1 for c in columns}
    ends = prediction["lengths"].cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [
        {"id": ex_id, **{c: flat[c][start * width[c] : end * width[c]] for c in columns}}
        for ex_id, start, end in zip(prediction["ids"], starts, ends)
    ]

"""``python -m pear_lightning cache_logprobs``: score SFT data with the behaviour model, through Lightning predict.

The run's own config decides the data, tokenizer, chat template and ``max_length``, so the cached
tokens are exactly the ones training will see; ``--model.model_name_or_path`` names the behaviour
model, and ``--trainer.devices`` / ``--trainer.strategy ddp`` / ``--trainer.precision`` spread and
speed up the scoring. Each split is scored under the distribution that sampled it (``data.sampling``,
or what a ``generate`` folder records: temperature, top-k, top-p, min-p), so the log-probs are log q(y)
of that distribution; a response token outside its kept set is an error. With ``--teacher_top_k K`` each
response token also gets a teacher's K most likely next tokens, their log-probs and the log-mass outside them
(``--teacher``, by default the behaviour model; see ``data.teacher``), for distillation (``model.loss kl``).
Shards are written one at a time, atomically, by the one resumable writer (``shards``); a run that is stopped resumes
where it was, and a finished cache is never overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from datasets import Dataset
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pear_lightning import __version__
from pear_lightning.behavior.shards import ShardWriter
from pear_lightning.data.cache import (
    FORMAT_VERSION,
    TEACHER_COLUMNS,
    TEACHER_DTYPES,
    data_fingerprint,
    model_fingerprint,
    shard_table,
    tokenizer_fingerprint,
)
from pear_lightning.data.checks import check_unique_ids
from pear_lightning.data.collate import collate
from pear_lightning.data.datamodule import PearDataModule
from pear_lightning.data.loader import loader_workers
from pear_lightning.errors import LOAD_ERRORS, PearError, load_error
from pear_lightning.model.load import check_example_positions, load_model
from pear_lightning.model.logprobs import ChunkSize, response_logprobs
from pear_lightning.model.topk import teacher_topk
from pear_lightning.sampling import SamplingSettings

CACHE_INPUTS = "model, tokenizer, data or max_length"


class Scorer(L.LightningModule):
    """Scores examples with a model through Lightning ``predict``: each response token's log-prob under ``sampling``
    (the raw distribution without it) and, with ``top_k``, the model's ``top_k`` most likely next tokens there,
    their log-probs and the log-mass outside them (the teacher's columns).

    Args:
        model_name_or_path: the behaviour (or teacher) model.
        top_k: how many of its most likely tokens to keep per position (0: none).
        logprob_chunk_size: loss tokens projected to the vocabulary at once (see ``model.logprobs``).
        trust_remote_code: allow the model folder to run its own code.
        attn_implementation: transformers' attention implementation.
    """

    def __init__(
        self,
        model_name_or_path: str,
        top_k: int = 0,
        logprob_chunk_size: ChunkSize = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.path, self.top_k, self.chunk_size = model_name_or_path, top_k, logprob_chunk_size
        self.trust_remote_code, self.attn_implementation = trust_remote_code, attn_implementation
        self.model: PreTrainedModel | None = None
        self.sampling: SamplingSettings | None = None  # the distribution the scored split was sampled from

    def configure_model(self) -> None:
        """Load the model (once), sharded under ``ModelParallelStrategy``; Lightning then applies the precision."""
        if self.model is None:
            args = (self.trust_remote_code, None, False, False, self.device_mesh, self.attn_implementation)
            self.model, chunkable = load_model(self.path, *args)
            self.chunk_size = self.chunk_size if chunkable else 0

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``ids``, the flat ``token_ids`` and fp32 ``logprobs`` of the response tokens (-inf: outside the kept set of
        ``sampling``) with each example's ``lengths``; with ``top_k``, the flat [N, k] ``teacher_topk_ids`` /
        ``teacher_topk_logprobs`` and [N] ``teacher_tail_logprob``."""
        if not self.top_k:
            return response_logprobs(self.model, batch, self.chunk_size, self.sampling)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        logp, top_ids, values, tail = teacher_topk(self.model, batch, self.top_k, self.chunk_size, self.sampling)
        scored = {"token_ids": ids[mask], "logprobs": logp[mask], "lengths": mask.sum(dim=1)}
        return {"ids": batch["ids"], **scored, **dict(zip(TEACHER_COLUMNS, (top_ids.int(), values, tail)))}


def cache_logprobs(
    data: PearDataModule,
    output: str | Path,
    model: str,
    trainer: Trainer | None = None,
    shard_size: int = 10_000,
    splits: Sequence[str] = ("train",),
    teacher_top_k: int = 0,
    teacher: str | None = None,
    teacher_dtype: Literal["float32", "float16"] = "float32",
    logprob_chunk_size: ChunkSize = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """Score ``data``'s ``splits`` with the behaviour ``model`` into the cache folder ``output`` (see the module).

    Args:
        data: the run's data: its sources, tokenizer, chat template, ``max_length`` and sampling settings decide
            the cached tokens and the distribution they are scored under.
        output: the cache folder to write (or to finish).
        model: the behaviour model.
        trainer: the Lightning trainer that runs predict (devices, strategy, precision); default: one device.
        shard_size: examples per Parquet shard.
        splits: the data splits to score (training uses `train`).
        teacher_top_k: store a teacher's top k per response token (0: none).
        teacher: the teacher model (default: the behaviour model).
        teacher_dtype: float32 or float16: the top-k log-probs' type.
        logprob_chunk_size: loss tokens projected to the vocabulary at once.
        trust_remote_code: allow the model folders to run their own code.
        attn_implementation: transformers' attention implementation.

    Returns:
        The cache's manifest.

    Raises:
        PearError: for unknown splits, a bad output, ids that repeat, or a cache of other inputs there.
    """
    trainer = trainer or Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, devices=1)
    if data.mixture and "train" in splits:
        first = data.mixture[0]
        raise PearError(
            "cache_logprobs: data.mixture has several training sources, each with its own π_β, so each is scored "
            "into its own cache: `python -m pear_lightning cache_logprobs --config <this config> --data.mixture null "
            f"--data.train_path {first.path} --output <its cache>` (with that source's data.sampling), then give "
            f'the source its logprobs_path (e.g. source "{first.name}")'
        )
    unknown = [s for s in splits if s not in data.paths]
    if unknown or shard_size < 1:
        raise PearError(f"cache_logprobs: --splits must name data splits {list(data.paths)} and --shard_size be >= 1")
    writer = ShardWriter(output, "cache", CACHE_INPUTS, trainer.is_global_zero)
    writer.check()
    tokenized = {s: data.tokenized(s) for s in splits if data.paths[s]}
    if not tokenized:
        raise PearError(f"cache_logprobs: none of the splits {list(splits)} has a data path in the config")
    for split, dataset in tokenized.items():
        check_unique_ids(dataset, data.paths[split])  # the cache is keyed by id: one row per id
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as err:
        raise load_error("model.model_name_or_path", model, "a model config", err) from err
    check_example_positions(model, config, data.longest(tuple(tokenized)))
    entry = teacher_entry(teacher or model, teacher_top_k, teacher_dtype, data.load_tokenizer(), trust_remote_code)
    inputs = describe_inputs(data, tokenized, model, config, str(trainer.precision), entry)
    if writer.start(inputs):
        rank_zero_info(f"{output}: complete already, nothing to do")
        return inputs
    options, own_teacher = (logprob_chunk_size, trust_remote_code, attn_implementation), entry and entry["model"]
    scorers = [Scorer(model, entry["top_k"] if own_teacher == model else 0, *options)]  # the behaviour log-probs
    if own_teacher and own_teacher != model:
        scorers.append(Scorer(own_teacher, entry["top_k"], *options))  # the teacher's columns
    for split, dataset in tokenized.items():
        sampling = data.sampling_of(split)
        for k, start in enumerate(range(0, len(dataset), shard_size)):
            subset = dataset.select(range(start, min(start + shard_size, len(dataset))))
            name = f"{split}-{k:05d}.parquet"

            def make(subset: Dataset = subset, sampling: SamplingSettings = sampling, name: str = name) -> Any:
                rows = score(trainer, data, subset, scorers, sampling)
                check_kept(rows, data.paths[subset_split(name)], sampling)
                rank_zero_info(f"{Path(output) / name}: {len(rows)} examples scored")
                return shard_table(rows, entry["dtype"] if entry else None)

            writer.shard(name, make, rows=len(subset))
    shards = {s: [x for x in writer.shards if subset_split(x["file"]) == s] for s in tokenized}  # by split
    tokens = {split: sum(dataset["num_loss_tokens"]) for split, dataset in tokenized.items()}
    manifest = writer.finish({"shards": shards, "tokens": tokens})
    rank_zero_info(f"{output}: cache complete ({', '.join(f'{s}: {len(d)} examples' for s, d in tokenized.items())})")
    return manifest


def subset_split(shard: str) -> str:
    """The split a shard's file name (``<split>-<k>.parquet``) belongs to."""
    return shard.rsplit("-", 1)[0]


def describe_inputs(
    data: PearDataModule,
    splits: dict[str, Dataset],
    model: str,
    config: Any,
    precision: str,
    teacher: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything the cached numbers depend on; a resumed run must match it exactly."""
    return {
        "format_version": FORMAT_VERSION,
        "pear_lightning_version": __version__,
        "behavior_model": model,
        "behavior_model_config_fingerprint": model_fingerprint(config.to_dict()),
        "tokenizer": data.tokenizer_name_or_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(data.load_tokenizer()),
        "max_length": data.max_length,
        "precision": precision,
        "teacher": teacher,
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


def score(
    trainer: Trainer, data: PearDataModule, subset: Dataset, scorers: list[Scorer], sampling: SamplingSettings
) -> list[dict]:
    """Score ``subset`` with each of ``scorers`` in turn (the behaviour log-probs from the first, under ``sampling``;
    the teacher's columns from the last) and return the merged rows, in ``subset``'s order, on every rank."""
    rows = [dict(row) for row in _score(trainer, data, subset, scorers[0], sampling)]
    for scorer in scorers[1:]:
        for row, scored in zip(rows, _score(trainer, data, subset, scorer, None)):
            row.update({c: scored[c] for c in TEACHER_COLUMNS})
    return rows


def _score(
    trainer: Trainer, data: PearDataModule, subset: Dataset, scorer: Scorer, sampling: SamplingSettings | None
) -> list[dict]:
    """Score ``subset`` on every rank's share of it and return all rows, in ``subset``'s order, on every rank."""
    scorer.sampling = sampling
    collate_fn = partial(collate, pad_id=data.load_tokenizer().pad_token_id)
    workers = loader_workers(data.num_workers, trainer)
    loader = DataLoader(subset, batch_size=data.batch_size, collate_fn=collate_fn, **workers)
    predictions = trainer.predict(scorer, dataloaders=loader, return_predictions=True) or []
    rows = [row for prediction in predictions for row in prediction_rows(prediction)]
    if trainer.world_size > 1:
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(trainer.world_size)]
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    by_id = {row["id"]: row for row in rows}
    return [by_id[ex_id] for ex_id in subset["id"]]


def teacher_entry(
    path: str, top_k: int, dtype: str, tokenizer: PreTrainedTokenizerBase, trust: bool
) -> dict[str, Any] | None:
    """The manifest's ``teacher``: model, config hash, K, dtype, vocabulary size; None when ``top_k`` is 0.

    Raises:
        PearError: if ``top_k`` < 1, the dtype is unknown, or the teacher's tokenizer has another vocabulary than the
            run's (its token ids would mean other strings).
    """
    if top_k == 0:
        return None
    if top_k < 1 or dtype not in TEACHER_DTYPES:
        raise PearError(f"--teacher_top_k must be >= 1 and --teacher_dtype one of {list(TEACHER_DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except LOAD_ERRORS as err:
        raise load_error("--teacher", path, "a model config", err) from err
    try:
        own = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (*LOAD_ERRORS, ValueError):
        own = None  # a folder without tokenizer files: the run's tokenizer is taken as the teacher's
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise PearError(
            f"--teacher {path}: its tokenizer's vocabulary is not the run's ({vocabulary_difference(own, tokenizer)}); "
            "distillation compares the teacher's and the student's probabilities token id by token id, so the "
            "teacher must share the student's tokenizer"
        )
    vocab = getattr(config, "vocab_size", None) or len(tokenizer)
    return {
        "model": path,
        "model_config_fingerprint": model_fingerprint(config.to_dict()),
        "top_k": min(top_k, vocab),
        "dtype": dtype,
        "vocab_size": vocab,
    }


def vocabulary_difference(own: PreTrainedTokenizerBase, run: PreTrainedTokenizerBase) -> str:
    """How two vocabularies differ, in words: their sizes, or the token ids they map to other strings."""
    if len(own) != len(run):
        return f"{len(own)} tokens, the run's {len(run)}"
    theirs, ours = own.get_vocab(), run.get_vocab()
    moved = sorted((i, t) for t, i in theirs.items() if ours.get(t) != i)
    by_id = {i: t for t, i in ours.items()}
    i, token = moved[0]
    example = f"id {i}: {token!r}, the run's {by_id.get(i)!r}"
    return f"both {len(run)} tokens, but {len(moved)} ids map to other strings, e.g. {example}"


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
    """One ``{"id", "token_ids", "logprobs"}`` row per example of a ``Scorer.predict_step`` output (with a
    ``top_k``, the teacher columns too: each token's top-k flattened, token-major)."""
    columns = ["token_ids", "logprobs", *(c for c in TEACHER_COLUMNS if c in prediction)]
    flat = {c: prediction[c].flatten().tolist() for c in columns}
    width = {c: prediction[c].shape[1] if prediction[c].dim() == 2 else 1 for c in columns}
    ends = prediction["lengths"].cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [
        {"id": ex_id, **{c: flat[c][start * width[c] : end * width[c]] for c in columns}}
        for ex_id, start, end in zip(prediction["ids"], starts, ends)
    ]

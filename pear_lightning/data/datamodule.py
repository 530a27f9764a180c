"""PearDataModule: examples from any ``datasets`` source, tokenised once, with behaviour log-probs joined."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow.compute as pc
import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from pear_lightning.data.cache import load_cache, read_manifest
from pear_lightning.data.checks import check_behavior_columns, check_unique_ids, response_ids
from pear_lightning.data.collate import collate
from pear_lightning.data.join import join_behavior
from pear_lightning.data.loader import EpochRandomSampler, ResumableLoader, loader_workers
from pear_lightning.data.mixture import MixtureSampler, MixtureSource, Source, mix, mixture_views, summary
from pear_lightning.data.render import example_id, load_tokenizer, tokenize_example, turn_end
from pear_lightning.data.sources import generated_manifest, load_examples, no_examples
from pear_lightning.errors import PearError
from pear_lightning.sampling import SamplingSettings

SPLITS = ("train", "val", "test", "predict")
ID = "pear_example_id"  # the id column while it is made (see `tokenized`)


class PearDataModule(L.LightningDataModule):
    """Token batches of SFT examples, with the behaviour policy's log-probs when the data carries them.

    Examples have ``messages`` (chat; loss on assistant turns) or ``prompt`` + ``completion`` and an
    optional ``id`` (else a content hash). An example with its generator's response ``token_ids`` is
    trained on exactly those ids after its prompt (see ``render.tokenize_example``). The behaviour
    policy's log-probs of the response tokens come from a cache made by ``cache_logprobs``
    (``logprobs_path``) or from the data itself: a list column of ``token_ids`` and one of per-token
    ``logprobs``. Either way the join is token-exact, or training does not start. The training examples may also be a
    ``mixture`` of sources, each with its own behaviour log-probs, sampling settings and share of every epoch.

    Args:
        train_path: training examples: a .jsonl/.json/.parquet file, a saved dataset folder, or a hub name.
        mixture: training examples from several sources instead of ``train_path``: each a name, a path and a weight
            (its share of every epoch), with its own ``logprobs_path``, ``sampling``, ``token_ids_column`` and
            ``logprobs_column`` where they differ from the ones here (see ``mixture``).
        val_path: validation examples, same forms.
        test_path: test examples, same forms.
        predict_path: examples to score with ``predict``, same forms.
        tokenizer_name_or_path: the tokenizer (the CLI sets it to the model's).
        batch_size: examples per micro-batch.
        max_length: tokens kept per example; longer ones are cut at the end and counted.
        packing: lay each training micro-batch's examples out several to a row of at most ``max_length`` tokens, with
            positions restarting per example, instead of one padded row each: fewer padding tokens, the same
            examples, losses and gradients (attention stays within each example; see ``collate``).
        num_workers: DataLoader worker processes; by default none on a CPU and 2 on a GPU (measured, see
            ``sampling.loader_workers``).
        shuffle: shuffle the training examples every epoch (seeded by ``seed_everything``).
        logprobs_path: a cache folder written by ``python -m pear_lightning cache_logprobs``; it takes
            precedence over log-prob columns in the data.
        token_ids_column: column with each example's response token ids as its generator sampled them; they are
            the trained response tokens (for a prompt, or a conversation with one assistant turn).
        logprobs_column: column with the behaviour policy's log-prob of each of those tokens: log π_β, where π_β is
            the distribution that sampled them (see ``sampling``).
        sampling: how the data's responses were sampled (temperature, top-k, top-p, min-p), when the data does
            not say so itself (a ``generate`` output folder does); by default, at temperature 1 without truncation.
            ``cache_logprobs`` scores under it, and a cache scored under other settings is refused.
        drop_misaligned: drop (and count) examples whose behaviour log-probs do not line up, instead of
            stopping; off by default, because misaligned ratios are silently wrong ratios.
        max_drop_fraction: with ``drop_misaligned``, stop anyway when more than this fraction would be dropped.
        trust_remote_code: allow the tokenizer to run code from its folder or the hub.
    """

    def __init__(
        self,
        train_path: str | None = None,
        mixture: list[MixtureSource] | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        tokenizer_name_or_path: str | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        packing: bool = False,
        num_workers: int | None = None,
        shuffle: bool = True,
        logprobs_path: str | None = None,
        token_ids_column: str = "token_ids",
        logprobs_column: str = "logprobs",
        sampling: SamplingSettings | None = None,
        drop_misaligned: bool = False,
        max_drop_fraction: float = 0.01,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise PearError(f"data: batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.paths = {"train": train_path, "val": val_path, "test": test_path, "predict": predict_path}
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.packing = packing
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.logprobs_path = logprobs_path
        self.token_ids_column = token_ids_column
        self.logprobs_column = logprobs_column
        self.sampling = sampling.check("data.sampling") if sampling is not None else None
        self.drop_misaligned = drop_misaligned
        self.max_drop_fraction = max_drop_fraction
        self.trust_remote_code = trust_remote_code
        self.mixture = mixture_views(mixture, self.source("train")) if mixture is not None else []  # checked
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Dataset] = {}  # tokenised; the training split with its joined `behavior_logp`
        self.parts: dict[str, list[tuple[Source, Dataset]]] = {}  # each split's, by source (a mixture has several)
        self._tokenized: dict[str, Dataset] = {}  # by source key: prepare_data's, reused by setup in the same process

    @property
    def source_names(self) -> list[str]:
        """The names of the mixture's sources, by the ``source`` index of a batch's examples; none without one."""
        return [source.name for source in self.mixture]

    def source(self, split: str) -> Source:
        """``split``'s one path, read with the ``data.*`` settings."""
        return Source(
            split, self.paths[split], self.logprobs_path, self.token_ids_column, self.logprobs_column, self.sampling
        )

    def sources(self, split: str) -> list[Source]:
        """Where ``split``'s examples come from: the mixture's sources for training with ``mixture``, else the split's
        one path (none when it has no path)."""
        if split == "train" and self.mixture:
            return self.mixture
        return [self.source(split)] if self.paths[split] else []

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load the tokenizer once (see ``render.load_tokenizer``)."""
        if self.tokenizer is None:
            if self.tokenizer_name_or_path is None:
                raise PearError("data.tokenizer_name_or_path is not set (the CLI sets it to model.model_name_or_path)")
            self.tokenizer = load_tokenizer(self.tokenizer_name_or_path, self.trust_remote_code)
        return self.tokenizer

    def prepare_data(self) -> None:
        """Tokenise every configured split (every source) once on rank 0, so other ranks read the ``datasets`` cache."""
        for split in SPLITS:
            for source in self.sources(split):
                with source.named():
                    self.tokenized(source)

    def setup(self, stage: str) -> None:
        """Load the tokenised splits the stage needs; a mixture's sources each with their own behaviour log-probs,
        then one line per source (``summary``)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in needed:
            if split in self.datasets or not self.sources(split):
                continue
            parts = self.parts[split] = [(source, self._load(source)) for source in self.sources(split)]
            self.datasets[split] = parts[0][1]
            if split == "train" and self.mixture:
                self.datasets[split] = mix(parts)
                for line in summary(parts, [self.sampling_of(source) for source in self.mixture]):
                    rank_zero_info(line)
        if stage == "fit" and not self.sources("train"):
            raise PearError("data.train_path (or data.mixture) is required for fit")

    def _load(self, source: Source) -> Dataset:
        with source.named():
            self.sampling_of(source)  # the declared sampling must agree with what a generate folder records
            data = self.tokenized(source)
            # Only training weighs tokens by π_θ/π_β; evaluation reports the plain likelihood.
            return self.with_behavior(source, data) if source.split == "train" else data

    def longest(self, splits: tuple[str, ...] = SPLITS) -> tuple[int, str, str] | None:
        """The longest tokenised example of ``splits`` (those loaded or tokenised): its tokens, id and data path."""
        found = None
        for split in splits:
            parts = self.parts.get(split) or [(s, self._tokenized.get(s.key)) for s in self.sources(split)]
            for source, data in parts:
                if data is None or len(data) == 0:
                    continue
                lengths = pc.list_value_length(data.data.column("input_ids"))
                index = pc.index(lengths, pc.max(lengths)).as_py()
                if found is None or lengths[index].as_py() > found[0]:
                    found = (lengths[index].as_py(), data[index]["id"], source.path)
        return found

    def tokenized(self, split: str | Source) -> Dataset:
        """Load the examples of ``split`` (its one path) or of one ``Source``, tokenise them (cached by ``datasets``),
        and drop and count those with no response token left after truncation (once per process: its messages are
        not repeated).

        Raises:
            PearError: on a missing file, a malformed row, or a split with no trainable example.
        """
        source = self.source(split) if isinstance(split, str) else split
        if source.key in self._tokenized:
            return self._tokenized[source.key]
        path = source.path
        tokenizer = self.load_tokenizer()
        raw = load_examples(path)
        ids_column, logprobs_column = source.token_ids_column, source.logprobs_column
        consumed = {"messages", "prompt", "completion", "id", "finish_reason", ids_column, logprobs_column}
        max_length, vocab_size = self.max_length, len(tokenizer)

        if len(raw) == 0:
            raise PearError(no_examples(path))

        def tokenize(example: dict[str, Any], index: int) -> dict[str, Any]:
            ex_id = example_id(example)
            where = f"{path} row {index + 1} (id {ex_id})"
            ids = response_ids(example.get(ids_column), ids_column, vocab_size, where)
            finish = example.get("finish_reason")
            finish = finish.get("type") if isinstance(finish, dict) else finish  # SGLang: {"type": "stop", ...}
            out = tokenize_example(example, tokenizer, max_length, where, ids, finish)
            return {**out, ID: ex_id, "row": index + 1}  # rows are counted from 1 in every message

        data = raw.map(
            tokenize,
            with_indices=True,
            remove_columns=[c for c in raw.column_names if c in consumed],
            desc=f"Tokenising {source.label}",
        ).rename_column(ID, "id")  # ids are strings, whatever type the raw column has
        self._report_generated(source, data)
        empty = data["num_loss_tokens"].count(0)
        truncated = sum(data["truncated"])
        first = sum(data["untrainable_first"])
        if empty == len(data):
            raise PearError(
                f"{path}: none of its {len(data)} examples has a response token within max_length={max_length}; "
                "raise data.max_length or shorten the prompts"
            )
        if truncated or empty or first:
            starts = f"{first} begin with a response token, which nothing precedes to predict it from: not trained on; "
            rank_zero_info(
                f"{source.label} ({path}): {truncated} of {len(data)} examples truncated to max_length={max_length}; "
                f"{starts if first else ''}{empty} skipped because no response token was left"
            )
            data = data.filter(lambda n: n > 0, input_columns="num_loss_tokens")
        self._tokenized[source.key] = data
        return data

    def _report_generated(self, source: Source, data: Dataset) -> None:
        """Say how many examples train on their generator's ids, and how their responses end."""
        generated = sum(data["generated"])
        if not generated:
            return
        end = self.load_tokenizer().decode(turn_end(self.load_tokenizer()).trained)
        rank_zero_info(
            f"{source.label} ({source.path}): {generated} of {len(data)} examples train on their generator's "
            f"`{source.token_ids_column}` (not re-tokenised); {sum(data['end_of_turn_added'])} of them had the "
            f'end-of-turn token {end!r} added (finish_reason "stop", ids without it); {sum(data["unfinished"])} '
            "end without it and are trained as cut off"
        )

    def sampling_of(self, split: str | Source) -> SamplingSettings:
        """The distribution that sampled the responses of ``split`` (its one path) or of one ``Source``: its declared
        sampling (``data.sampling``), else what the manifest of a ``generate`` output folder records, else
        temperature 1 without truncation.

        Raises:
            PearError: if the declared sampling and the folder's manifest disagree.
        """
        source = self.source(split) if isinstance(split, str) else split
        declared, manifest = source.sampling, generated_manifest(source.path)
        recorded = SamplingSettings(**manifest["sampling"]) if manifest else None
        if declared is not None and recorded is not None and declared != recorded:
            raise PearError(
                f"{source.sampling_key} ({declared.describe()}) contradicts {source.path}, whose manifest records "
                f"it was sampled with {recorded.describe()}; leave {source.sampling_key} unset for this data"
            )
        return declared or recorded or SamplingSettings()

    def with_behavior(self, split: str | Source, data: Dataset) -> Dataset:
        """Join the behaviour log-probs of ``split`` (its one path) or of one ``Source``, from the cache or the data's
        own columns, if there are any: the examples then carry ``behavior_logp``, one value per trained response token.

        Raises:
            PearError: if the cache does not belong to this tokenizer and data, or examples do not join.
        """
        source = self.source(split) if isinstance(split, str) else split
        path, teacher, cache = source.path, None, source.logprobs_path
        ids_column, logprobs_column = source.token_ids_column, source.logprobs_column
        if cache:
            if logprobs_column in load_examples(path).column_names:
                rank_zero_info(
                    f"{source.label} ({path}): its own `{logprobs_column}` column is not used: the behaviour log-probs "
                    f"come from {source.logprobs_key}={cache}"
                )
            check_unique_ids(data, path)
            sampling = self.sampling_of(source)
            keys = (source.logprobs_key, source.sampling_key)
            behavior = load_cache(cache, source.split, self.load_tokenizer(), path, sampling, *keys)
            teacher = read_manifest(Path(cache)).get("teacher")  # with it, the teacher's top-k columns
            where = f"{path} with {cache}"
        else:
            raw = load_examples(path)
            if logprobs_column not in raw.column_names:
                return data
            if ids_column not in raw.column_names:
                raise PearError(
                    f"{path}: has `{logprobs_column}` but no `{ids_column}`; the behaviour log-probs "
                    "must come with the token ids they score, so that they can be checked against the trainer's"
                )
            check_behavior_columns(raw, path, ids_column, logprobs_column)
            # A new column name: `map` would keep the type of the raw `id` column (int, or JSON for mixed types).
            ids = raw.map(lambda ex: {ID: example_id(ex)}, remove_columns=raw.column_names, desc="Reading ids")[ID]
            behavior = raw.select_columns([ids_column, logprobs_column])
            behavior = behavior.rename_columns({ids_column: "token_ids", logprobs_column: "logprobs"})
            behavior = behavior.add_column("id", ids)
            check_unique_ids(data, path)
            where = path
        return join_behavior(data, behavior, where, self.drop_misaligned, self.max_drop_fraction, teacher)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise PearError(f"data.{split}_path is not set")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            collate_fn=partial(collate, pad_id=self.load_tokenizer().pad_token_id),
            **loader_workers(self.num_workers, self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches, shuffled unless ``shuffle`` is off (a mixture's: each epoch's draw, ``MixtureSampler``);
        a run resumed mid-epoch continues the epoch where it stopped, in the same order."""
        if "train" not in self.datasets:
            raise PearError("data.train_path is not set")
        dataset, seed = self.datasets["train"], torch.initial_seed()
        pack_length = self.max_length if self.packing else None
        if self.mixture:
            sizes = [len(data) for _, data in self.parts["train"]]
            sampler = MixtureSampler(sizes, [source.weight for source in self.mixture], seed, self.shuffle)
        else:
            sampler = EpochRandomSampler(dataset, seed=seed) if self.shuffle else None
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=partial(collate, pad_id=self.load_tokenizer().pad_token_id, pack_length=pack_length),
            **loader_workers(self.num_workers, self.trainer),
            trained_batches=self._trained_batches,
        )

    def _trained_batches(self) -> int:
        # `processed`: a checkpoint written in on_train_batch_end is taken before `completed` counts that batch.
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order; none (validation is skipped) without ``val_path``."""
        return self._loader("val") if self.paths["val"] else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Batches to score, in file order."""
        return self._loader("predict")

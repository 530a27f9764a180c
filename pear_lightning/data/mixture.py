"""Training mixtures: several sources of examples, each with its own behaviour policy (its log-probs or cache, its
sampling settings) and its share of every epoch; the per-source view of the data settings that every split is read
with; and each epoch's seeded draw.

An epoch draws as many examples as all the sources hold together (after tokenisation and the join), each source
``round(weight share × that total)`` of them (largest remainders, so the counts add up). A source smaller than its
share is repeated: whole passes in a fresh random order, then part of one more; a larger one is subsampled: the first
of a random order. The orders depend only on the seed and the epoch (another draw every epoch, the same on resume).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import Sampler

from pear_lightning.data.cache import TEACHER_COLUMNS
from pear_lightning.data.loader import epoch_seed
from pear_lightning.errors import PearError
from pear_lightning.sampling import SamplingSettings

NAME = re.compile(r"[A-Za-z0-9_-]+")  # a source's name is part of its metrics' names (train/<name>/ess)
BEHAVIOR_COLUMNS = ("behavior_logp", *TEACHER_COLUMNS)  # what a source's log-probs add to its examples
TRAINED_COLUMNS = ("id", "row", "input_ids", "loss_mask", "num_loss_tokens", "truncated", *BEHAVIOR_COLUMNS)
SOURCE = "source"  # the column (and batch key) of each example's source index


@dataclass(frozen=True)
class MixtureSource:
    """One source of a training mixture (``data.mixture``): its examples, its share of each epoch, its behaviour
    policy's log-probs and how it sampled them. Unset settings are the ``data.*`` ones.

    Args:
        name: names the source in messages, the setup lines and its metrics (``train/<name>/ess``): letters, digits,
            ``_`` and ``-``.
        path: its examples, in any form ``data.train_path`` takes (a ``generate`` folder declares its sampling).
        weight: its share of each epoch's examples, relative to the other sources' weights (a positive number).
        logprobs_path: its behaviour log-prob cache, made by ``cache_logprobs`` with ``--data.train_path`` this path;
            it takes precedence over the source's log-prob column.
        sampling: how its responses were sampled (default: ``data.sampling``; a ``generate`` folder records it).
        token_ids_column: its column of response token ids (default: ``data.token_ids_column``).
        logprobs_column: its column of behaviour log-probs (default: ``data.logprobs_column``).
    """

    name: str | None = None
    path: str | None = None
    weight: float | None = None
    logprobs_path: str | None = None
    sampling: SamplingSettings | None = None
    token_ids_column: str | None = None
    logprobs_column: str | None = None


@dataclass(frozen=True)
class Source:
    """The settings one set of examples is read, checked and joined with: a split's one path with the ``data.*``
    settings, or one source of ``data.mixture`` with its own (see ``MixtureSource.view``)."""

    split: str
    path: str | None
    logprobs_path: str | None
    token_ids_column: str
    logprobs_column: str
    sampling: SamplingSettings | None  # as declared; None: not declared (see PearDataModule.sampling_of)
    name: str | None = None  # set for a mixture's source
    index: int = 0
    weight: float = 1.0
    sampling_key: str = "data.sampling"  # how messages name the settings
    logprobs_key: str = "data.logprobs_path"

    @property
    def key(self) -> str:
        """Unique among the run's sources: the split, or the split and the source's name."""
        return self.split if self.name is None else f"{self.split}/{self.name}"

    @property
    def label(self) -> str:
        """How the data module's information lines name it: the split, or the source."""
        return self.split if self.name is None else f"source {self.name}"

    @property
    def title(self) -> str:
        """How messages name a mixture's source: ``data.mixture[1] (name "logic")``."""
        return f'data.mixture[{self.index}] (name "{self.name}")'

    @contextmanager
    def named(self) -> Iterator[None]:
        """Put the source's title before any ``PearError`` raised inside, for a mixture's source."""
        try:
            yield
        except PearError as err:
            if self.name is None:
                raise
            raise PearError(f"{self.title}: {err}") from err


def mixture_views(mixture: list[MixtureSource | dict], defaults: Source) -> list[Source]:
    """Check ``data.mixture`` and return each source's view, its unset settings taken from ``defaults`` (the
    ``data.*`` settings, as the view of ``data.train_path``).

    Raises:
        PearError: naming the source, for a missing or repeated name, a name unfit for a metric, a missing path, or a
            weight that is not a positive finite number; for an empty mixture, or one beside ``data.train_path`` or
            ``data.logprobs_path``.
    """
    if not mixture:
        raise PearError(
            "data.mixture is empty: give it at least one source ({name, path, weight}), or use data.train_path"
        )
    names = ", ".join(f'"{s.get("name") if isinstance(s, dict) else s.name}"' for s in mixture)
    if defaults.path:
        raise PearError(
            f"data.mixture (sources {names}) and data.train_path={defaults.path} are both set: give the training "
            "examples as one or the other (data.train_path is the one-source shorthand)"
        )
    if defaults.logprobs_path:
        raise PearError(
            f"data.mixture (sources {names}) and data.logprobs_path={defaults.logprobs_path} are both set: a cache "
            "holds the log-probs of one source's examples; give each source its own logprobs_path"
        )
    views, seen = [], {}
    for index, given in enumerate(mixture):
        source = check_source(index, MixtureSource(**given) if isinstance(given, dict) else given, seen)
        title = f'data.mixture[{index}] (name "{source.name}")'
        views.append(
            replace(
                defaults,
                split="train",
                path=source.path,
                logprobs_path=source.logprobs_path,
                token_ids_column=source.token_ids_column or defaults.token_ids_column,
                logprobs_column=source.logprobs_column or defaults.logprobs_column,
                sampling=source.sampling.check(f"{title}: sampling") if source.sampling else defaults.sampling,
                name=source.name,
                index=index,
                weight=float(source.weight),
                sampling_key="sampling" if source.sampling else defaults.sampling_key,
                logprobs_key="logprobs_path",
            )
        )
    return views


def check_source(index: int, source: MixtureSource, seen: dict[str, int]) -> MixtureSource:
    """Return ``data.mixture[index]`` if it has a name (not one of ``seen``, which it joins), a path and a weight.

    Raises:
        PearError: naming the source and what is wrong.
    """
    title = f'data.mixture[{index}] (name "{source.name}")' if source.name else f"data.mixture[{index}]"
    if not source.name:
        raise PearError(f"{title}: has no name; give every source a name (it names the source's metrics)")
    if not NAME.fullmatch(source.name):
        raise PearError(
            f"{title}: the name may hold only letters, digits, _ and - (it names the source's metrics, "
            f"train/{source.name}/ess)"
        )
    if source.name in seen:
        raise PearError(f"{title}: the name is data.mixture[{seen[source.name]}]'s too; give each source its own")
    seen[source.name] = index
    if not source.path:
        raise PearError(f"{title}: has no path; give the file or folder of its examples")
    weight = source.weight
    if weight is None:
        raise PearError(f"{title}: has no weight; give its share of each epoch (a positive number)")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        shown = f"{weight:g}" if isinstance(weight, (int, float)) else repr(weight)
        raise PearError(f"{title}: weight must be a positive finite number, got {shown}")
    return source


def epoch_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many examples of each source an epoch draws: shares of the weights of ``sum(sizes)``, rounded so that
    they add up to it (largest remainders, ties to the earlier source)."""
    total, weight = sum(sizes), sum(weights)
    exact = [w / weight * total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(parts: list[tuple[Source, Dataset]]) -> Dataset:
    """The sources' examples in one dataset, in order, with each one's source index in a ``source`` column.

    Raises:
        PearError: naming the source whose behaviour log-probs (or teacher's top-k) the first source's examples have
            and it has not, or the other way round: every source needs the same.
    """
    first, first_data = parts[0]
    given = [c for c in BEHAVIOR_COLUMNS if c in first_data.column_names]
    for source, data in parts:
        if len(data) == 0:
            raise PearError(f"{source.title}: no example is left to train on")
        own = [c for c in BEHAVIOR_COLUMNS if c in data.column_names]
        if own != given:
            raise PearError(
                f"{source.title}: its examples have {gives(own)}, but those of {first.title} have {gives(given)}; "
                "every source of a mixture needs the same: behaviour log-probs (a logprobs_path, or token_ids and "
                "logprobs columns) for all of them, or for none"
            )
    keep = [c for c in TRAINED_COLUMNS if c in first_data.column_names]
    return concatenate_datasets(
        [data.select_columns(keep).add_column(SOURCE, [source.index] * len(data)) for source, data in parts]
    )


def summary(parts: list[tuple[Source, Dataset]], samplings: list[SamplingSettings]) -> list[str]:
    """One line per source of a mixture: its examples and trained tokens, its draws per epoch and their share, where
    its behaviour log-probs come from and how it was sampled (``samplings``, one per source)."""
    counts = epoch_counts([len(data) for _, data in parts], [source.weight for source, _ in parts])
    lines = []
    for (source, data), count, sampling in zip(parts, counts, samplings):
        if "behavior_logp" not in data.column_names:
            origin = gives([])
        elif source.logprobs_path:
            origin = f"log-probs from {source.logprobs_key}={source.logprobs_path}"
        else:
            origin = f"log-probs from its `{source.logprobs_column}` column"
        lines.append(
            f"{source.label} ({source.path}): {len(data):,} examples ({sum(data['num_loss_tokens']):,} trained "
            f"tokens), {count:,} per epoch ({count / sum(counts):.1%}, weight {source.weight:g}); {origin}, "
            f"sampled with {sampling.describe()}"
        )
    return lines


def gives(columns: list[str]) -> str:
    """What the behaviour columns of a source's examples hold, in words."""
    if not columns:
        return "no behaviour log-probs"
    return "behaviour log-probs" + (" and a teacher's top-k" if len(columns) > 1 else "")


class MixtureSampler(Sampler[int]):
    """Each epoch's draw of a mixture (see the module's docstring): indices into the sources' examples laid end to
    end, shuffled together; with ``shuffle`` off, each source's examples in file order (cycled when repeated) and the
    sources interleaved evenly. The draw depends only on ``seed`` and the epoch (Lightning sets it).

    Args:
        sizes: the examples of each source, in the order they are laid out.
        weights: each source's weight.
        seed: seeds every epoch's draw.
        shuffle: draw at random; off: file order.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int, shuffle: bool = True) -> None:
        self.sizes, self.counts = sizes, epoch_counts(sizes, weights)
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw ``epoch``'s examples from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[int]:
        # Drawn anew on every pass: Lightning may start an iterator more than once in an epoch (e.g. on resume).
        return iter(self.draw(self.epoch).tolist())

    def draw(self, epoch: int) -> torch.Tensor:
        """The indices ``epoch`` draws, in the order they are trained."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        picks, offset = [], 0
        for size, count in zip(self.sizes, self.counts):
            if self.shuffle:
                passes = [torch.randperm(size, generator=generator) for _ in range(-(-count // size))]
                order = torch.cat(passes)[:count] if passes else torch.zeros(0, dtype=torch.long)
            else:
                order = torch.arange(count) % size
            picks.append(order + offset)
            offset += size
        drawn = torch.cat(picks)
        if self.shuffle:
            return drawn[torch.randperm(len(drawn), generator=generator)]
        position = torch.cat([(torch.arange(count) + 0.5) / count for count in self.counts])
        return drawn[torch.argsort(position, stable=True)]

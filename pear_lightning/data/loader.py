"""A training DataLoader that resumes where it stopped (seeded per-epoch order, its position checkpointed), and how
many worker processes every loader gets.

Lightning saves the ``state_dict`` of a DataLoader that has one in every checkpoint and hands it
back on resume. Ours is the number of batches already trained in the current epoch, and the epoch; on
resume the first iterator skips that many batches if it is still that epoch's (collating them, without
touching the model), and the shuffled order of an epoch depends only on the seed and the epoch, so the
rest of the epoch is exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, RandomSampler

GPU_WORKERS = 2  # see loader_workers


def loader_workers(num_workers: int | None, trainer: Any | None) -> dict[str, Any]:
    """DataLoader arguments for ``data.num_workers`` under ``trainer`` (none: a CPU); workers, when there are any,
    live across epochs.

    None (the default) is measured (``python -m benchmarks.dataloader_workers``): on a CPU no workers, as they
    compete with the training step for its cores and gained nothing; on a GPU two, which take over fetching and
    collating (about 1% of a step at 8 × 1,024 tokens) while the GPU computes. Lightning's advice to add workers
    up to the core count is then silenced: that measurement says more cannot pay.
    """
    if num_workers is None:
        warnings.filterwarnings("ignore", message=".*does not have many workers", category=PossibleUserWarning)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        num_workers = GPU_WORKERS if on_gpu else 0
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0}


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s order under the run's ``seed`` (an unseeded torch's seed is 64-bit)."""
    return (seed * 1_000_003 + epoch) % 2**64


class EpochRandomSampler(RandomSampler):
    """A random permutation per epoch that depends only on ``seed`` and the epoch (Lightning sets it)."""

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # Reseeded on every pass: Lightning may start an iterator more than once in an epoch (e.g. on resume).
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        return super().__iter__()


class ResumableLoader(DataLoader):
    """A DataLoader whose checkpointed state is how many batches of the epoch have been trained.

    Args:
        *args: DataLoader's.
        trained_batches: returns the number of batches trained so far in the current epoch.
        **kwargs: DataLoader's.
    """

    def __init__(self, *args: Any, trained_batches: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches
        self._skip = 0
        self._epoch: int | None = None

    def state_dict(self) -> dict[str, int]:
        """The position in the epoch, and the epoch (when the sampler has one), for the checkpoint."""
        state = {"trained_batches": self.trained_batches()}
        if isinstance(getattr(self.sampler, "epoch", None), int):
            state["epoch"] = self.sampler.epoch
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the checkpointed position on the next iteration."""
        self._skip, self._epoch = state["trained_batches"], state.get("epoch")

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        skip, epoch, self._skip, self._epoch = self._skip, self._epoch, 0, None
        if epoch is None or not skip:  # a sampler without epochs has the same order in every epoch
            for _ in range(skip):
                if next(iterator, None) is None:
                    break
            return iterator
        return self._resume(iterator, skip, epoch)

    def _resume(self, iterator: Iterator[Any], skip: int, epoch: int) -> Iterator[Any]:
        # Runs at the first batch: Lightning makes the resumed run's first iterator before it sets the sampler's
        # epoch, and may start the next epoch with it (a checkpoint taken after an epoch's last batch).
        if self.sampler.epoch == epoch:
            for _ in range(skip):
                if next(iterator, None) is None:
                    return
        yield from iterator

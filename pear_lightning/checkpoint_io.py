"""Checkpoints written atomically and loaded ``weights_only``.

Lightning's own ``TorchCheckpointIO`` stages a checkpoint in the system temp folder and moves it, which
copies (not atomically) when that folder is on another file system, holds the whole checkpoint in memory,
and never syncs; ``AtomicCheckpointIO`` fixes all three for local paths (see ``atomic``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer

from .atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints atomically and loads them ``weights_only``.

    A checkpoint is streamed by ``torch.save`` to a hidden temporary file beside its target, synced, and
    renamed over the target, so ``last.ckpt`` is always the previous complete checkpoint or the new one.
    Remote paths (``s3://``…) keep Lightning's fsspec transaction. Loading passes ``weights_only=True``
    unless the caller asks otherwise: a checkpoint cannot run code, even where torch's default is unsafe.
    The CLI installs it in place of Lightning's default; in Python, pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (local paths) or through fsspec (remote ones)."""
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda temporary: torch.save(checkpoint, temporary))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint with ``weights_only=True`` unless ``weights_only=False`` is asked for."""
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Give ``trainer`` an ``AtomicCheckpointIO`` if it has Lightning's default one (a user's own plugin is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()

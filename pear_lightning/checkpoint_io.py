"""Crash-safe files: everything we write goes to a temporary name in its folder, is flushed to disk, then renamed.

A process killed at any moment (or a machine that loses power) leaves either the previous file or the
new one, never a torn mix: ``os.replace`` within one folder is atomic on POSIX and Windows. Lightning's
own ``TorchCheckpointIO`` stages a checkpoint in the system temp folder and moves it, which copies (not
atomically) when that folder is on another file system, holds the whole checkpoint in memory, and never
syncs; ``AtomicCheckpointIO`` fixes all three for local paths and loads checkpoints ``weights_only``.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The hidden sibling ``path`` is staged under (never matched by Lightning's ``last*.ckpt`` lookup)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` through ``write(temporary_path)``, sync it, and rename it over ``path``; then remove the
    temporaries of ``path`` that killed processes left behind.

    Args:
        path: the file to write; its folder must exist.
        write: writes the complete content to the path it is given.
    """
    temporary = temporary_name(path)
    try:
        write(temporary)
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)  # makes the rename itself durable
    finally:
        temporary.unlink(missing_ok=True)
    remove_orphans(path)


def remove_orphans(path: Path) -> None:
    """Delete the temporaries of ``path`` whose writer is no longer running on this machine (POSIX only)."""
    if os.name != "posix":
        return
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = orphan.name.rpartition("-")[2]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if orphan.is_dir():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def atomic_write_folder(path: Path, write: Callable[[Path], Any]) -> None:
    """Write the new folder ``path`` through ``write(temporary_folder)``, sync it, and rename it into place.

    Args:
        path: the folder to create; it must not exist, its parent must.
        write: writes the complete content into the folder it is given (which it may create).
    """
    temporary = temporary_name(path)
    try:
        write(temporary)
        for root, _, files in os.walk(temporary):
            for name in files:
                fsync(Path(root) / name)
            fsync(Path(root))
        os.replace(temporary, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    remove_orphans(path)


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

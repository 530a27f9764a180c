"""Checkpoints written atomically, loaded ``weights_only``, and checked for what they claim to be.

Lightning's own ``TorchCheckpointIO`` stages a checkpoint in the system temp folder and moves it, which
copies (not atomically) when that folder is on another file system, holds the whole checkpoint in memory,
and never syncs; ``AtomicCheckpointIO`` fixes all three for local paths (see ``atomic``). Sharded
checkpoints (FSDP, FSDP2: a folder of shards and Lightning's ``meta.pt``) bypass the checkpoint IO; their
strategy's save is wrapped to write a staged folder and swap it in whole (``use_atomic_checkpoints``).
"""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from pear_lightning.atomic import atomic_write, replace_folder
from pear_lightning.errors import PearError, failure_reason

SHARDED_METADATA = "meta.pt"  # Lightning's file beside the shards of a distributed checkpoint
WHAT_TO_GIVE = "give a checkpoint written by fit (a .ckpt file, or the folder a sharded run writes)"


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
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda temporary: torch.save(checkpoint, temporary))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            raise PearError(write_failure(target, err)) from err

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
    if _writes_sharded(trainer.strategy):
        _stage_sharded_saves(trainer.strategy)


def write_failure(target: Path, err: Exception) -> str:
    """The message for a checkpoint that could not be written."""
    return (
        f"could not write the checkpoint {target} ({failure_reason(err)}); the previous checkpoint in "
        f"{target.parent}, if any, is intact (it is replaced only by a complete new one): free space there or set "
        "another ModelCheckpoint dirpath, then resume with --ckpt_path last"
    )


def _writes_sharded(strategy: Strategy) -> bool:
    """Whether ``strategy`` writes distributed (sharded) checkpoints, outside the checkpoint IO."""
    if isinstance(strategy, ModelParallelStrategy):
        return strategy._save_distributed_checkpoint
    return isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "sharded"


def _stage_sharded_saves(strategy: Strategy) -> None:
    """Make ``strategy`` write each sharded checkpoint into a staging folder (``.<name>.partial``, the same name on
    every rank) and swap it in whole once every rank has written its shards, so an interrupted save never
    replaces the last complete checkpoint."""
    save = strategy.save_checkpoint

    def save_staged(checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        target = Path(strategy.broadcast(str(filepath)))
        staged = target.with_name(f".{target.name}.partial")
        if strategy.is_global_zero:
            shutil.rmtree(staged, ignore_errors=True)  # what an interrupted save left
        strategy.barrier()
        try:
            save(checkpoint, staged, storage_options)
            strategy.barrier()
            if strategy.is_global_zero:
                replace_folder(staged, target)
        except (OSError, RuntimeError) as err:
            raise PearError(write_failure(target, err)) from err
        strategy.barrier()

    strategy.save_checkpoint = save_staged


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder."""
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def read_checkpoint(path: str, setting: str) -> dict[str, Any]:
    """A checkpoint written by fit, loaded ``weights_only`` with its tensors memory-mapped (cheap to check); for a
    sharded folder, its ``meta.pt`` (everything but the weights and optimizer states).

    Raises:
        PearError: naming what ``path`` is instead: missing, a folder without a checkpoint, empty, cut short or
            another kind of file, a torch file that Lightning did not write, or one holding code.
    """
    local = Path(path)
    if not local.exists():
        resume = ", or `last` to resume from the newest one" if setting == "--ckpt_path" else ""
        raise PearError(f"{setting} {path}: file not found; {WHAT_TO_GIVE}{resume}")
    if local.is_dir() and not is_sharded(local):
        raise PearError(f"{setting} {path}: a folder that holds no checkpoint (no {SHARDED_METADATA}); {WHAT_TO_GIVE}")
    file = local / SHARDED_METADATA if local.is_dir() else local
    if file.stat().st_size == 0:
        raise PearError(f"{setting} {path}: an empty file; {WHAT_TO_GIVE}")
    if not zipfile.is_zipfile(file):  # what torch.save writes; a cut file loses the archive's directory at its end
        raise PearError(
            f"{setting} {path}: cannot be read as a checkpoint (not a torch archive: another kind of file, or one cut "
            f"short); {WHAT_TO_GIVE}"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"{named.group(1)}, " if named else ""
        raise PearError(
            f"{setting} {path}: holds objects other than tensors and plain data ({what}which could run code when "
            f"loaded), so it is not loaded; {WHAT_TO_GIVE}"
        ) from err
    except Exception as err:  # torch reports a torn or foreign file in many ways; the file is the useful part
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
        raise PearError(
            f"{setting} {path}: cannot be read as a checkpoint ({reason}); it may be cut short or another kind of "
            f"file: {WHAT_TO_GIVE}"
        ) from err
    keys = ("pytorch-lightning_version",) if local.is_dir() else ("pytorch-lightning_version", "state_dict")
    if not isinstance(state, dict) or not all(k in state for k in keys):
        raise PearError(
            f"{setting} {path}: a torch file, but not a checkpoint Lightning wrote (no {keys}); {WHAT_TO_GIVE}"
        )
    return state


def sharded_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The weights a sharded checkpoint folder holds, as meta tensors of their shapes (nothing is read), and the
    key they sit under (``state_dict`` for FSDP2's ModelParallelStrategy, ``model`` for FSDP)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    top = "state_dict" if any(k.startswith("state_dict.") for k in metadata) else "model"
    shapes = {
        k[len(top) + 1 :]: torch.empty(tuple(meta.size), device="meta")
        for k, meta in metadata.items()
        if k.startswith(f"{top}.") and hasattr(meta, "size")
    }
    return top, shapes


def load_sharded_weights(path: Path, top: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read the weights named by ``like`` (their shapes and dtypes) from a sharded checkpoint folder into this one
    process, on the CPU."""
    state = {top: {k: torch.empty_like(v, device="cpu") for k, v in like.items()}}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state[top]

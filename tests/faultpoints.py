"""Test-only fault injection: a callback that SIGKILLs its own process at the point named by ``PEAR_FAULT``.

Runs started by tests/e2e/test_crash_safety.py and tests/model/test_sharding.py name it in their config
(``faultpoints.KillSwitch``, with this folder on PYTHONPATH); it does nothing unless ``PEAR_FAULT`` is set to one of:

    step:K      during optimizer step K (after its backward, before its update)
    save:K      while the checkpoint of step K is being written: half of its bytes are on disk
    rename:K    once the checkpoint of step K is completely written, before it is renamed into place
    shards:K    while the sharded (FSDP2) checkpoint of step K is being written: every rank has written its
                shards, and dies before the checkpoint is complete
    predict:K   during predict batch K (counted from 1 over the whole run: cache_logprobs scoring)
    shard:K     while Parquet file K (counted from 1) is being written: half of its bytes are on disk

The kill patches the library's calls (``torch.save``, ``os.replace``, ``pyarrow.parquet.write_table``) only in
the process being killed, and only at the chosen moment, so everything before it runs unchanged.
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any

import lightning as L
import pyarrow.parquet as pq
import torch

FAULT_ENV = "PEAR_FAULT"


def die() -> None:
    """SIGKILL this process: no cleanup, no finally blocks, no flushing of Python buffers."""
    os.kill(os.getpid(), signal.SIGKILL)


def write_half_and_die(data: bytes, target: Any) -> None:
    """Write the first half of ``data`` to ``target`` (a path or a binary file), make it visible, and die."""
    half = data[: len(data) // 2]
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(half)
    else:
        target.write(half)
        target.flush()
    die()


class KillSwitch(L.Callback):
    """Kills the process at the point ``PEAR_FAULT`` names (module docstring); inert without it."""

    def __init__(self) -> None:
        point, _, k = os.environ.get(FAULT_ENV, "").partition(":")
        self.point, self.k = point, int(k or 0)
        self.predict_batches = 0
        if self.point == "shard":
            self._patch_write_table()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.point == "step" and trainer.global_step + 1 == self.k:
            die()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Called while the checkpoint dict is assembled, just before the checkpoint IO writes it.
        if trainer.global_step != self.k:
            return
        if self.point == "save":
            save = torch.save

            def save_half(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                write_half_and_die(buffer.getvalue(), f)

            torch.save = save_half
        elif self.point == "rename":
            os.replace = lambda *args, **kwargs: die()
        elif self.point == "shards":
            import torch.distributed.checkpoint as dcp

            save = dcp.save

            def save_and_die(*args: Any, **kwargs: Any) -> None:
                save(*args, **kwargs)
                die()

            dcp.save = save_and_die

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.predict_batches += 1
        if self.point == "predict" and self.predict_batches == self.k:
            die()

    def _patch_write_table(self) -> None:
        write_table, written = pq.write_table, []

        def write_table_or_die(table: Any, where: Any, *args: Any, **kwargs: Any) -> None:
            written.append(where)
            if len(written) < self.k:
                write_table(table, where, *args, **kwargs)
                return
            buffer = io.BytesIO()
            write_table(table, buffer, *args, **kwargs)
            write_half_and_die(buffer.getvalue(), where)

        pq.write_table = write_table_or_die

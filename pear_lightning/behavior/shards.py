"""The one resumable writer of a folder of Parquet shards, used by ``generate`` and ``cache_logprobs``.

A folder holds ``progress.json`` (the inputs, while it is written), the shards, each written atomically, and
``manifest.json`` (the inputs, the shards and the totals), written last: its presence means the folder is complete. A
run that stops resumes where it was: a shard that is there, with the rows it should have, is kept. The inputs are
everything the output depends on; a folder made (or being made) from other inputs is refused and left as it is, so
a resumed run always ends as an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pear_lightning.atomic import atomic_write, check_writable
from pear_lightning.data.cache import MANIFEST, PROGRESS, read_manifest, shard_rows
from pear_lightning.errors import PearError, failure_reason


class ShardWriter:
    """Writes ``folder`` shard by shard; every rank calls it, the main rank alone writes. A command checks the place
    first (``check``, before any work), then starts with the inputs (``start``), writes the shards (``shard``) and
    the manifest (``finish``).

    Args:
        folder: the output folder (``--output``).
        what: what the folder holds, for messages (``generation``, ``cache``).
        depends: what its inputs are, in words, for the message refusing other inputs.
        is_main: whether this process writes (the global rank 0 of a multi-device run).
    """

    def __init__(self, folder: str | Path, what: str, depends: str, is_main: bool = True) -> None:
        self.folder, self.what, self.depends, self.is_main = Path(folder), what, depends, is_main
        self.inputs: dict[str, Any] = {}
        self.shards: list[dict[str, Any]] = []

    def check(self) -> None:
        """Refuse a place where the folder cannot be: a file, or a location that cannot be written.

        Raises:
            PearError: naming ``--output`` and the reason.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise PearError(f"--output {self.folder}: a file; the {self.what} is a folder: choose another name")
        check_writable(self.folder, "--output")

    def start(self, inputs: dict[str, Any]) -> bool:
        """Record ``inputs`` (everything the output depends on, plain JSON data) in the folder; True if it holds a
        finished output of the same inputs already.

        Raises:
            PearError: if the folder cannot be written, or holds an output of other inputs.
        """
        self.check()
        output, self.inputs = self.folder, inputs
        finished, progress = read_manifest(output), output / PROGRESS
        if finished is not None:
            if {k: finished.get(k) for k in self.inputs} == self.inputs:
                return True
            raise PearError(
                f"--output {output}: holds a finished {self.what} made from other inputs ({self.depends}); it is left "
                "as it is: choose another --output, or delete that folder first"
            )
        if progress.exists() and json.loads(progress.read_text()) != self.inputs:
            raise PearError(
                f"--output {output}: holds an unfinished {self.what} for other inputs; delete that folder or choose "
                "another --output"
            )
        if self.is_main:
            output.mkdir(parents=True, exist_ok=True)
            self.write_json(output / PROGRESS, self.inputs)
        return False

    def shard(self, name: str, make: Callable[[], pa.Table], rows: int | None = None, **entry: Any) -> int:
        """Make and write shard ``name`` unless it is there already (with ``rows`` rows, when they are known ahead);
        ``make`` runs on every rank (it may be collective). Returns the shard's rows; the manifest lists it with
        ``entry``."""
        path = self.folder / name
        present = shard_rows(path)
        if present is None or (rows is not None and present != rows):
            table = make()
            if self.is_main:
                self.write(path, lambda tmp: pq.write_table(table, tmp))
            present = table.num_rows
        self.shards.append({"file": name, **entry, "rows": present})
        return present

    def finish(self, totals: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (the inputs, the shards, ``totals``, which may regroup the shards) and drop the progress
        file; returns the manifest."""
        manifest = {**self.inputs, "shards": self.shards, **totals}
        if self.is_main:
            self.write_json(self.folder / MANIFEST, manifest)
            (self.folder / PROGRESS).unlink(missing_ok=True)
        return manifest

    def write_json(self, path: Path, content: dict[str, Any]) -> None:
        """Write a JSON file of the folder atomically."""
        self.write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n"))

    def write(self, path: Path, write: Callable[[Path], Any]) -> None:
        """Write one file of the folder atomically.

        Raises:
            PearError: if it cannot be written, saying that the complete shards are kept and how to resume.
        """
        try:
            atomic_write(path, write)
        except OSError as err:
            raise PearError(
                f"could not write {path} ({failure_reason(err)}); the complete shards are kept: free space in "
                f"{path.parent} and run the same command again to resume"
            ) from err

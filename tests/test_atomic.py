"""Crash-safe files: a file is written to a temporary name beside its target and renamed over it, and the next write
of the same file removes what a killed writer left (never what a running writer is writing)."""

import os
import subprocess
import sys

from pear_lightning.atomic import atomic_write


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_writing_a_file_removes_the_temporaries_that_killed_writers_left(tmp_path):
    target = tmp_path / "shard.parquet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".shard.parquet.tmp-{dead.stdout.strip()}").write_bytes(b"torn")  # its writer has exited
    (tmp_path / f".shard.parquet.tmp-{os.getppid()}").write_bytes(b"in progress")  # its writer is running
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert temporaries(tmp_path) == [f".shard.parquet.tmp-{os.getppid()}"]

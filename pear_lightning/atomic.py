"""Crash-safe files and folders: everything we write goes to a temporary name beside its target, is flushed to
disk, then renamed.

A process killed at any moment (or a machine that loses power) leaves either the previous file or the
new one, never a torn mix: ``os.replace`` within one folder is atomic on POSIX and Windows. Every command checks its
outputs before it starts (``check_writable``, ``check_new_path``), so a place that cannot be written is refused
before any work is done.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pear_lightning.errors import PearError


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
        sync_tree(temporary)
        os.replace(temporary, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    remove_orphans(path)


def sync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and its subfolders' entries) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


def replace_folder(staged: Path, path: Path) -> None:
    """Put the complete folder ``staged`` in place of ``path`` (a folder, a file, or nothing), atomically where
    the system allows: on Linux the two are exchanged in one ``renameat2(RENAME_EXCHANGE)``, so ``path`` is
    always the old content or the new; elsewhere the old one is first moved aside, so a crash between the two
    renames leaves it complete under ``.<name>.old``. The old content is deleted afterwards."""
    sync_tree(staged)
    if not os.path.lexists(path):
        os.replace(staged, path)
    elif not _exchange(staged, path):
        aside = path.with_name(f".{path.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        os.replace(staged, path)
        staged = aside
    fsync(path.parent)
    if staged.is_dir():
        shutil.rmtree(staged, ignore_errors=True)
    else:
        staged.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def check_writable(folder: Path, setting: str) -> None:
    """Refuse a folder that could not be made or written: a file in its way, or a location that refuses writes (a
    read-only file system, permissions). A probe file is created and removed in its nearest existing folder.

    Raises:
        PearError: naming the setting, the folder and the reason.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PearError(
            f"{setting}={folder}: {existing} is a file, so no folder can be made there; choose another place"
        )
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".pear-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise PearError(
            f"{setting}={folder}: cannot write in {existing} ({err.strerror}); choose another place"
        ) from err
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PearError(f"{setting}={folder}: {existing} is not writable (permissions); choose another place")


def check_new_path(path: Path, setting: str, writes: str) -> None:
    """Refuse an output ``path`` a command creates new (it ``writes``, e.g. "export writes a new folder") where
    something already is, or whose place cannot be written."""
    if path.exists():
        raise PearError(f"{setting} {path}: exists already; {writes}, choose another name")
    check_writable(path.parent, setting)

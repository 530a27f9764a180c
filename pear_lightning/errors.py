"""The one exception type the command line shows as a plain message instead of a traceback, and the one-line
message for a model or tokenizer folder that cannot be loaded."""

import os
from pathlib import Path

from safetensors import SafetensorError


class PearError(Exception):
    """A user-facing error: says what is wrong, where (file, row, id) and what to do."""


# What ``from_pretrained`` raises for a folder it cannot read: missing or bad files, a corrupt weights file.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def looks_local(path: str) -> bool:
    """Whether ``path`` can only be a local path, not a hub name (``org/name``): it starts with ``.``, ``/`` or ``~``,
    has more than one separator, or its first part is a local folder (``models/Typo`` when ``models/`` exists)."""
    parts = Path(path).parts
    return (
        path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or os.sep + os.sep in path
        or (len(parts) > 1 and Path(parts[0]).is_dir())
    )


def refuse_missing(setting: str, path: str) -> None:
    """Refuse a local path that does not exist at once, before ``from_pretrained`` spends seconds on hub retries.

    Raises:
        PearError: naming the setting and the path.
    """
    if looks_local(path) and not Path(path).expanduser().exists():
        raise PearError(f"{setting}={path!r}: no such folder")


def load_error(setting: str, path: str, what: str, err: Exception) -> PearError:
    """A one-line ``PearError`` for a model or tokenizer that ``from_pretrained`` cannot load from ``path``;
    it says so when the folder does not exist, or needs its own code run and ``trust_remote_code`` is off."""
    if looks_local(path) and not Path(path).expanduser().exists():
        return PearError(f"{setting}={path!r}: no such folder")
    if "trust_remote_code" in str(err):
        return PearError(
            f"{setting}={path!r}: {what} needs code from its folder or repository (auto_map in its config), and "
            "model.trust_remote_code is false; set it to true if you trust that code"
        )
    return PearError(f"{setting}={path!r}: cannot load {what}: {' '.join(str(err).split())}")


def failure_reason(err: Exception) -> str:
    """Why a write failed, in a few words (``No space left on device``), from an ``OSError`` or a library's error."""
    return getattr(err, "strerror", None) or " ".join(str(err).split())

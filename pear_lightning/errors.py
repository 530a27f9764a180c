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
    """Whether ``path`` is written as a local path (``./x``, ``/x``, ``~/x``, ``a//b``) rather than a hub name."""
    return path.startswith((".", "/", "~")) or os.sep + os.sep in path


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

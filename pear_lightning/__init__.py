"""pear_lightning: SFT of causal LMs with pluggable per-token weighting strategies (PEAR and friends).

The package is the PEAR workflow, one subpackage per stage, imports flowing down: ``cli`` (the commands) uses
``demo``, ``behavior`` (π_β's side: sampling, scoring into the cache) and ``training`` (the LightningModule, the loss,
the step); those use ``model`` (loading, LoRA, FSDP2, the log-prob path), which uses ``data`` (examples, rendering, the
cache and the token-exact join, collation, the DataModule); everything uses the ground floor (``errors``, ``atomic``,
``sampling``). The names below are imported on first use, so importing one stage never loads another.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

PUBLIC = {  # short name -> the module that defines it (kinder to type in configs: pear_lightning.OneCycleLR)
    "PearDataModule": "pear_lightning.data.datamodule",
    "PearModule": "pear_lightning.training.module",
    "PearError": "pear_lightning.errors",
    "SamplingSettings": "pear_lightning.sampling",
    "OneCycleLR": "pear_lightning.training.schedule",
    "AnswerAccuracy": "pear_lightning.training.evaluate",
}
__all__ = [*PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    if name not in PUBLIC:
        raise AttributeError(f"module 'pear_lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(PUBLIC[name]), name)

"""Discovery of weighting strategies through the ``pear_lightning.strategies`` entry-point group.

Built-ins are registered in this project's pyproject exactly like third-party plugins. Loading the
group imports every strategy class, which is what lets the CLI accept them by short name.
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import EntryPoint, entry_points

from pear_lightning.strategies import WeightingStrategy

from .errors import PearError

GROUP = "pear_lightning.strategies"
STRICT_ENV = "PEAR_STRICT_PLUGINS"


def _origin(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def load_strategies() -> dict[str, type[WeightingStrategy]]:
    """Import every registered strategy and return them by entry-point name.

    A plugin that fails to import, or is not a ``WeightingStrategy`` subclass, is skipped with one
    warning naming it and its distribution; with ``PEAR_STRICT_PLUGINS=1`` it is an error instead.
    """
    strategies: dict[str, type[WeightingStrategy]] = {}
    for entry_point in entry_points(group=GROUP):
        where = f"strategy plugin {entry_point.name!r} ({entry_point.value}, from {_origin(entry_point)})"
        try:
            cls = entry_point.load()
        except Exception as err:  # a broken plugin must not take the trainer down with it
            problem = f"{where} failed to import: {type(err).__name__}: {err}"
        else:
            if isinstance(cls, type) and issubclass(cls, WeightingStrategy):
                strategies.setdefault(entry_point.name, cls)
                continue
            problem = f"{where} is not a WeightingStrategy subclass"
        if os.environ.get(STRICT_ENV) == "1":
            raise PearError(problem)
        warnings.warn(f"{problem}; skipped (set {STRICT_ENV}=1 to make this an error)", stacklevel=2)
    return strategies

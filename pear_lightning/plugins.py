"""Discovery of weighting strategies through the ``pear_lightning.strategies`` entry-point group.

Built-ins are registered in this project's pyproject exactly like third-party plugins. Loading the
group imports every strategy class, which is what lets the CLI accept them by short name.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from pear_lightning.strategies import WeightingStrategy

from .errors import PearError

GROUP = "pear_lightning.strategies"
STRICT_ENV = "PEAR_STRICT_PLUGINS"


@dataclass(frozen=True)
class RegisteredStrategy:
    """A strategy class found through an entry point, and the distribution it comes from."""

    cls: type[WeightingStrategy]
    origin: str

    def arguments(self) -> str:
        """The constructor's arguments with their defaults, as ``name=default, ...``."""
        params = list(inspect.signature(self.cls.__init__).parameters.values())[1:]
        return ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params)


def _origin(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def load_strategies() -> dict[str, RegisteredStrategy]:
    """Import every registered strategy and return them by entry-point name.

    A plugin that fails to import, or is not a ``WeightingStrategy`` subclass, is skipped with one
    warning naming it and its distribution; with ``PEAR_STRICT_PLUGINS=1`` it is an error instead.
    """
    strategies: dict[str, RegisteredStrategy] = {}
    for entry_point in entry_points(group=GROUP):
        where = f"strategy plugin {entry_point.name!r} ({entry_point.value}, from {_origin(entry_point)})"
        try:
            cls = entry_point.load()
        except Exception as err:  # a broken plugin must not take the trainer down with it
            problem = f"{where} failed to import: {type(err).__name__}: {err}"
        else:
            if isinstance(cls, type) and issubclass(cls, WeightingStrategy):
                strategies.setdefault(entry_point.name, RegisteredStrategy(cls, _origin(entry_point)))
                continue
            problem = f"{where} is not a WeightingStrategy subclass"
        if os.environ.get(STRICT_ENV) == "1":
            raise PearError(problem)
        warnings.warn(f"{problem}; skipped (set {STRICT_ENV}=1 to make this an error)", stacklevel=2)
    return strategies


def format_strategies(strategies: dict[str, RegisteredStrategy]) -> str:
    """A table of the installed strategies: name, whether it needs behaviour log-probs, origin, arguments."""
    rows = [("name", "needs π_β", "from", "arguments")]
    for name, entry in sorted(strategies.items()):
        rows.append((name, "yes" if entry.cls.requires_behavior_logp else "no", entry.origin, entry.arguments() or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)

"""Discovery of weighting strategies through the ``pear_lightning.strategies`` entry-point group.

Built-ins are registered in this project's pyproject exactly like third-party plugins. Loading the
group imports every strategy class, which is what lets the CLI accept them by short name.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from lightning.pytorch.utilities import rank_zero_warn

from pear_lightning.errors import PearError
from pear_lightning.strategies import WeightingStrategy

GROUP = "pear_lightning.strategies"
STRICT_ENV = "PEAR_STRICT_PLUGINS"
OWN_DISTRIBUTION = "pear_lightning"
_skipped: dict[str, str] = {}  # see skipped_strategies


@dataclass(frozen=True)
class RegisteredStrategy:
    """A strategy class found through an entry point, and the distribution it comes from."""

    cls: type[WeightingStrategy]
    origin: str

    def arguments(self) -> str:
        """The constructor's arguments with their defaults, as ``name=default, ...``."""
        if self.cls.__init__ is object.__init__:
            return ""
        params = list(inspect.signature(self.cls.__init__).parameters.values())[1:]
        return ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params)


def _origin(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def load_strategies() -> dict[str, RegisteredStrategy]:
    """Import every registered strategy and return them by entry-point name.

    Built-ins are loaded first, and a plugin that takes a name already registered is not imported,
    so no plugin can hide a built-in. A plugin that fails to import, is not a ``WeightingStrategy``
    subclass, or whose entry-point name differs from its class name (the name users type) is skipped
    with one warning (rank 0) naming it and its distribution; with ``PEAR_STRICT_PLUGINS=1`` it is an
    error instead.
    """
    strategies: dict[str, RegisteredStrategy] = {}
    _skipped.clear()
    ordered = sorted(entry_points(group=GROUP), key=lambda ep: (_origin(ep).split()[0] != OWN_DISTRIBUTION, ep.name))
    for entry_point in ordered:
        where = f"strategy plugin {entry_point.name!r} ({entry_point.value}, from {_origin(entry_point)})"
        problem = _register(entry_point, strategies, where)
        if problem is None:
            continue
        _skipped[entry_point.name] = problem
        if os.environ.get(STRICT_ENV) == "1":
            raise PearError(problem)
        rank_zero_warn(f"{problem}; skipped (set {STRICT_ENV}=1 to make this an error)")
    return strategies


def skipped_strategies() -> dict[str, str]:
    """The plugins the last ``load_strategies`` skipped, by entry-point name, with what is wrong with each."""
    return dict(_skipped)


def _register(entry_point: EntryPoint, strategies: dict[str, RegisteredStrategy], where: str) -> str | None:
    """Import one entry point into ``strategies``; return what is wrong with it, if anything."""
    if entry_point.name in strategies:
        return f"{where} has the name of the strategy from {strategies[entry_point.name].origin}"
    try:
        cls = entry_point.load()
    except Exception as err:  # a broken plugin must not take the trainer down with it
        return f"{where} failed to import: {type(err).__name__}: {err}"
    if not (isinstance(cls, type) and issubclass(cls, WeightingStrategy)):
        return f"{where} is not a WeightingStrategy subclass"
    if cls.__name__ != entry_point.name:
        return f"{where} names class {cls.__name__}; the entry-point name must be the class name"
    strategies[entry_point.name] = RegisteredStrategy(cls, _origin(entry_point))
    return None


def format_strategies(strategies: dict[str, RegisteredStrategy]) -> str:
    """A table of the installed strategies: name, whether it needs behaviour log-probs, origin, arguments."""
    rows = [("name", "needs π_β", "from", "arguments")]
    for name, entry in sorted(strategies.items()):
        rows.append((name, "yes" if entry.cls.requires_behavior_logp else "no", entry.origin, entry.arguments() or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)

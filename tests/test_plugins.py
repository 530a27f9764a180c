"""Strategies are discovered through entry points, built-ins included; a broken plugin is named, not fatal."""

from importlib.metadata import EntryPoint

import pytest
from pear_lightning.strategies import UniformSFT

from pear_lightning import plugins
from pear_lightning.errors import PearError


def test_builtins_are_registered_as_entry_points():
    assert plugins.load_strategies()["UniformSFT"] is UniformSFT


def with_entry_points(monkeypatch, *extra):
    real = list(plugins.entry_points(group=plugins.GROUP))
    monkeypatch.setattr(plugins, "entry_points", lambda group: real + list(extra))


def test_a_plugin_that_fails_to_import_is_a_warning_naming_it(monkeypatch):
    with_entry_points(monkeypatch, EntryPoint("Broken", "no_such_module:Broken", plugins.GROUP))
    with pytest.warns(
        UserWarning,
        match=r"strategy plugin 'Broken' \(no_such_module:Broken, from unknown distribution\) "
        r"failed to import: ModuleNotFoundError: No module named 'no_such_module'; skipped",
    ):
        found = plugins.load_strategies()
    assert "Broken" not in found and found["UniformSFT"] is UniformSFT


def test_a_plugin_that_is_not_a_strategy_is_refused_and_strict_mode_makes_it_fatal(monkeypatch):
    with_entry_points(monkeypatch, EntryPoint("NotOne", "collections:OrderedDict", plugins.GROUP))
    with pytest.warns(UserWarning, match="is not a WeightingStrategy subclass"):
        plugins.load_strategies()
    monkeypatch.setenv(plugins.STRICT_ENV, "1")
    with pytest.raises(
        PearError, match=r"^strategy plugin 'NotOne' \(collections:OrderedDict, from unknown distribution\) is not"
    ):
        plugins.load_strategies()

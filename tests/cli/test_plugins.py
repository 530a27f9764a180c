"""Strategies are discovered through entry points, built-ins included; a broken plugin is named, not fatal, until
it is asked for (or strict mode is on): then it is one error line."""

import re
from importlib.metadata import EntryPoint

import pytest
from conftest import GOOD, assert_refused, fit_args, run_cli, write_jsonl

from pear_lightning.cli import plugins
from pear_lightning.errors import PearError
from pear_lightning.strategies import TokenIS, UniformSFT


def test_builtins_are_registered_as_entry_points():
    assert plugins.load_strategies()["UniformSFT"].cls is UniformSFT


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
    assert "Broken" not in found and found["UniformSFT"].cls is UniformSFT


def test_a_plugin_that_is_not_a_strategy_is_refused_and_strict_mode_makes_it_fatal(monkeypatch):
    with_entry_points(monkeypatch, EntryPoint("NotOne", "collections:OrderedDict", plugins.GROUP))
    with pytest.warns(UserWarning, match="is not a WeightingStrategy subclass"):
        plugins.load_strategies()
    monkeypatch.setenv(plugins.STRICT_ENV, "1")
    with pytest.raises(
        PearError, match=r"^strategy plugin 'NotOne' \(collections:OrderedDict, from unknown distribution\) is not"
    ):
        plugins.load_strategies()


def test_the_example_plugin_is_discovered_listed_and_trains_the_demo(tmp_path, monkeypatch, capsys):
    """Install tests/plugin_example as a real distribution, then use its strategy by short name."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    from pear_lightning.cli.commands import main

    source = tmp_path / "plugin_example"  # pip builds in the source folder: a copy, so the repository stays as it is
    shutil.copytree(REPO / "tests" / "plugin_example", source)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    main(["strategies"])
    listing = capsys.readouterr().out
    assert any(
        line.split()[:4] == ["LengthNormalizedSFT", "no", "pear-plugin-example", "0.1.0"]
        for line in listing.splitlines()
    )
    main(
        [
            "fit",
            "--config",
            "configs/demo.yaml",
            "--model.weighting",
            "LengthNormalizedSFT",
            "--model.loss_normalizer",
            "weights",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    config = (tmp_path / "demo" / "version_0" / "config.yaml").read_text()
    assert "class_path: pear_plugin_example.LengthNormalizedSFT" in config


def test_a_plugin_cannot_hide_a_builtin_or_use_another_name_than_its_class(monkeypatch):
    with_entry_points(
        monkeypatch,
        EntryPoint("TokenIS", "pear_lightning.strategies:UniformSFT", plugins.GROUP),
        EntryPoint("Alias", "pear_lightning.strategies:DFT", plugins.GROUP),
    )
    with pytest.warns(UserWarning) as record:
        found = plugins.load_strategies()
    messages = sorted(str(w.message) for w in record)
    assert messages[0].startswith(
        "strategy plugin 'Alias' (pear_lightning.strategies:DFT, from unknown distribution) names class DFT; "
        "the entry-point name must be the class name"
    )
    assert messages[1].startswith(
        "strategy plugin 'TokenIS' (pear_lightning.strategies:UniformSFT, from unknown distribution) has the name of "
        "the strategy from pear_lightning 0.1.0"
    )
    assert found["TokenIS"].cls is TokenIS and "Alias" not in found


@pytest.fixture
def broken_plugin(run_dir, monkeypatch):
    """A strategy plugin registered through an entry point whose module raises on import."""
    (run_dir / "broken_plugin.py").write_text("raise RuntimeError('this plugin is broken')\n")
    monkeypatch.syspath_prepend(str(run_dir))
    real = list(plugins.entry_points(group=plugins.GROUP))
    broken = EntryPoint("Broken", "broken_plugin:Broken", plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real, broken])
    return (
        "strategy plugin 'Broken' (broken_plugin:Broken, from unknown distribution) failed to import: "
        "RuntimeError: this plugin is broken"
    )


def test_a_plugin_that_raises_on_import_is_a_warning_until_it_is_used(broken_plugin, capsys):
    with pytest.warns(UserWarning, match=f"^{re.escape(broken_plugin)}; skipped"):
        code, out, _ = run_cli(["strategies"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert "Broken" not in listed and "UniformSFT" in listed


def test_a_plugin_that_raises_on_import_and_is_asked_for_is_one_error(run_dir, tiny_model_dir, capsys, broken_plugin):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "Broken")
    with pytest.warns(UserWarning, match="failed to import"):
        assert_refused(
            args,
            capsys,
            run_dir,
            f"model.weighting: {broken_plugin}; fix or reinstall that plugin, or use an installed strategy: "
            "BlockIS, DFT, SequenceIS, TokenIS, TruncatedIS, UniformSFT",
        )


def test_a_plugin_that_raises_on_import_is_one_error_in_strict_mode(
    run_dir, tiny_model_dir, capsys, broken_plugin, monkeypatch
):
    monkeypatch.setenv(plugins.STRICT_ENV, "1")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, broken_plugin)

"""Bad input, named: every row of the README's bad-input table is one ``error:`` line, exit status 2, nothing written.

Rows backed elsewhere: ids missing from the cache, token mismatch, NaN log-probs, a cache from another tokenizer,
a data file changed since caching, a cache cut short (test_cache.py); an unknown strategy, a missing data file, a
row without prompt/completion, an IS strategy on data without log-probs (test_cli.py).
"""

import re
from importlib.metadata import EntryPoint

import pytest
from conftest import GOOD, assert_refused, demo_rows, fit_args, run_cli, write_jsonl

from pear_lightning.cli import plugins
from pear_lightning.cli.commands import main
from pear_lightning.cli.lightning import DEBUG_ENV
from pear_lightning.errors import PearError


@pytest.mark.parametrize(
    ("weighting", "problem"),
    [
        (["TokenIS", "--model.weighting.gamma", "0"], "TokenIS: gamma must be in (0, 1], got 0.0"),
        (["TokenIS", "--model.weighting.gamma", "-0.5"], "TokenIS: gamma must be in (0, 1], got -0.5"),
        (["BlockIS", "--model.weighting.gamma", "1.5"], "BlockIS: gamma must be in (0, 1], got 1.5"),
        (["BlockIS", "--model.weighting.block_size", "0"], "BlockIS: block_size must be an integer >= 1, got 0"),
        (
            ["SequenceIS", "--model.weighting.log_ratio_clip", "[0.3, -0.08]"],
            "SequenceIS: log_ratio_clip must be (low, high) with low <= 0 <= high, got (0.3, -0.08)",
        ),
        (
            ["TokenIS", "--model.weighting.log_weight_clip", "[5.0, -10.0]"],
            "TokenIS: log_weight_clip must be (low, high) with low <= 0 <= high, got (5.0, -10.0)",
        ),
        (["TruncatedIS", "--model.weighting.cap", "0"], "TruncatedIS: cap must be > 0, got 0.0"),
        (["TokenIS", "--model.weighting.gama", "0.9"], "TokenIS: Option 'gama' is not accepted"),
        (
            ["TokenIS", "--model.weighting.gamma", "high"],
            "TokenIS: Parser key \"gamma\": Expected a <class 'float'>. Got value: high",
        ),
    ],
    ids=[
        "gamma-zero",
        "gamma-negative",
        "gamma-above-one",
        "block-size-zero",
        "log-ratio-clip-reversed",
        "log-weight-clip-reversed",
        "cap-zero",
        "misspelt-argument",
        "not-a-number",
    ],
)
def test_a_strategy_argument_out_of_range_is_one_error(run_dir, tiny_model_dir, capsys, weighting, problem):
    path = write_jsonl(run_dir / "train.jsonl", demo_rows(4, "val"))
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", *weighting)
    help_hint = f"(python -m pear_lightning fit --model.weighting.help {weighting[0]} lists its arguments)"
    assert_refused(args, capsys, run_dir, f"model.weighting: {problem} {help_hint}")
    assert not (run_dir / "runs").exists()  # refused while the config is read, before any folder is made


def test_a_value_of_the_wrong_type_is_one_error_line(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--data.max_length", "long")
    assert_refused(args, capsys, run_dir, "Parser key \"data.max_length\": Expected a <class 'int'>. Got value: long")


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
        code, _, _ = run_cli(["strategies"], capsys)
    assert code == 0


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


def test_debug_shows_the_traceback_instead_of_one_line(run_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it for the rest of the process
    path = write_jsonl(run_dir / "train.jsonl", demo_rows(4, "val"))
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS", "--model.weighting.gamma", "0")
    with pytest.raises(PearError, match=r"^model.weighting: TokenIS: gamma must be in \(0, 1\], got 0.0 "):
        main(["--debug", *args])


def test_an_unknown_weighting_is_one_error_naming_the_installed_ones(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(
        fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenISS"),
        capsys,
        run_dir,
        "model.weighting: not a known weighting strategy (Expected a dot import path string: TokenISS). "
        "Installed strategies: BlockIS, DFT, SequenceIS, TokenIS, TruncatedIS, UniformSFT; give one of their names or a "
        "full class path (python -m pear_lightning fit --model.weighting.help NAME)",
    )

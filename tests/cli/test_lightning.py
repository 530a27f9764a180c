"""LightningCLI over the module and data: a printed config reproduces the run, a strategy and its arguments are named
and checked while the config is read (one error line each), an evaluation command needs its data, checkpoints are
written atomically unless the user gives a checkpoint IO of their own, and the saved config is written atomically."""

import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GOOD, assert_refused, demo_rows, fit_args, run_cli, write_jsonl
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from pear_lightning.cli.lightning import PearArgumentParser, PearCLI, tool_cli
from pear_lightning.model.checkpoint_io import AtomicCheckpointIO


def test_print_config_round_trips(run_dir, tiny_model_dir, capsys):
    rows = demo_rows(48)
    write_jsonl(run_dir / "train.jsonl", rows[:40])
    write_jsonl(run_dir / "val.jsonl", rows[40:])
    args = ["fit", "--config", "configs/demo.yaml", "--model.model_name_or_path", str(tiny_model_dir)]
    args += ["--data.train_path", str(run_dir / "train.jsonl"), "--data.val_path", str(run_dir / "val.jsonl")]
    args += ["--trainer.logger.init_args.save_dir", str(run_dir / "runs"), "--trainer.default_root_dir"]
    args += [str(run_dir / "runs"), "--optimizer.lr", "0.0123", "--print_config"]
    code, printed, _ = run_cli(args, capsys)
    assert code == 0
    config = yaml.safe_load(printed)
    assert config["model"]["weighting"]["class_path"] == "pear_lightning.strategies.UniformSFT"
    assert config["optimizer"]["init_args"]["lr"] == 0.0123
    assert config["data"]["train_path"] == str(run_dir / "train.jsonl")
    (run_dir / "printed.yaml").write_text(printed)
    code, reprinted, _ = run_cli(["fit", "--config", str(run_dir / "printed.yaml"), "--print_config"], capsys)
    assert code == 0 and reprinted == printed


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


def test_a_value_of_the_wrong_type_is_one_error_line(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--data.max_length", "long")
    assert_refused(args, capsys, run_dir, "Parser key \"data.max_length\": Expected a <class 'int'>. Got value: long")


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_an_evaluation_command_without_its_data_is_refused(run_dir, tiny_model_dir, capsys, command):
    split = {"validate": "val", "test": "test", "predict": "predict"}[command]
    args = [command, *fit_args(run_dir, tiny_model_dir, write_jsonl(run_dir / "train.jsonl", GOOD))[1:]]
    expected = (
        f"{command}: data.{split}_path is not set, so there is nothing to {command}; give it a .jsonl, .json or "
        ".parquet file or folder"
    )
    assert_refused(args, capsys, run_dir, expected)


def test_the_cli_installs_atomic_checkpoints_but_keeps_a_checkpoint_io_of_the_users(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    base = ["--model.model_name_or_path", str(tiny_model_dir)]
    base += ["--data.train_path", str(write_jsonl(tmp_path / "train.jsonl", demo_rows(16)))]
    cli = tool_cli(PearCLI, base, "test", "test")
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    own = ["--trainer.plugins", "lightning.pytorch.plugins.io.AsyncCheckpointIO"]
    cli = tool_cli(PearCLI, [*base, *own], "test", "test")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AsyncCheckpointIO)


def test_the_saved_config_is_written_atomically_and_never_overwritten_unasked(tmp_path, monkeypatch):
    parser = PearArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    config = parser.parse_args(["--lr", "0.5"])
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a).name, Path(b).name)), real_replace(a, b)))
    path = tmp_path / "config.yaml"
    parser.save(config, str(path), skip_none=False, overwrite=True, multifile=False)
    assert renames == [(f".config.yaml.tmp-{os.getpid()}", "config.yaml")]
    assert path.read_text() == parser.dump(config, skip_none=False)
    with pytest.raises(ValueError, match="Refusing to overwrite"):
        parser.save(config, str(path), multifile=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary left beside it

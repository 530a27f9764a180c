"""Whole commands on the demo config: fit trains, logs and leaves its config beside its logs; validate, test and
predict run on their data; every built-in strategy trains the demo data and logs its diagnostics."""

import csv

import pytest
import yaml
from conftest import demo_rows, run_cli, write_jsonl


@pytest.fixture
def run_dir(run_dir):
    """The shared ``run_dir``, holding 40 training and 8 validation examples of the demo."""
    rows = demo_rows(48)
    write_jsonl(run_dir / "train.jsonl", rows[:40])
    write_jsonl(run_dir / "val.jsonl", rows[40:])
    return run_dir


def cli_args(run_dir, tiny_model_dir, *extra):
    return [
        "--config",
        "configs/demo.yaml",
        "--model.model_name_or_path",
        str(tiny_model_dir),
        "--data.train_path",
        str(run_dir / "train.jsonl"),
        "--data.val_path",
        str(run_dir / "val.jsonl"),
        "--data.batch_size",
        "8",
        "--trainer.logger.init_args.save_dir",
        str(run_dir / "runs"),
        "--trainer.default_root_dir",
        str(run_dir / "runs"),
        *extra,
    ]


def test_fit_trains_logs_and_saves_its_config_beside_the_logs(run_dir, tiny_model_dir, capsys):
    args = [
        "fit",
        *cli_args(
            run_dir,
            tiny_model_dir,
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--model.weighting",
            "UniformSFT",
        ),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    log_dir = run_dir / "runs" / "demo" / "version_0"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["model_name_or_path"] == str(tiny_model_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "train/tokens_per_sec", "val/loss", "val/accuracy"} <= logged
    steps_with_accuracy = [int(row["step"]) for row in rows if row["val/accuracy"]]
    assert steps_with_accuracy[0] == 0 and len(steps_with_accuracy) == 3  # before training, and two validations
    assert (log_dir / "checkpoints").is_dir()


@pytest.mark.parametrize(
    ("subcommand", "logged"),
    [("validate", {"val/loss", "val/accuracy"}), ("test", {"test/loss"}), ("predict", set())],
)
def test_validate_test_and_predict_run_on_their_data(run_dir, tiny_model_dir, capsys, subcommand, logged):
    val = str(run_dir / "val.jsonl")
    extra = {"validate": [], "test": ["--data.test_path", val], "predict": ["--data.predict_path", val]}[subcommand]
    code, _, err = run_cli([subcommand, *cli_args(run_dir, tiny_model_dir, *extra)], capsys)
    assert code == 0, err
    log_dir = run_dir / "runs" / "demo" / "version_0"
    assert (log_dir / "config.yaml").is_file()
    if logged:
        with open(log_dir / "metrics.csv") as f:
            assert logged <= {key for row in csv.DictReader(f) for key, value in row.items() if value}


@pytest.mark.parametrize(
    "weighting",
    [
        ["SequenceIS"],
        ["TokenIS", "--model.weighting.gamma", "0.99"],
        ["BlockIS", "--model.weighting.block_size", "8"],
        ["DFT"],
        ["TruncatedIS"],
    ],
    ids=lambda w: w[0],
)
def test_every_builtin_strategy_trains_the_demo_data_and_logs_its_diagnostics(
    run_dir, tiny_model_dir, capsys, weighting
):
    args = [
        "fit",
        *cli_args(
            run_dir,
            tiny_model_dir,
            "--trainer.max_steps",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--model.weighting",
            *weighting,
        ),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    with open(run_dir / "runs" / "demo" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    if weighting[0] in ("SequenceIS", "TokenIS", "BlockIS"):
        expected = {
            "weight_mean",
            "weight_min",
            "weight_max",
            "ess",
            "log_ratio_clipped",
            "log_weight_clipped",
            "log_ratio_mean",
        }
        assert {f"train/{name}_step" for name in expected} <= logged
        assert {f"train/{name}_epoch" for name in expected} <= logged
    saved = yaml.safe_load((run_dir / "runs" / "demo" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["weighting"]["class_path"].endswith("." + weighting[0])

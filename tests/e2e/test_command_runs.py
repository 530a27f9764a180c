"""The command line end to end: configs round-trip, runs leave their config beside their logs, errors are one line."""

import csv

import pytest
import torch
import yaml
from conftest import demo_rows, run_cli, write_jsonl

from pear_lightning import PearModule
from pear_lightning.cli.commands import main


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


def test_print_config_round_trips(run_dir, tiny_model_dir, capsys):
    args = ["fit", *cli_args(run_dir, tiny_model_dir, "--optimizer.lr", "0.0123"), "--print_config"]
    code, printed, _ = run_cli(args, capsys)
    assert code == 0
    config = yaml.safe_load(printed)
    assert config["model"]["weighting"]["class_path"] == "pear_lightning.strategies.UniformSFT"
    assert config["optimizer"]["init_args"]["lr"] == 0.0123
    assert config["data"]["train_path"] == str(run_dir / "train.jsonl")
    (run_dir / "printed.yaml").write_text(printed)
    code, reprinted, _ = run_cli(["fit", "--config", str(run_dir / "printed.yaml"), "--print_config"], capsys)
    assert code == 0 and reprinted == printed


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


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands_run(run_dir, tiny_model_dir, capsys, subcommand):
    val = str(run_dir / "val.jsonl")
    extra = {"validate": [], "test": ["--data.test_path", val], "predict": ["--data.predict_path", val]}[subcommand]
    code, _, err = run_cli([subcommand, *cli_args(run_dir, tiny_model_dir, *extra)], capsys)
    assert code == 0, err


def test_only_trainable_parameters_are_optimised(tiny_model_dir):
    module = PearModule(
        str(tiny_model_dir),
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"total_iters": 3}},
    )
    module.configure_model()
    module.model.get_input_embeddings().weight.requires_grad_(False)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.5
    assert optimised == trainable and len(trainable) == len(list(module.parameters())) - 1
    assert config["lr_scheduler"]["interval"] == "step"


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


def test_an_is_strategy_on_data_without_behaviour_logprobs_stops_before_training(run_dir, tiny_model_dir, capsys):
    rows = [{"id": str(i), "prompt": "Compute 1+1.", "completion": "#### 2"} for i in range(8)]
    plain = write_jsonl(run_dir / "plain.jsonl", rows)
    code, _, err = run_cli(
        ["fit", *cli_args(run_dir, tiny_model_dir, "--data.train_path", str(plain), "--model.weighting", "TokenIS")],
        capsys,
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: weighting TokenIS needs the behaviour policy's log-probs (log π_β of every response token) and the "
        "training data has none: add `token_ids` and `logprobs` columns scored by the model that generated the data "
        "(docs/data.md), or train with UniformSFT or DFT"
    )


def test_strategies_lists_every_builtin_with_its_arguments(capsys):
    main(["strategies"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "needs", "π_β", "from", "arguments"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["BlockIS", "DFT", "SequenceIS", "TokenIS", "TruncatedIS", "UniformSFT"]
    assert rows["BlockIS"].split()[1:4] == ["yes", "pear_lightning", "0.1.0"]
    assert rows["BlockIS"].endswith(
        "block_size=4, gamma=0.999, log_ratio_clip=(-0.08, 0.3), log_weight_clip=(-10.0, 5.0)"
    )
    assert rows["UniformSFT"].split()[1] == "no" and rows["DFT"].split()[1] == "no"

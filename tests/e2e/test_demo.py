"""The embedded demo end to end: a shortened run of its config lifts the student's accuracy, and the config that
ships in the package runs from any folder. (Its task and assets: tests/demo/.)"""

import csv
import sys

import yaml
from conftest import DEMO, REPO

from pear_lightning.cli.commands import main


def test_the_demo_learns(tmp_path, monkeypatch, capsys):
    """A shortened demo run lifts the exact-answer accuracy well above its step-0 value."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    main(
        [
            "fit",
            "--config",
            "configs/demo.yaml",
            "--trainer.max_steps",
            "350",
            "--trainer.val_check_interval",
            "350",
            "--lr_scheduler.init_args.total_steps",
            "350",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks.init_args.max_examples",
            "100",
        ]
    )
    with open(tmp_path / "demo" / "version_0" / "metrics.csv") as f:
        accuracy = {int(r["step"]): float(r["val/accuracy"]) for r in csv.DictReader(f) if r["val/accuracy"]}
    start, end = sorted(accuracy)
    assert start == 0 and end >= 349
    assert accuracy[0] < 0.05 and accuracy[end] >= accuracy[0] + 0.2, accuracy
    printed = capsys.readouterr().out  # printed between progress-bar updates
    assert "step 0: val/accuracy" in printed and "step 350: val/accuracy" in printed


def test_the_packaged_demo_config_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    """`--config demo` names the config that ships in the package, with the package's own model and data."""
    monkeypatch.chdir(tmp_path)  # not the repository: configs/demo.yaml and pear_lightning/demo/ are not here
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    main(
        ["fit", "--config", "demo", "--trainer.max_steps", "2", "--trainer.callbacks.init_args.max_examples", "4"]
        + ["--trainer.enable_progress_bar", "false"]
    )
    (run,) = (tmp_path / "runs" / "demo").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["model_name_or_path"] == str(DEMO / "assets" / "student")
    assert config["data"]["train_path"] == str(DEMO / "data" / "train.jsonl")
    assert (run / "metrics.csv").exists()

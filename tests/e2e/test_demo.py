"""The embedded demo: a verifiable task, behaviour-policy data with exact log-probs, and a student that learns."""

import csv
import json
import random
import sys

import pytest
import torch
import yaml
from conftest import BEHAVIOR, DEMO, REPO

from pear_lightning import PearDataModule, PearModule
from pear_lightning.behavior.score import prediction_rows
from pear_lightning.cli.commands import main
from pear_lightning.demo.task import Problem, extract_answer, reference_solution, sample_problem


def test_the_solver_is_always_right_and_varies_its_wording():
    rng = random.Random(1)
    solutions = set()
    for _ in range(2000):
        problem = sample_problem(rng)
        solution = reference_solution(problem, rng)
        assert extract_answer(solution) == str(problem.answer)
        solutions.add(solution)
    assert len({reference_solution(Problem((3, 4, 5), ("+", "+")), rng) for _ in range(100)}) > 5


def test_answers_are_graded_exactly():
    assert Problem((7, 5, 3), ("+", "-")).answer == 9
    assert extract_answer("7+5=12. 12-3=9. #### 9") == "9"
    assert extract_answer("#### -4") == "-4"
    assert extract_answer("7+5=12. 12-3=9.") is None


def test_shipped_logprobs_are_the_behaviour_policy_s_own():
    """Scoring the demo data with the behaviour model through PearModule reproduces its log-probs."""
    data = PearDataModule(
        val_path=str(DEMO / "data" / "val.jsonl"), tokenizer_name_or_path=str(BEHAVIOR), batch_size=16
    )
    data.setup("validate")
    module = PearModule(str(BEHAVIOR))
    module.configure_model()
    module.eval()
    shipped = {json.loads(line)["id"]: json.loads(line) for line in open(DEMO / "data" / "val.jsonl")}
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        scored = prediction_rows(module.predict_step(batch, 0))
    for row in scored:
        assert row["token_ids"] == shipped[row["id"]]["token_ids"]
        torch.testing.assert_close(
            torch.tensor(row["logprobs"]), torch.tensor(shipped[row["id"]]["logprobs"]), rtol=0, atol=1e-5
        )
    # The data is what PEAR is for: sampled, not argmax, so the behaviour policy was uncertain somewhere.
    assert min(lp for row in scored for lp in row["logprobs"]) < -0.5


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


@pytest.mark.parametrize("name", ["behavior", "student"])
def test_demo_models_are_small_fp32_llamas(name):
    config = json.loads((DEMO / "assets" / name / "config.json").read_text())
    assert config["model_type"] == "llama"
    size = sum(p.stat().st_size for p in (DEMO / "assets" / name).iterdir())
    assert size < 3_000_000


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

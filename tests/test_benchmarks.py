"""The benchmark code keeps working: a tiny throughput run and the runner's README rewriting.

Timings are never asserted here; the figures come from ``python -m benchmarks.run``.
"""

import importlib.util
import json

import pytest

from benchmarks import common, run, throughput


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """Benchmarks write their results here instead of over the committed ones."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    return tmp_path


def test_throughput_runs_every_arm_on_the_same_tokens(results_dir):
    args = throughput.parse_args(
        "--repeats 1 --steps 2 --warmup 1 --batch-size 2 --tokens 24 --vocab 512 --hidden 64 --layers 1".split()
    )
    throughput.main(args)
    report = json.loads((results_dir / "throughput.json").read_text())
    rates = report["tokens_per_s"]
    expected = {"pear UniformSFT", "pear TokenIS", "pear DFT", "plain PyTorch loop"}
    trl_installed = importlib.util.find_spec("trl") is not None
    if trl_installed:
        expected |= {"TRL SFTTrainer", "TRL SFTTrainer dft"}
    assert set(rates) == expected
    assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
    table = (results_dir / "throughput.md").read_text()
    assert "| pear UniformSFT / plain PyTorch loop |" in table
    assert ("not run: TRL is not installed" in table) is not trl_installed


def test_runner_replaces_only_its_block():
    text = "intro\n<!-- benchmarks:start -->\nold table\n<!-- benchmarks:end -->\noutro\n"
    assert run.replace_between(text, "benchmarks", "new") == (
        "intro\n<!-- benchmarks:start -->\nnew\n<!-- benchmarks:end -->\noutro\n"
    )
    with pytest.raises(SystemExit, match="README.md has no <!-- gpu-benchmarks:start -->"):
        run.replace_between(text, "gpu-benchmarks", "new")


def test_runner_section_says_why_a_benchmark_has_no_figures(results_dir):
    (results_dir / "cache_join.md").write_text("| a | b |\n")
    assert run.section("cache_join", "Intro.", None) == "Intro.\n\n| a | b |"
    failed = run.section("cache_join", "Intro.", "failed (exit 1): boom")
    assert failed == "Intro.\n\nNot measured in the last run: failed (exit 1): boom."

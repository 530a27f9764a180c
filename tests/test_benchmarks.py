"""The benchmark code keeps working: a tiny throughput run, the GPU benchmark on the CPU, and the runner's rewriting of docs/benchmarks.md.

Timings are never asserted here; the figures come from ``python -m benchmarks.run``.
"""

import importlib.util
import json

import pytest

from benchmarks import common, run, strategy_overhead, throughput


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


def test_strategy_overhead_times_every_strategy_in_a_step_and_alone(results_dir):
    strategy_overhead.main(repeats=1, steps=2)
    report = json.loads((results_dir / "strategy_overhead.json").read_text())
    runs = {f"{name} {kind}" for name in strategy_overhead.STRATEGIES for kind in ("step", "logging_step")}
    assert set(report["seconds_per_step"]) == set(report["weighting_alone_seconds"]) == runs
    assert report["weighting_extra_share_of_uniform_step"]["UniformSFT step"]["median"] == 0
    table = (results_dir / "strategy_overhead.md").read_text()
    assert all(table.count(f"| {name} |") == 2 for name in strategy_overhead.STRATEGIES)  # both tables


def test_paired_difference_is_the_mean_shift_with_an_interval_around_it():
    base = [0.5, 0.7, 0.6, 0.8]
    assert common.paired_difference([b + 0.1 for b in base], base) == pytest.approx((0.1, 0.1, 0.1))
    mean, low, high = common.paired_difference([0.6, 0.7, 0.5, 0.9], base)  # differences 0.1, 0, -0.1, 0.1
    assert mean == pytest.approx(0.025) and -0.1 <= low < mean < high <= 0.1


def test_runner_replaces_only_its_block():
    text = "intro\n<!-- benchmarks:start -->\nold table\n<!-- benchmarks:end -->\noutro\n"
    assert run.replace_between(text, "benchmarks", "new") == (
        "intro\n<!-- benchmarks:start -->\nnew\n<!-- benchmarks:end -->\noutro\n"
    )
    with pytest.raises(SystemExit, match="docs/benchmarks.md has no <!-- gpu-benchmarks:start -->"):
        run.replace_between(text, "gpu-benchmarks", "new")


def test_runner_section_says_why_a_benchmark_has_no_figures(results_dir):
    (results_dir / "cache_join.md").write_text("| a | b |\n")
    assert run.section("cache_join", "Intro.", None) == "Intro.\n\n| a | b |"
    failed = run.section("cache_join", "Intro.", "failed (exit 1): boom")
    assert failed == "Intro.\n\nNot measured in the last run: failed (exit 1): boom."


def test_gpu_benchmark_dry_run_on_the_cpu_runs_every_arm_and_the_largest_batch_search(results_dir):
    from benchmarks import gpu_throughput

    gpu_throughput.main(gpu_throughput.parse_args(["--device", "cpu", "--tiny"]))
    report = json.loads((results_dir / "gpu_throughput.json").read_text())
    (result,) = report["results"]
    assert set(result["runs"]) == set(gpu_throughput.ARMS)
    assert all(len(runs) == 1 and runs[0]["tokens_per_s"] > 0 for runs in result["runs"].values())
    assert set(result["largest"]) == set(gpu_throughput.MAX_BATCH_ARMS)
    assert all(run["batch_size"] == 4 and run["tokens_per_s"] > 0 for run in result["largest"].values())
    table = (results_dir / "gpu_throughput.md").read_text()
    assert "| pear TokenIS packed |" in table and "Packed / padded tokens/s, per round: UniformSFT" in table
    assert "`python -m benchmarks.gpu_throughput --device cpu --tiny`" in table


def test_the_largest_batch_search_finds_the_limit_within_an_eighth():
    from benchmarks.gpu_throughput import largest_batch

    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= 37

    assert largest_batch(fits, 8, 256) == 36
    assert tried == [16, 32, 64, 48, 40, 36]
    assert largest_batch(lambda batch: True, 8, 100) == 100  # never out of memory: the cap
    assert largest_batch(lambda batch: False, 8, 256) == 8  # the start is known to fit


@pytest.mark.parametrize(
    "shape, parameters",
    [("smollm2-135m", 134_515_008), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512)],
)
def test_the_gpu_benchmark_models_have_the_published_sizes(shape, parameters):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.gpu_models import shape_config

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(shape_config(shape, 0, 1))
    assert sum(p.numel() for p in model.parameters()) == parameters

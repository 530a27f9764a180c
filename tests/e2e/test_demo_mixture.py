"""The two-source demo mixture (configs/demo-mixture.yaml) trains end to end: the demo's responses and a source drawn by
``generate`` at temperature 0.7 / top-p 0.9, each joined to its own log-probs under its own sampling; the console says
one line per source and the CSV logger has each source's ESS/N."""

import csv

import pytest
import yaml
from conftest import BEHAVIOR, REPO, demo_rows, run_cli, write_jsonl

from pear_lightning.behavior.generate import generate
from pear_lightning.data.mixture import epoch_counts
from pear_lightning.sampling import SamplingSettings


@pytest.fixture(scope="module")
def cool(tmp_path_factory):
    """24 responses of the demo's behaviour policy to the demo's first training problems, at temperature 0.7, top-p 0.9."""
    root = tmp_path_factory.mktemp("demo-mixture")
    prompts = write_jsonl(root / "prompts.jsonl", demo_rows(24))
    sampling = SamplingSettings(temperature=0.7, top_p=0.9)
    generate(str(prompts), root / "gen", str(BEHAVIOR), sampling=sampling, max_new_tokens=64, accelerator="cpu")
    return root / "gen"


def test_the_demo_mixture_trains_and_reports_each_source(cool, run_dir, capsys, caplog):
    config = yaml.safe_load((REPO / "configs" / "demo-mixture.yaml").read_text())
    mixture = config["data"]["mixture"]
    assert [(s["name"], s["weight"]) for s in mixture] == [("demo", 0.7), ("cool", 0.3)]
    assert mixture[0]["path"] == "pear_lightning/demo/data/train.jsonl" and "sampling" not in mixture[1]
    mixture[1]["path"] = str(cool)  # the config's generate folder, made small
    override = run_dir / "mixture.yaml"
    override.write_text(yaml.safe_dump({"data": {"mixture": mixture}}))
    args = ["fit", "--config", "configs/demo-mixture.yaml", "--config", str(override)]
    args += [
        "--trainer.max_steps",
        "10",
        "--trainer.log_every_n_steps",
        "5",
        "--lr_scheduler.init_args.pct_start",
        "0.2",
    ]
    args += ["--trainer.callbacks.init_args.max_examples", "4"]
    args += ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.default_root_dir", str(run_dir)]
    with caplog.at_level("INFO"):
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    demo, cool_count = epoch_counts([4000, 24], [0.7, 0.3])
    assert (demo, cool_count) == (2817, 1207)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source ")]
    tokens = [line.split("examples (")[1].split(" trained")[0] for line in lines if "per epoch" in line]
    assert [line for line in lines if "per epoch" in line] == [
        f"source demo (pear_lightning/demo/data/train.jsonl): 4,000 examples ({tokens[0]} trained tokens), 2,817 per "
        "epoch (70.0%, weight 0.7); log-probs from its `logprobs` column, sampled with temperature 1, no "
        "top-k/top-p/min-p (the raw distribution)",
        f"source cool ({cool}): 24 examples ({tokens[1]} trained tokens), 1,207 per epoch (30.0%, weight 0.3); "
        "log-probs from its `logprobs` column, sampled with temperature 0.7, top_p 0.9",
    ]
    (run,) = (run_dir / "demo-mixture").iterdir()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    logged = [r for r in rows if r.get("train/ess_step")]
    assert len(logged) == 2
    for source in ("demo", "cool"):
        values = [float(r[f"train/{source}/ess_step"]) for r in logged if r[f"train/{source}/ess_step"] != "nan"]
        assert values and all(0 < v <= 1 for v in values)
        assert f"train/{source}/log_ratio_mean_step" in rows[0] and f"train/{source}/ess_epoch" in rows[0]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and losses[1] < losses[0]  # steps 5 and 10: it trains

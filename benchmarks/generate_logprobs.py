"""Does ``generate`` record the log-probs ``cache_logprobs`` computes for the same samples?

    python -m benchmarks.generate_logprobs [--prompts 200] [--n 4]

For each sampling setting (temperature 1; temperature 0.7 with top-p 0.9), ``generate`` samples ``--n``
responses to each of the first ``--prompts`` held-out demo problems from the demo behaviour model (CPU,
fp32), then ``cache_logprobs`` scores those responses with the same model under the settings the output's
manifest records, and ``fit`` trains ``TokenIS`` on them for a few steps (a refused row would stop it).
Reports the largest absolute difference between the two log-probs of any response token.

Writes ``benchmarks/results/generate_logprobs.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from lightning.pytorch import Trainer

from pear_lightning import PearDataModule
from pear_lightning.behavior.generate import generate
from pear_lightning.behavior.score import cache_logprobs
from pear_lightning.cli import main
from pear_lightning.sampling import SamplingSettings

from .common import write_jsonl, write_results

REPO = Path(__file__).resolve().parents[1]
BEHAVIOR = REPO / "pear_lightning" / "demo" / "assets" / "behavior"
SETTINGS = {
    "temperature 1": SamplingSettings(),
    "temperature 0.7, top-p 0.9": SamplingSettings(temperature=0.7, top_p=0.9),
}


def rows(folder: Path, pattern: str) -> dict[str, dict]:
    """The rows of a folder's Parquet shards, by id."""
    return {r["id"]: r for f in sorted(folder.glob(pattern)) for r in pq.read_table(f).to_pylist()}


def measure(work: Path, prompts: Path, n: int, sampling: SamplingSettings) -> dict:
    """generate → cache_logprobs → fit for one setting: the largest log-prob difference, and the counts."""
    gen, cache = work / "gen", work / "cache"
    generate(
        str(prompts), gen, str(BEHAVIOR), sampling=sampling, n=n, max_new_tokens=64, batch_size=50, accelerator="cpu"
    )
    demo = PearDataModule(train_path=str(gen), tokenizer_name_or_path=str(BEHAVIOR), batch_size=32, max_length=128)
    cache_logprobs(demo, cache, str(BEHAVIOR), Trainer(accelerator="cpu", devices=1, logger=False))
    config = ["--config", str(REPO / "configs" / "demo.yaml")]
    generated, cached = rows(gen, "part-*.parquet"), rows(cache, "train-*.parquet")
    assert sorted(generated) == sorted(cached)
    assert all(generated[i]["token_ids"] == cached[i]["token_ids"] for i in cached)
    difference = max(float(np.abs(np.subtract(generated[i]["logprobs"], cached[i]["logprobs"])).max()) for i in cached)
    steps = ["--trainer.max_steps", "5", "--trainer.val_check_interval", "5"]
    log = ["--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.callbacks.init_args.max_examples", "8"]
    main(["fit", *config, "--model.weighting", "TokenIS", "--data.train_path", str(gen), *steps, *log])  # or exit 2
    data = PearDataModule(train_path=str(gen), tokenizer_name_or_path=str(BEHAVIOR))
    data.setup("fit")
    return {
        "responses": len(generated),
        "trained": len(data.datasets["train"]),
        "tokens": sum(len(r["token_ids"]) for r in generated.values()),
        "max_abs_difference": difference,
        "sampling": json.loads((gen / "manifest.json").read_text())["sampling"],
    }


def run(num_prompts: int, n: int) -> None:
    """Measure every setting and write the results."""
    report, lines = {"prompts": num_prompts, "n": n, "settings": {}}, []
    with tempfile.TemporaryDirectory() as tmp:
        with open(REPO / "pear_lightning" / "demo" / "data" / "val.jsonl") as f:
            problems = [json.loads(line) for line in f][:num_prompts]
        prompts = Path(tmp) / "prompts.jsonl"
        write_jsonl(prompts, [{"id": r["id"], "messages": r["messages"][:1], "answer": r["answer"]} for r in problems])
        for name, sampling in SETTINGS.items():
            (Path(tmp) / name).mkdir()
            report["settings"][name] = measure(Path(tmp) / name, prompts, n, sampling)
    lines += [
        f"`generate` vs `cache_logprobs` on the same samples: {num_prompts} held-out demo prompts × {n} samples, "
        "demo behaviour model, CPU fp32 (`python -m benchmarks.generate_logprobs`).",
        "",
        "| sampling | responses | tokens | max abs difference of log q | examples fit trains TokenIS on |",
        "|---|---|---|---|---|",
    ]
    for name, result in report["settings"].items():
        difference = result["max_abs_difference"]
        trained = f"{result['trained']} of {result['responses']}"
        lines.append(f"| {name} | {result['responses']} | {result['tokens']:,} | {difference:.1e} | {trained} |")
    write_results("generate_logprobs", report, lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200, help="held-out demo problems to sample from")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    args = parser.parse_args()
    run(args.prompts, args.n)

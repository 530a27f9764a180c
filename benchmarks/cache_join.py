"""Cost of the behaviour log-prob cache: joining it, and scoring with ``cache_logprobs``.

    python -m benchmarks.cache_join [--examples 100000] [--tokens 512] [--repeats 5]

1. Join: synthetic examples of about ``--tokens`` tokens, tokenised by ``PearDataModule`` (timed),
   and a cache of their response tokens with random log-probs; then ``with_behavior`` (load the
   cache, check it, join it; timed cold, when ``datasets`` converts the Parquet shards, and warm),
   with the peak resident memory added during the join.
2. Scoring: ``cache_logprobs``'s predict loop vs a hand-written ``torch.no_grad()`` loop that
   produces the same rows from the same batches (demo behaviour model and data), alternated
   ``--repeats`` times.

Writes ``benchmarks/results/cache_join.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import psutil
import torch

from pear_lightning import PearDataModule, PearModule
from pear_lightning.cache import data_fingerprint, tokenizer_fingerprint, write_json, write_shard
from pear_lightning.module import prediction_rows

from .memory import PeakMemory

DEMO = Path(__file__).resolve().parents[1] / "pear_lightning" / "demo"
RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_examples(count: int, tokens: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs of long arithmetic chains (about ``tokens`` tokens each with the demo tokenizer)."""
    rng = random.Random(seed)
    steps = max(1, tokens // 9)
    rows = []
    for i in range(count):
        prompt = "Compute " + "+".join(str(rng.randint(1, 9)) for _ in range(8)) + "."
        completion = " ".join(f"{rng.randint(1, 9)}+{rng.randint(1, 9)}={rng.randint(2, 18)}." for _ in range(steps))
        rows.append({"id": f"s{i}", "prompt": prompt, "completion": completion})
    return rows


def bench_join(workdir: Path, examples: int, tokens: int) -> dict:
    """Time tokenising vs joining a cache of the same examples."""
    path = workdir / "train.jsonl"
    with open(path, "w") as f:
        for row in synthetic_examples(examples, tokens):
            f.write(json.dumps(row) + "\n")
    student = str(DEMO / "assets" / "student")
    data = PearDataModule(train_path=str(path), tokenizer_name_or_path=student, max_length=tokens + 64)
    start = time.perf_counter()
    tokenized = data.tokenized("train")
    tokenize_s = time.perf_counter() - start
    mean_tokens = sum(len(ids) for ids in tokenized["input_ids"][:1000]) / min(1000, len(tokenized))

    cache = workdir / "cache"
    cache.mkdir()
    generator = torch.Generator().manual_seed(0)
    shards = []
    for k, start_row in enumerate(range(0, len(tokenized), 10_000)):
        part = tokenized.select(range(start_row, min(start_row + 10_000, len(tokenized))))
        rows = []
        for ex_id, ids, mask in zip(part["id"], part["input_ids"], part["loss_mask"]):
            response = [t for t, m in zip(ids, mask) if m]
            rows.append(
                {
                    "id": ex_id,
                    "token_ids": response,
                    "logprobs": (-torch.rand(len(response), generator=generator)).tolist(),
                }
            )
        write_shard(cache / f"train-{k:05d}.parquet", rows)
        shards.append({"file": f"train-{k:05d}.parquet", "rows": len(rows)})
    write_json(
        cache / "manifest.json",
        {
            "tokenizer_fingerprint": tokenizer_fingerprint(data.load_tokenizer()),
            "splits": {"train": {"data_path": str(path), "data_fingerprint": data_fingerprint(str(path))}},
            "shards": {"train": shards},
        },
    )

    data.logprobs_path = str(cache)
    timings = []
    for _ in range(3):  # the first includes the Parquet -> Arrow conversion that datasets caches
        with PeakMemory() as memory:
            start = time.perf_counter()
            joined = data.with_behavior("train", tokenized)
            elapsed = time.perf_counter() - start
        timings.append((elapsed, memory.added_mb))
    assert len(joined) == len(tokenized)
    return {
        "examples": examples,
        "mean_tokens_per_example": mean_tokens,
        "tokenize_s": tokenize_s,
        "join_cold_s": timings[0][0],
        "join_warm_s": [t for t, _ in timings[1:]],
        "join_peak_added_mb": [m for _, m in timings],
        "cache_mb": sum(f.stat().st_size for f in cache.glob("*.parquet")) / 2**20,
        "join_over_tokenize_cold": timings[0][0] / tokenize_s,
        "join_over_tokenize_warm": statistics.median(t for t, _ in timings[1:]) / tokenize_s,
    }


@torch.no_grad()
def bare_loop(module: PearModule, loader) -> float:
    """Seconds for a hand-written no_grad loop producing the same rows (id, token ids, fp32 log-probs), batch
    by batch: the same scoring work as cache_logprobs, without Lightning's predict loop around it."""
    start = time.perf_counter()
    for index, batch in enumerate(loader):
        prediction_rows(module.predict_step(batch, index))
    return time.perf_counter() - start


def bench_scoring(repeats: int) -> dict:
    """cache_logprobs's predict path vs a bare loop over the same batches."""
    behavior = str(DEMO / "assets" / "behavior")
    data = PearDataModule(
        predict_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=behavior, batch_size=64
    )
    data.setup("predict")
    batches = list(data.predict_dataloader())  # to count tokens
    module = PearModule(behavior)
    module.configure_model()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    ours, bare = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        predictions = trainer.predict(module, dataloaders=data.predict_dataloader(), return_predictions=True)
        [row for prediction in predictions for row in prediction_rows(prediction)]
        ours.append(time.perf_counter() - start)
        module.model.eval()
        bare.append(bare_loop(module, data.predict_dataloader()))
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    ratios = [b / o for o, b in zip(ours, bare)]  # throughput of ours relative to bare
    return {
        "examples": len(data.datasets["predict"]),
        "response_tokens": tokens,
        "ours_s": ours,
        "bare_s": bare,
        "throughput_ratio": ratios,
        "throughput_ratio_median": statistics.median(ratios),
        "tokens_per_s_ours": tokens / statistics.median(ours),
        "tokens_per_s_bare": tokens / statistics.median(bare),
    }


def main(examples: int, tokens: int, repeats: int) -> None:
    """Run both benchmarks and write their results."""
    with tempfile.TemporaryDirectory() as workdir:
        join = bench_join(Path(workdir), examples, tokens)
    scoring = bench_scoring(repeats)
    report = {
        "benchmark": "cache_join",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": psutil.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "join": join,
        "scoring": scoring,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_join.json").write_text(json.dumps(report, indent=2) + "\n")
    warm = statistics.median(join["join_warm_s"])
    cold_ratio, warm_ratio = join["join_over_tokenize_cold"], join["join_over_tokenize_warm"]
    memory = join["join_peak_added_mb"]
    ratios = scoring["throughput_ratio"]
    command = f"python -m benchmarks.cache_join --examples {examples} --tokens {tokens} --repeats {repeats}"
    lines = [
        f"Cache join and scoring ({report['date']}, `{command}`, {psutil.cpu_count()} CPUs):",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| examples × mean tokens | {join['examples']:,} × {join['mean_tokens_per_example']:.0f} |",
        f"| tokenising them (`datasets.map`, 1 process) | {join['tokenize_s']:.1f} s |",
        f"| join + validate, cold (incl. Parquet → Arrow) | {join['join_cold_s']:.1f} s "
        f"({cold_ratio:.3f}× tokenising) |",
        f"| join + validate, warm (median of 2) | {warm:.1f} s ({warm_ratio:.3f}× tokenising) |",
        f"| peak memory added by the join (cold, warm) | {memory[0]:.0f} MB, {max(memory[1:]):.0f} MB "
        f"(cache: {join['cache_mb']:.0f} MB of Parquet) |",
        f"| scoring throughput, cache_logprobs path / bare no_grad loop (median of {repeats}, alternated) | "
        f"{scoring['throughput_ratio_median']:.3f} (range {min(ratios):.3f}–{max(ratios):.3f}) |",
        f"| scoring tokens/s, ours vs bare | {scoring['tokens_per_s_ours']:,.0f} vs "
        f"{scoring['tokens_per_s_bare']:,.0f} |",
    ]
    (RESULTS / "cache_join.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.examples, args.tokens, args.repeats)

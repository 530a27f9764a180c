"""Cost of the behaviour log-prob cache: joining it, and scoring with ``cache_logprobs``.

    python -m benchmarks.cache_join [--examples 20000] [--tokens 512] [--repeats 5]

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
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import torch

from pear_lightning import PearDataModule, PearModule
from pear_lightning.behavior.score import prediction_rows
from pear_lightning.data.cache import data_fingerprint, shard_table, tokenizer_fingerprint

from .common import spread, synthetic_examples, with_range, write_jsonl, write_results
from .memory import PeakMemory

DEMO = Path(__file__).resolve().parents[1] / "pear_lightning" / "demo"


def write_cache(cache: Path, data: PearDataModule, tokenized, path: Path) -> None:
    """A cache of ``tokenized``'s response tokens with random log-probs, as ``cache_logprobs`` writes it."""
    cache.mkdir()
    generator = torch.Generator().manual_seed(0)
    shards = []
    for k, start_row in enumerate(range(0, len(tokenized), 10_000)):
        part = tokenized.select(range(start_row, min(start_row + 10_000, len(tokenized))))
        rows = []
        for ex_id, ids, mask in zip(part["id"], part["input_ids"], part["loss_mask"]):
            response = [t for t, m in zip(ids, mask) if m]
            logprobs = (-torch.rand(len(response), generator=generator)).tolist()
            rows.append({"id": ex_id, "token_ids": response, "logprobs": logprobs})
        pq.write_table(shard_table(rows), cache / f"train-{k:05d}.parquet")
        shards.append({"file": f"train-{k:05d}.parquet", "rows": len(rows)})
    manifest = {
        "tokenizer_fingerprint": tokenizer_fingerprint(data.load_tokenizer()),
        "splits": {"train": {"data_path": str(path), "data_fingerprint": data_fingerprint(str(path))}},
        "shards": {"train": shards},
    }
    (cache / "manifest.json").write_text(json.dumps(manifest))


def bench_join(workdir: Path, examples: int, tokens: int) -> dict:
    """Time tokenising a fresh copy of the examples, then joining a cache of them, cold and warm."""
    path = write_jsonl(workdir / "train.jsonl", synthetic_examples(examples, tokens))
    student = str(DEMO / "assets" / "student")
    data = PearDataModule(train_path=str(path), tokenizer_name_or_path=student, max_length=tokens + 64)
    start = time.perf_counter()
    tokenized = data.tokenized("train")
    tokenize_s = time.perf_counter() - start
    mean_tokens = sum(len(ids) for ids in tokenized["input_ids"][:1000]) / min(1000, len(tokenized))
    write_cache(workdir / "cache", data, tokenized, path)
    data.logprobs_path = str(workdir / "cache")
    timings = []
    for _ in range(2):  # the first includes the Parquet -> Arrow conversion that datasets caches
        with PeakMemory() as memory:
            start = time.perf_counter()
            joined = data.with_behavior("train", tokenized)
            elapsed = time.perf_counter() - start
        timings.append((elapsed, memory.added_mb))
    assert len(joined) == len(tokenized)
    return {
        "mean_tokens_per_example": mean_tokens,
        "tokenize_s": tokenize_s,
        "join_cold_s": timings[0][0],
        "join_warm_s": timings[1][0],
        "peak_added_mb_cold": timings[0][1],
        "peak_added_mb_warm": timings[1][1],
        "cache_mb": sum(f.stat().st_size for f in (workdir / "cache").glob("*.parquet")) / 2**20,
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
        "tokens_per_s_ours": tokens / statistics.median(ours),
        "tokens_per_s_bare": tokens / statistics.median(bare),
    }


def main(examples: int, tokens: int, repeats: int) -> None:
    """Run both benchmarks ``repeats`` times and write their results."""
    joins = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as workdir:  # fresh files: nothing comes from the datasets cache
            joins.append(bench_join(Path(workdir), examples, tokens))
    scoring = bench_scoring(repeats)
    cold = [j["join_cold_s"] / j["tokenize_s"] for j in joins]
    warm = [j["join_warm_s"] / j["tokenize_s"] for j in joins]
    report = {
        "settings": {"examples": examples, "tokens": tokens, "repeats": repeats},
        "join": joins,
        "join_over_tokenize_cold": spread(cold),
        "join_over_tokenize_warm": spread(warm),
        "scoring": scoring,
    }

    def column(key: str, digits: int) -> str:
        return with_range([j[key] for j in joins], digits)

    command = f"python -m benchmarks.cache_join --examples {examples} --tokens {tokens} --repeats {repeats}"
    mean_tokens = joins[0]["mean_tokens_per_example"]
    lines = [
        f"Cache join and scoring, median (min–max) of {repeats} repetitions (`{command}`):",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| examples × mean tokens | {examples:,} × {mean_tokens:.0f} |",
        f"| tokenising them (`datasets.map`, 1 process), s | {column('tokenize_s', 1)} |",
        f"| join + validate, cold (incl. Parquet → Arrow), s | {column('join_cold_s', 2)} |",
        f"| join + validate, warm, s | {column('join_warm_s', 2)} |",
        f"| join / tokenising, cold | {with_range(cold)} |",
        f"| join / tokenising, warm | {with_range(warm)} |",
        f"| peak memory added by the join, cold / warm, MB | {column('peak_added_mb_cold', 0)} / "
        f"{column('peak_added_mb_warm', 0)} (cache: {joins[0]['cache_mb']:.0f} MB of Parquet) |",
        f"| scoring throughput, cache_logprobs path / bare no_grad loop (alternated) | "
        f"{with_range(scoring['throughput_ratio'])} (target ≥ 0.9) |",
        f"| scoring tokens/s, ours vs bare | {scoring['tokens_per_s_ours']:,.0f} vs "
        f"{scoring['tokens_per_s_bare']:,.0f} |",
    ]
    write_results("cache_join", report, lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.examples, args.tokens, args.repeats)

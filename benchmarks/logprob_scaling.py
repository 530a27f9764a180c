"""How the log-prob path's step time and memory grow with sequence length and vocabulary, ours vs full logits.

    python -m benchmarks.logprob_scaling [--repeats 5] [--hidden 256]

Forward + backward of the vocabulary projection and log-softmax, as in ``benchmarks.logprob_memory``,
over two sweeps: loss tokens T from 256 to 4096 at V = 32,768, and vocabulary V from 32,768 to
151,936 at T = 1,024. At every point the two paths run back to back, in alternating order, in one
process; peak resident memory is sampled during each run. Writes
``benchmarks/results/logprob_scaling.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from .common import RESULTS, spread, with_range, write_results
from .logprob_memory import forward_backward, head_inputs
from .memory import PeakMemory

TOKENS = (256, 512, 1024, 2048, 4096)
VOCABS = (32_768, 65_536, 131_072, 151_936)
PATHS = ("full", "ours")


def measure(path: str, vocab: int, tokens: int, hidden: int, chunk: int) -> tuple[float, float]:
    """Seconds and peak added memory (MB) of one forward + backward."""
    head, h, y = head_inputs(vocab, tokens, hidden)
    with PeakMemory() as memory:
        start = time.perf_counter()
        forward_backward(path, head, h, y, chunk)
        seconds = time.perf_counter() - start
    return seconds, memory.added_mb


def sweep(points: list[tuple[int, int]], hidden: int, chunk: int, repeats: int) -> list[dict]:
    """Every (vocab, tokens) point, both paths, ``repeats`` alternated pairs each."""
    results = []
    for vocab, tokens in points:
        runs = {path: {"seconds": [], "peak_added_mb": []} for path in PATHS}
        measure("ours", vocab, tokens, hidden, chunk)  # warm-up: first-touch of the allocator and kernels
        for repeat in range(repeats):
            for path in PATHS if repeat % 2 == 0 else reversed(PATHS):
                seconds, mb = measure(path, vocab, tokens, hidden, chunk)
                runs[path]["seconds"].append(seconds)
                runs[path]["peak_added_mb"].append(mb)
        time_ratio = [o / f for o, f in zip(runs["ours"]["seconds"], runs["full"]["seconds"])]
        memory_ratio = [o / f for o, f in zip(runs["ours"]["peak_added_mb"], runs["full"]["peak_added_mb"])]
        results.append(
            {
                "vocab": vocab,
                "tokens": tokens,
                "runs": runs,
                "time_ratio": spread(time_ratio),
                "memory_ratio": spread(memory_ratio),
            }
        )
        print(f"V={vocab} T={tokens}: time ratio {statistics.median(time_ratio):.3f}", flush=True)
    return results


def plot(by_tokens: list[dict], by_vocab: list[dict], hidden: int) -> None:
    """Time and memory against T and against V, both paths, medians with min–max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for column, (results, key, label) in enumerate(
        [(by_tokens, "tokens", f"loss tokens T (V = {by_tokens[0]['vocab']:,})"), (by_vocab, "vocab", "vocabulary V")]
    ):
        x = [r[key] for r in results]
        for row, (measure_key, unit) in enumerate([("seconds", "step time, s"), ("peak_added_mb", "peak memory, MB")]):
            ax = axes[row][column]
            for path, name in (("full", "full logits + log_softmax"), ("ours", "ours (chunked, recomputed)")):
                values = [r["runs"][path][measure_key] for r in results]
                medians = [statistics.median(v) for v in values]
                errors = [[m - min(v) for m, v in zip(medians, values)], [max(v) - m for m, v in zip(medians, values)]]
                ax.errorbar(x, medians, yerr=errors, marker="o", capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label if key == "tokens" else f"{label} (T = {by_vocab[0]['tokens']:,})")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"Per-token log-probs, forward + backward, fp32, hidden {hidden}, 2-core CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "logprob_scaling.png", dpi=110)


def main(repeats: int, hidden: int, chunk: int) -> None:
    """Run both sweeps, write the results and the plot."""
    by_tokens = sweep([(VOCABS[0], t) for t in TOKENS], hidden, chunk, repeats)
    by_vocab = sweep([(v, 1024) for v in VOCABS], hidden, chunk, repeats)
    report = {
        "settings": {"hidden": hidden, "chunk": chunk, "repeats": repeats, "dtype": "float32"},
        "by_tokens": by_tokens,
        "by_vocab": by_vocab,
    }
    lines = [
        f"Log-prob path scaling, forward + backward, hidden {hidden}, fp32, CPU; median (min–max) of {repeats} "
        f"alternated pairs per point (`python -m benchmarks.logprob_scaling --repeats {repeats}`).",
        "",
        "| V | T | full: s | ours: s | time ours / full | memory ours / full |",
        "|---|---|---|---|---|---|",
    ]
    for r in by_tokens + by_vocab:
        full, ours = r["runs"]["full"]["seconds"], r["runs"]["ours"]["seconds"]
        lines.append(
            f"| {r['vocab']:,} | {r['tokens']:,} | {statistics.median(full):.2f} | {statistics.median(ours):.2f} | "
            f"{with_range(r['time_ratio']['values'])} | {with_range(r['memory_ratio']['values'])} |"
        )
    write_results("logprob_scaling", report, lines)
    plot(by_tokens, by_vocab, hidden)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    main(args.repeats, args.hidden, args.chunk)

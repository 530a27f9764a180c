"""Memory and time of the log-prob path: ours (chunked fp32, recomputed in backward) vs full logits.

    python -m benchmarks.logprob_memory [--vocab 151936] [--tokens 2048] [--hidden 256] [--repeats 5]

Forward and backward of the vocabulary projection and log-softmax of ``--tokens`` loss tokens, from
hidden states that require grad, with an fp32 lm_head of ``--vocab`` × ``--hidden``: ours
(``pear_lightning.logprobs``, chunk 256) against ``log_softmax(lm_head(h).float()).gather``. Each
repetition runs in a fresh subprocess, alternating the two, and reports that process's peak
resident memory added by the step. Writes ``benchmarks/results/logprob_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(path: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    """Run one forward + backward in this process; return seconds and peak added memory."""
    from pear_lightning.logprobs import _chunk_logprobs

    from .memory import PeakMemory

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(tokens, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,))
    with PeakMemory() as memory:
        start = time.perf_counter()
        if path == "full":
            logp = torch.log_softmax(head(h).float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)
        else:
            parts = [
                torch.utils.checkpoint.checkpoint(
                    _chunk_logprobs, head, h[s : s + chunk], y[s : s + chunk], use_reentrant=False
                )
                for s in range(0, tokens, chunk)
            ]
            logp = torch.cat(parts)
        logp.sum().backward()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_added_mb": memory.added_mb}


def main(vocab: int, tokens: int, hidden: int, chunk: int, repeats: int) -> None:
    """Alternate subprocess runs of both paths and write the results."""
    runs: dict[str, list[dict]] = {"full": [], "ours": []}
    for _ in range(repeats):
        for path in ("full", "ours"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.logprob_memory",
                    "--one",
                    path,
                    "--vocab",
                    str(vocab),
                    "--tokens",
                    str(tokens),
                    "--hidden",
                    str(hidden),
                    "--chunk",
                    str(chunk),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[path].append(json.loads(out.strip().splitlines()[-1]))
    memory_ratio = [o["peak_added_mb"] / f["peak_added_mb"] for o, f in zip(runs["ours"], runs["full"])]
    time_ratio = [o["seconds"] / f["seconds"] for o, f in zip(runs["ours"], runs["full"])]
    report = {
        "benchmark": "logprob_memory",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__},
        "settings": {"vocab": vocab, "tokens": tokens, "hidden": hidden, "chunk": chunk, "dtype": "float32"},
        "runs": runs,
        "memory_ratio_median": statistics.median(memory_ratio),
        "time_ratio_median": statistics.median(time_ratio),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "logprob_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    full_mb = statistics.median(r["peak_added_mb"] for r in runs["full"])
    ours_mb = statistics.median(r["peak_added_mb"] for r in runs["ours"])
    full_s = statistics.median(r["seconds"] for r in runs["full"])
    ours_s = statistics.median(r["seconds"] for r in runs["ours"])
    lines = [
        f"Log-prob path, forward + backward, V = {vocab:,}, T = {tokens:,} loss tokens, hidden {hidden}, fp32, CPU; "
        f"median of {repeats} alternated subprocess runs ({report['date']}, `python -m benchmarks.logprob_memory`).",
        "",
        "| path | peak memory added | time |",
        "|---|---|---|",
        f"| full logits + log_softmax | {full_mb:,.0f} MB | {full_s:.2f} s |",
        f"| ours (chunks of {chunk}, recomputed in backward) | {ours_mb:,.0f} MB | {ours_s:.2f} s |",
        f"| ratio ours / full (targets: memory ≤ 0.25, time ≤ 1.2) | {report['memory_ratio_median']:.3f} | "
        f"{report['time_ratio_median']:.3f} |",
    ]
    (RESULTS / "logprob_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", choices=["full", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.vocab, args.tokens, args.hidden, args.chunk)))
    else:
        main(args.vocab, args.tokens, args.hidden, args.chunk, args.repeats)

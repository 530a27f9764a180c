"""Memory and time of the log-prob path: ours (chunked fp32, recomputed in backward) vs full logits.

    python -m benchmarks.logprob_memory [--vocab 151936] [--tokens 2048] [--hidden 256] [--repeats 5]

Forward and backward of the vocabulary projection and log-softmax of ``--tokens`` loss tokens, from
hidden states that require grad, with an fp32 lm_head of ``--vocab`` × ``--hidden``: ours
(``pear_lightning.model.logprobs``, chunk 256) against ``log_softmax(lm_head(h).float()).gather``. Each
repetition runs in a fresh subprocess, alternating the two, and reports that process's peak
resident memory added by the step. Writes ``benchmarks/results/logprob_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from pear_lightning.model.logprobs import head_logprobs

from .common import spread, with_range, write_results
from .memory import PeakMemory


def head_inputs(vocab: int, tokens: int, hidden: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """An fp32 lm_head, hidden states that require grad, and target ids, seeded."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    return head, torch.randn(tokens, hidden, requires_grad=True), torch.randint(0, vocab, (tokens,))


def forward_backward(path: str, head: torch.nn.Linear, h: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
    """The log-probs of ``y`` from ``h`` and their backward, by ``path``: ``full`` logits or ``ours``."""
    if path == "full":
        logp = torch.log_softmax(head(h).float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)
    else:
        logp = head_logprobs(head, h, y, chunk)
    logp.sum().backward()


def one_run(path: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    """Run one forward + backward in this process; return seconds and peak added memory."""
    head, h, y = head_inputs(vocab, tokens, hidden)
    with PeakMemory() as memory:
        start = time.perf_counter()
        forward_backward(path, head, h, y, chunk)
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
        "settings": {"vocab": vocab, "tokens": tokens, "hidden": hidden, "chunk": chunk, "dtype": "float32"},
        "runs": runs,
        "memory_ratio": spread(memory_ratio),
        "time_ratio": spread(time_ratio),
    }
    command = f"python -m benchmarks.logprob_memory --vocab {vocab} --tokens {tokens} --repeats {repeats}"
    lines = [
        f"Log-prob path, forward + backward, V = {vocab:,}, T = {tokens:,} loss tokens, hidden {hidden}, fp32, CPU; "
        f"median (min–max) of {repeats} alternated subprocess runs (`{command}`).",
        "",
        "| path | peak memory added (MB) | time (s) |",
        "|---|---|---|",
        f"| full logits + log_softmax | {with_range([r['peak_added_mb'] for r in runs['full']], 0)} | "
        f"{with_range([r['seconds'] for r in runs['full']], 2)} |",
        f"| ours (chunks of {chunk}, recomputed in backward) | "
        f"{with_range([r['peak_added_mb'] for r in runs['ours']], 0)} | "
        f"{with_range([r['seconds'] for r in runs['ours']], 2)} |",
        f"| ratio ours / full, per pair (targets: memory ≤ 0.25, time ≤ 1.2) | {with_range(memory_ratio)} | "
        f"{with_range(time_ratio)} |",
    ]
    write_results("logprob_memory", report, lines)


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

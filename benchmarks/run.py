"""Run every benchmark, one subprocess each, and rewrite the results tables of docs/benchmarks.md.

    python -m benchmarks.run [--only NAME ...] [--device cpu|cuda]

On the CPU (the default) it runs the comparisons below in 12–25 minutes on a 2-core machine;
``--device cuda`` runs the GPU benchmark instead (offline, within its 540 s time budget). Each benchmark writes
``benchmarks/results/<name>.{json,md}``; this runner then replaces the part of docs/benchmarks.md between the
``benchmarks:start`` / ``benchmarks:end`` markers (or the ``gpu-benchmarks`` ones) with those tables.
A benchmark that fails or cannot run says so in its table and in the output; the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS, machine

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"  # the page whose marker blocks are rewritten

# name: (arguments, what the table shows); run in this order.
CPU_BENCHMARKS = {
    "throughput": (
        [],
        "**Throughput against the alternatives**: the same model, tokens, batches, optimizer and steps through "
        "`pear_lightning fit`, TRL's `SFTTrainer` and a hand-written loop (targets: ≥ 1.0× TRL, ≥ 0.9× the loop).",
    ),
    "strategy_overhead": (
        ["--repeats", "15"],
        "**Cost of the weighting** inside our training step (target ≤ 1.03× `UniformSFT`): whole steps side by side, "
        "and the weighting timed alone.",
    ),
    "logprob_memory": (
        ["--repeats", "5"],
        "**The log-prob path at Qwen's vocabulary** (targets: memory ≤ 0.25×, time ≤ 1.2× of full logits + "
        "`log_softmax`). Hidden size 256 keeps the CPU run short; the [T, V] buffers that dominate memory do not "
        "depend on it.",
    ),
    "logprob_scaling": (
        ["--repeats", "5"],
        "**How the log-prob path scales** with loss tokens and vocabulary, ours vs full logits.",
    ),
    "cache_join": (
        ["--examples", "20000", "--repeats", "5"],
        "**The behaviour log-prob cache** (targets: the join a small fraction of tokenising, scoring ≥ 0.9× a bare "
        "loop).",
    ),
}
GPU_BENCHMARKS = {
    "gpu_throughput": (
        [],
        "**LoRA on one GPU** against a hand-written loop (peft + autocast + logits + `cross_entropy` + AdamW), "
        "random-init models of real shapes (targets: pear ≥ 1.0× the loop's tokens/s at ≤ its peak memory; packed "
        "≥ 1.3× padded on mixed lengths; MFU at the best batch, aim ≥ 40%).",
    ),
}
IMAGES = {"logprob_scaling": "../benchmarks/results/logprob_scaling.png"}  # relative to docs/


def run_one(name: str, arguments: list[str], env: dict[str, str]) -> tuple[float, str | None]:
    """Run ``python -m benchmarks.<name>``; its seconds and, if it failed, the last lines it printed."""
    start = time.perf_counter()
    print(f"== {name} {' '.join(arguments)}", flush=True)
    process = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seconds = time.perf_counter() - start
    output = process.stdout.strip().splitlines()
    if process.returncode != 0:
        print("\n".join(output[-20:]))
        return seconds, f"failed (exit {process.returncode}): {output[-1] if output else 'no output'}"
    table = RESULTS / f"{name}.md"
    print(table.read_text() if table.exists() else "\n".join(output[-10:]))
    return seconds, None


def section(name: str, intro: str, failure: str | None) -> str:
    """One benchmark's part of docs/benchmarks.md: what it shows, then its table (or why there is none)."""
    parts = [intro, ""]
    table = RESULTS / f"{name}.md"
    if failure:
        parts.append(f"Not measured in the last run: {failure}.")
    elif table.exists():
        parts.append(table.read_text().strip())
    if name in IMAGES and not failure:
        parts += ["", f"![{name}]({IMAGES[name]})"]
    return "\n".join(parts)


def replace_between(text: str, marker: str, body: str, page: str = "docs/benchmarks.md") -> str:
    """``text`` (the content of ``page``) with what lies between ``<!-- marker:start -->`` and ``<!-- marker:end -->``
    replaced by ``body``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} ... {end} block to rewrite")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(only: list[str] | None, device: str) -> int:
    """Run the benchmarks for ``device`` (all, or ``only`` those), rewrite their page; non-zero if any failed."""
    benchmarks = GPU_BENCHMARKS if device == "cuda" else CPU_BENCHMARKS
    unknown = set(only or []) - set(benchmarks)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(benchmarks)}")
    # Every benchmark builds its models; nothing comes from the hub.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    failures: dict[str, str | None] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pear-bench-hf-") as hf_home:
        env["HF_HOME"] = hf_home  # a fresh datasets cache: no benchmark reads another's (or an old) cache
        for name, (arguments, _) in benchmarks.items():
            if only and name not in only:
                continue
            seconds, failures[name] = run_one(name, arguments, env)
            print(f"== {name}: {seconds:.0f} s", flush=True)
    minutes = (time.perf_counter() - started) / 60
    facts = machine()
    header = (
        f"Written by `python -m benchmarks.run{' --device cuda' if device == 'cuda' else ''}` on "
        f"{time.strftime('%Y-%m-%d')} in {minutes:.1f} min ({facts['cpus']} CPUs, {facts['memory_gb']} GiB"
        f"{', ' + machine('cuda')['gpu'] if device == 'cuda' else ''}; fp32 unless stated)."
    )
    if only:
        header += f" Last refreshed: {', '.join(only)}."
    body = "\n\n".join(
        [header]
        + [
            section(name, intro, failures.get(name))
            for name, (_, intro) in benchmarks.items()
            if (RESULTS / f"{name}.md").exists() or name in failures
        ]
    )
    marker = "gpu-benchmarks" if device == "cuda" else "benchmarks"
    PAGE.write_text(replace_between(PAGE.read_text(), marker, body))
    print(f"== all done in {minutes:.1f} min; docs/benchmarks.md rewritten between the {marker} markers")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    sys.exit(main(args.only, args.device))

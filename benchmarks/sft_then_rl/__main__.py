"""SFT with each weighting, then the same GRPO on every checkpoint: does PEAR's SFT make the better RL start?

    python -m benchmarks.sft_then_rl            # 5 arms × 3 seeds at the default size (about 20 min on 2 free cores)
    python -m benchmarks.sft_then_rl --quick    # a smoke run of every stage (a few minutes)

Every chain (arm × seed, one process each, ``--jobs`` at a time) fine-tunes the demo student on the demo's
behaviour-policy data with ``pear_lightning fit`` (the demo config, only the weighting and seed changed),
exports it with ``pear_lightning export``, samples the held-out problems (pass@1, pass@8), runs GRPO
through TRL with a verifiable reward, and samples them again. The report goes to
``benchmarks/results/sft_then_rl.{json,md,png}`` and, when README.md has the
``<!-- sft-then-rl:start -->`` / ``<!-- sft-then-rl:end -->`` markers, between them. ``--quick`` writes
its report into the work folder only. Checkpoints and logs stay in ``--work`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..common import machine, versions
from ..run import replace_between
from .chain import parse_args as chain_defaults
from .report import BASELINE, plot, ranking_agreement, summarize, table

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
MARKER = "sft-then-rl"
ARMS = ("UniformSFT", "SequenceIS", "TokenIS", "BlockIS", "DFT")
# The chain options a run may change; --quick shrinks every stage to a smoke test.
SIZE_OPTIONS = (
    "sft_steps",
    "rl_steps",
    "rl_prompts",
    "rl_generations",
    "rl_lr",
    "eval_problems",
    "eval_samples",
    "max_new_tokens",
)
QUICK = {"sft_steps": 60, "rl_steps": 4, "rl_prompts": 4, "rl_generations": 4, "eval_problems": 40, "eval_samples": 8}


def run_chain(arm: str, seed: int, options: dict, work: Path, env: dict[str, str]) -> tuple[dict | None, str]:
    """Run one chain in its own process; its result (None if it failed) and a line about it."""
    folder = work / f"{arm}-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "benchmarks.sft_then_rl.chain", "--arm", arm, "--seed", str(seed)]
    command += ["--work", str(folder)]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (folder / "log.txt").read_text().strip().splitlines()[-1:] or ["no output"]
        return None, f"{arm} seed {seed}: FAILED (exit {code}) after {seconds:.0f} s: {tail[0]} (see {folder}/log.txt)"
    result = json.loads((folder / "result.json").read_text())
    line = f"{arm} seed {seed}: {seconds:.0f} s; pass@8 {result['before_rl']['pass@8']:.3f}"
    if "after_rl" in result:
        line += (
            f" → {result['after_rl']['pass@8']:.3f} after RL (SFT greedy acc {result['sft_accuracy']:.3f}, "
            f"RL reward {result['rl_reward_first']:.2f} → {result['rl_reward_last']:.2f})"
        )
    return result, line


def verdicts(summary: dict) -> list[str]:
    """One factual sentence per PEAR/DFT arm: its paired post-RL difference from UniformSFT, and its sign per seed."""
    lines = []
    for arm, stats in summary.items():
        for k in ("pass@8", "pass@1"):
            delta = stats.get(f"delta_after_{k}")
            if not delta:
                continue
            values = delta["values"]
            if all(v > 0 for v in values):
                word = f"higher than UniformSFT in every one of {len(values)} seeds"
            elif all(v < 0 for v in values):
                word = f"lower than UniformSFT in every one of {len(values)} seeds"
            else:
                word = "not higher or lower than UniformSFT in every seed"
            lines.append(f"- {arm}: post-RL {k} {delta['mean']:+.3f} ± {delta['std']:.3f} (paired by seed): {word}.")
    return lines


def write_report(
    results: list[dict],
    failures: list[str],
    options: dict,
    args: argparse.Namespace,
    minutes: float,
    out: Path,
    name: str,
) -> str:
    """Write ``<name>.json``, ``.md`` and ``.png`` into ``out``; return the Markdown."""
    summary = summarize(results)
    facts = machine()
    command = "python -m benchmarks.sft_then_rl" + (" --quick" if args.quick else "")
    first = results[0] if results else {}
    rl = next((r["rl_settings"] for r in results if "rl_settings" in r), {})
    lines = [
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')} in {minutes:.1f} min ({facts['cpus']} CPUs, "
        f"{args.jobs} chains at a time). Arms × seeds: {len(args.arms)} × {len(args.seeds)} (seeds {args.seeds}).",
        "",
        f"SFT: `configs/demo.yaml` (the 0.5M-parameter demo student from scratch, 4000 behaviour-policy samples, "
        f"AdamW 3e-3 one-cycle, batch 32) for {first.get('options', {}).get('sft_steps', '?')} steps; only "
        "`--model.weighting` and `--seed_everything` change. GRPO (TRL `GRPOTrainer`, reward 1 for the exact "
        f"`#### answer`, else 0): {rl.get('steps')} steps × {rl.get('prompts_per_step')} fresh prompts × "
        f"{rl.get('generations')} completions, lr {rl.get('learning_rate')} constant, β (KL) {rl.get('beta')}, "
        f"loss `{rl.get('loss_type')}`, temperature {rl.get('temperature')}, ≤ {rl.get('max_completion_length')} "
        f"new tokens. Evaluation: the {first.get('options', {}).get('eval_problems', '?')} held-out demo problems "
        f"(`val.jsonl`, in neither SFT nor RL data), n = {first.get('options', {}).get('eval_samples', '?')} samples "
        "each at temperature 1, unbiased pass@k; SFT greedy acc is the trainer's own `val/accuracy`. "
        "Cells: mean ± sample std over seeds.",
        "",
        *table(summary),
        "",
        *verdicts(summary),
    ]
    for before, label in (("before_pass@8", "SFT-stage pass@8"), ("sft_accuracy", "SFT greedy accuracy")):
        rho = ranking_agreement({a: s for a, s in summary.items() if a != "behavior"}, before, "after_pass@8")
        if rho is not None:
            lines.append(f"- Rank correlation over the arms (Spearman) of {label} with post-RL pass@8: {rho:+.2f}.")
    if failures:
        lines += ["", "Chains that failed (left out of the table):", *[f"- {f}" for f in failures]]
    markdown = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": facts,
        "versions": versions(),
        "command": command,
        "minutes": minutes,
        "options": options,
        "summary": summary,
        "results": results,
        "failures": failures,
    }
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    if any("after_pass@8" in s for s in summary.values()):
        plot(summary, out / f"{name}.png", f"Same GRPO after each SFT weighting ({len(args.seeds)} seeds; {command})")
    return markdown


def main(args: argparse.Namespace) -> int:
    """Run every chain, write the report, rewrite the README block; non-zero if any chain failed."""
    defaults = vars(chain_defaults(["--arm", "x", "--seed", "0", "--work", "x"]))
    options = {k: defaults[k] for k in SIZE_OPTIONS} | (QUICK if args.quick else {})
    options |= {k: getattr(args, k) for k in SIZE_OPTIONS if getattr(args, k) is not None}
    work = Path(args.work)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    chains = [(arm, seed) for seed in args.seeds for arm in args.arms] + [("behavior", 0)]
    print(f"sft_then_rl: {len(chains)} chains, {args.jobs} at a time, {threads} thread(s) each; settings {options}")
    started = time.perf_counter()
    results, failures, done = [], [], 0
    with tempfile.TemporaryDirectory(prefix="pear-sft-rl-hf-") as hf_home:
        env = dict(
            os.environ,
            HF_HOME=hf_home,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(threads),
            PYTHONWARNINGS="ignore",
        )
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(run_chain, arm, seed, options | {"threads": threads}, work, env) for arm, seed in chains
            ]
            for future in futures:
                result, line = future.result()
                done += 1
                elapsed = (time.perf_counter() - started) / 60
                print(f"[{done}/{len(chains)}, {elapsed:.1f} min] {line}", flush=True)
                if result:
                    results.append(result)
                else:
                    failures.append(line)
    minutes = (time.perf_counter() - started) / 60
    out, name = (work, "sft_then_rl_quick") if args.quick else (RESULTS, "sft_then_rl")
    markdown = write_report(results, failures, options, args, minutes, out, name)
    print(markdown)
    print(f"sft_then_rl: done in {minutes:.1f} min; wrote {out}/{name}.{{json,md,png}}")
    if not args.quick:
        text = README.read_text()
        if f"<!-- {MARKER}:start -->" in text:
            image = f"\n\n![sft_then_rl](benchmarks/results/{name}.png)"
            README.write_text(replace_between(text, MARKER, markdown + image))
            print(f"sft_then_rl: README.md rewritten between the {MARKER} markers")
        else:
            print(f"sft_then_rl: README.md has no <!-- {MARKER}:start --> block; left as it is")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; size options left unset keep the chain's defaults (or --quick's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks every stage in a few minutes")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="weighting strategies, UniformSFT first")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0 1)")
    parser.add_argument("--jobs", type=int, default=2, help="chains run at the same time")
    parser.add_argument("--work", default=str(REPO / "runs" / "sft_then_rl"), help="checkpoints and logs")
    parser.add_argument("--sft-steps", type=int, help="SFT optimizer steps (default 500, the demo's)")
    parser.add_argument("--rl-steps", type=int, help="GRPO steps (default 200)")
    parser.add_argument("--rl-prompts", type=int, help="prompts per GRPO step (default 8)")
    parser.add_argument("--rl-generations", type=int, help="completions per prompt, the GRPO group (default 8)")
    parser.add_argument("--rl-lr", type=float, help="GRPO learning rate (default 5e-5)")
    parser.add_argument("--eval-problems", type=int, help="held-out problems evaluated (default 200, all)")
    parser.add_argument("--eval-samples", type=int, help="samples per problem, n of pass@k (default 16; ≥ 8)")
    parser.add_argument("--max-new-tokens", type=int, help="completion length cap, RL and evaluation (default 48)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if BASELINE not in args.arms:
        parser.error(f"--arms must include {BASELINE}: every other arm is compared with it")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))

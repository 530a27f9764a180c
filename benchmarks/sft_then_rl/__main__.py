"""SFT with each weighting, then the same GRPO on every checkpoint: does PEAR's SFT make the better RL start?

    python -m benchmarks.sft_then_rl                     # the pretrained regime (about 55 min on 2 free cores)
    python -m benchmarks.sft_then_rl --quick             # a smoke run of every stage of it (a few minutes)
    python -m benchmarks.sft_then_rl --regime scratch    # the from-scratch regime, kept for contrast (about 22 min)

**Pretrained regime** (the default; ``regime.py``): a student pretrained on its own terse style, and a behaviour policy
π_β that writes long worded solutions. The run draws π_β's samples (the SFT data), then runs every chain (one
process each, ``--jobs`` at a time): UniformSFT at several SFT lengths (the sweep, which looks for the phenomenon:
a stronger SFT checkpoint ending weaker after the same RL), and every arm (UniformSFT; SequenceIS, TokenIS, BlockIS
with both loss normalisers) at one length over ``--seeds``. A chain fine-tunes the student with
``pear_lightning fit``, exports it, samples the held-out problems (pass@1/8/16), runs GRPO through TRL with a
verifiable reward, and samples them again. The report: ``benchmarks/results/sft_then_rl.{json,md,png}`` and the
block of docs/evidence.md between ``<!-- sft-then-rl:start -->`` and ``<!-- sft-then-rl:end -->``.

**Scratch regime**: the demo's student from random weights on the demo's data, five arms; its report is
``sft_then_rl_scratch.*`` and the ``sft-then-rl-scratch`` block of docs/evidence.md. ``--quick`` writes its report
into the work folder only. Checkpoints and logs stay in ``--work`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..common import machine, versions
from ..run import replace_between
from . import pretrained_report
from .chain import parse_args as chain_defaults
from .report import BASELINE, plot, ranking_agreement, summarize, table

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
PAGE = REPO / "docs" / "evidence.md"  # the page whose marker blocks are rewritten
SCRATCH_ARMS = ("UniformSFT", "SequenceIS", "TokenIS", "BlockIS", "DFT")
# The pretrained regime's arms: (strategy, model.loss_normalizer); UniformSFT's weights are all 1, so one row.
PRETRAINED_ARMS = (
    ("UniformSFT", "tokens"),
    ("SequenceIS", "tokens"),
    ("SequenceIS", "weights"),
    ("TokenIS", "tokens"),
    ("TokenIS", "weights"),
    ("BlockIS", "tokens"),
    ("BlockIS", "weights"),
)
# Each regime's chain options (those a run may change), and what --quick shrinks them to.
SIZE_OPTIONS = ("rl_steps", "rl_prompts", "rl_generations", "rl_lr", "eval_problems", "eval_samples", "max_new_tokens")
DEFAULTS = {
    "scratch": {"sft_steps": 500, "rl_steps": 200, "eval_problems": 200},
    "pretrained": {"sft_steps": 200, "rl_steps": 25, "eval_problems": 40},
}
QUICK = {
    "scratch": {
        "sft_steps": 60,
        "rl_steps": 4,
        "rl_prompts": 4,
        "rl_generations": 4,
        "eval_problems": 40,
        "eval_samples": 8,
    },
    "pretrained": {
        "sft_steps": 20,
        "rl_steps": 2,
        "rl_prompts": 4,
        "rl_generations": 4,
        "eval_problems": 8,
        "eval_samples": 16,
    },
}
SWEEP = (0, 100, 400)  # UniformSFT lengths besides the arms' own, on --sweep-seeds
QUICK_SWEEP = (0, 40)


def run_chain(chain: dict, options: dict, work: Path, env: dict[str, str]) -> tuple[dict | None, str]:
    """Run one chain (``arm``, ``normalizer``, ``sft_steps``, ``seed``) in its own process; its result (None if it
    failed) and a line about it."""
    name = f"{chain['arm']}-{chain['normalizer']}-{chain['sft_steps']}-{chain['seed']}"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "benchmarks.sft_then_rl.chain", "--work", str(folder)]
    for key, value in (options | chain).items():  # the chain's own settings win
        command += [f"--{key.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (folder / "log.txt").read_text().strip().splitlines()[-1:] or ["no output"]
        return None, f"{name}: FAILED (exit {code}) after {seconds:.0f} s: {tail[0]} (see {folder}/log.txt)"
    result = json.loads((folder / "result.json").read_text())
    before = result["before_rl"]
    line = f"{name}: {seconds:.0f} s; pass@1 {before['pass@1']:.3f}, pass@8 {before['pass@8']:.3f}"
    if "after_rl" in result:
        after = result["after_rl"]
        line += (
            f" → {after['pass@1']:.3f}, {after['pass@8']:.3f} after RL "
            f"(RL reward {result['rl_reward_first']:.2f} → {result['rl_reward_last']:.2f})"
        )
    return result, line


def run_chains(chains: list[dict], options: dict, work: Path, jobs: int) -> tuple[list[dict], list[str]]:
    """Run ``chains`` ``jobs`` at a time (one thread each per free core), printing a line as each ends."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"sft_then_rl: {len(chains)} chains, {jobs} at a time, {threads} thread(s) each; settings {options}")
    started = time.perf_counter()
    results, failures = [], []
    with tempfile.TemporaryDirectory(prefix="pear-sft-rl-hf-") as hf_home:
        env = dict(
            os.environ,
            HF_HOME=hf_home,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(threads),
            PYTHONWARNINGS="ignore",
        )
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(run_chain, chain, options | {"threads": threads}, work, env) for chain in chains]
            for done, future in enumerate(futures, start=1):
                result, line = future.result()
                elapsed = (time.perf_counter() - started) / 60
                print(f"[{done}/{len(chains)}, {elapsed:.1f} min] {line}", flush=True)
                if result:
                    results.append(result)
                else:
                    failures.append(line)
    return results, failures


def rewrite_readme(marker: str, markdown: str, image: str) -> None:
    """Put ``markdown`` and the plot between the ``marker`` comments of docs/evidence.md, if it has them."""
    text = PAGE.read_text()
    if f"<!-- {marker}:start -->" in text:
        block = f"{markdown}\n\n![{marker}](../benchmarks/results/{image})"  # the image link is relative to docs/
        PAGE.write_text(replace_between(text, marker, block, page="docs/evidence.md"))
        print(f"sft_then_rl: docs/evidence.md rewritten between the {marker} markers")
    else:
        print(f"sft_then_rl: docs/evidence.md has no <!-- {marker}:start --> block; left as it is")


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
    command = "python -m benchmarks.sft_then_rl --regime scratch" + (" --quick" if args.quick else "")
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


def main_pretrained(args: argparse.Namespace, options: dict) -> int:
    """The pretrained regime: draw π_β's data, run the sweep and the arms, write the report and the docs block."""
    work = Path(args.work)
    data = work / "data"
    started = time.perf_counter()
    shutil.rmtree(data, ignore_errors=True)  # drawn afresh every run (30 s): never log-probs of an older π_β
    draw = [sys.executable, "-m", "benchmarks.sft_then_rl.regime", "--data", str(data)]
    draw += ["--num-train", str(args.num_train)]
    subprocess.run(draw, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"), check=True)
    steps = options.pop("sft_steps")
    lengths = QUICK_SWEEP if args.quick else SWEEP
    common = {"regime": "pretrained", "data": str(data)}
    chains = [
        common | {"arm": "UniformSFT", "normalizer": "tokens", "sft_steps": s, "seed": seed}
        for s in sorted(lengths, reverse=True)  # the longest first, so that no long chain is left for the end
        for seed in args.sweep_seeds
        if s != steps
    ]
    chains += [
        common | {"arm": arm, "normalizer": normalizer, "sft_steps": steps, "seed": seed}
        for seed in args.seeds
        for arm, normalizer in PRETRAINED_ARMS
    ]
    chains.append(common | {"arm": "behavior", "normalizer": "tokens", "sft_steps": 0, "seed": 0, "rl_steps": 0})
    results, failures = run_chains(chains, options, work, args.jobs)
    minutes = (time.perf_counter() - started) / 60
    train = [json.loads(line) for line in open(data / "train.jsonl")]
    students = [r["before_rl"] for r in results if r["arm"] == BASELINE and r["sft_steps"] == 0]
    references = {
        "student (pretrained, its own style)": {k: statistics.fmean(s[k] for s in students) for k in students[0]}
        if students
        else {},
        "π_β (the SFT data's policy)": next((r["before_rl"] for r in results if r["arm"] == "behavior"), {}),
    }
    report = {
        "benchmark": "sft_then_rl",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions(),
        "command": "python -m benchmarks.sft_then_rl" + (" --quick" if args.quick else ""),
        "minutes": minutes,
        "settings": options
        | {
            "sft_steps": steps,
            "sweep": sorted({*lengths, steps}),
            "sweep_seeds": args.sweep_seeds,
            "seeds": args.seeds,
            "jobs": args.jobs,
            "num_train": len(train),
            "response_tokens": statistics.fmean(len(r["token_ids"]) for r in train),
            "max_new_tokens": results[0]["options"]["max_new_tokens"] if results else None,
        },
        "references": {k: v for k, v in references.items() if v},
        "results": results,
        "failures": failures,
    }
    lines = pretrained_report.render(report)
    if failures:
        lines += ["", "Chains that failed (left out of the tables):", *[f"- {f}" for f in failures]]
    markdown = "\n".join(lines)
    out, name = (work, "sft_then_rl_quick") if args.quick else (RESULTS, "sft_then_rl")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    pretrained_report.plot(report, out / f"{name}.png")
    print(markdown)
    print(f"sft_then_rl: done in {minutes:.1f} min; wrote {out}/{name}.{{json,md,png}}")
    if not args.quick:
        rewrite_readme("sft-then-rl", markdown, f"{name}.png")
    return 1 if failures else 0


def main_scratch(args: argparse.Namespace, options: dict) -> int:
    """The from-scratch regime: five arms × seeds from the demo's random student; the report and its docs block."""
    work = Path(args.work)
    started = time.perf_counter()
    chains = [
        {"regime": "scratch", "arm": arm, "normalizer": "tokens", "sft_steps": options["sft_steps"], "seed": seed}
        for seed in args.seeds
        for arm in args.arms
    ]
    chains.append({"regime": "scratch", "arm": "behavior", "normalizer": "tokens", "sft_steps": 0, "seed": 0})
    results, failures = run_chains(chains, {k: v for k, v in options.items() if k != "sft_steps"}, work, args.jobs)
    minutes = (time.perf_counter() - started) / 60
    out, name = (work, "sft_then_rl_scratch_quick") if args.quick else (RESULTS, "sft_then_rl_scratch")
    markdown = write_report(results, failures, options, args, minutes, out, name)
    print(markdown)
    print(f"sft_then_rl: done in {minutes:.1f} min; wrote {out}/{name}.{{json,md,png}}")
    if not args.quick:
        rewrite_readme("sft-then-rl-scratch", markdown, f"{name}.png")
    return 1 if failures else 0


def main(args: argparse.Namespace) -> int:
    """Run the chosen regime; non-zero if any chain failed."""
    defaults = vars(chain_defaults(["--arm", "x", "--seed", "0", "--work", "x"]))
    options = (
        {k: defaults[k] for k in SIZE_OPTIONS} | DEFAULTS[args.regime] | (QUICK[args.regime] if args.quick else {})
    )
    options |= {k: getattr(args, k) for k in (*SIZE_OPTIONS, "sft_steps") if getattr(args, k) is not None}
    options = {k: v for k, v in options.items() if v is not None}
    return main_pretrained(args, options) if args.regime == "pretrained" else main_scratch(args, options)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; size options left unset keep the regime's defaults (or --quick's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=("pretrained", "scratch"), default="pretrained")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks every stage in a few minutes")
    parser.add_argument(
        "--arms", nargs="+", default=list(SCRATCH_ARMS), help="scratch regime: strategies, UniformSFT first"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="pretrained: 0-4 (--quick: 0); scratch: 0 1 2"
    )
    parser.add_argument("--sweep-seeds", nargs="+", type=int, default=None, help="pretrained: the sweep's, default 0 1")
    parser.add_argument("--jobs", type=int, default=2, help="chains run at the same time")
    parser.add_argument("--work", default=None, help="checkpoints and logs (default runs/sft_then_rl[_scratch])")
    parser.add_argument("--num-train", type=int, default=2000, help="pretrained: π_β's samples drawn for SFT")
    parser.add_argument("--sft-steps", type=int, help="SFT optimizer steps (pretrained 200, scratch 500)")
    parser.add_argument("--rl-steps", type=int, help="GRPO steps (pretrained 25, scratch 200)")
    parser.add_argument("--rl-prompts", type=int, help="prompts per GRPO step (default 8)")
    parser.add_argument("--rl-generations", type=int, help="completions per prompt, the GRPO group (default 8)")
    parser.add_argument("--rl-lr", type=float, help="GRPO learning rate (default 5e-5)")
    parser.add_argument("--eval-problems", type=int, help="held-out problems evaluated (pretrained 40, scratch 200)")
    parser.add_argument("--eval-samples", type=int, help="samples per problem, n of pass@k (default 16; ≥ 8)")
    parser.add_argument("--max-new-tokens", type=int, help="completion length cap (pretrained 224, scratch 48)")
    args = parser.parse_args(argv)
    pretrained = args.regime == "pretrained"
    if args.seeds is None:
        args.seeds = ([0] if args.quick else [0, 1, 2, 3, 4]) if pretrained else ([0, 1] if args.quick else [0, 1, 2])
    if args.sweep_seeds is None:
        args.sweep_seeds = [0] if args.quick else [0, 1]
    if args.work is None:
        args.work = str(REPO / "runs" / ("sft_then_rl" if pretrained else "sft_then_rl_scratch"))
    if BASELINE not in args.arms:
        parser.error(f"--arms must include {BASELINE}: every other arm is compared with it")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))

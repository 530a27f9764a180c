"""LoRA training throughput and MFU of pear_lightning on one GPU, for real models.

    python -m benchmarks.gpu_throughput [--models HuggingFaceTB/SmolLM2-135M-Instruct Qwen/Qwen2.5-1.5B-Instruct]
        [--batch-size 8] [--tokens 1024] [--steps 20] [--warmup 5] [--repeats 5] [--peak-tflops N]

For each model (a hub name or a local folder) and each weighting (UniformSFT, TokenIS): LoRA (r 16,
all linear layers), bf16-mixed, ``Trainer.fit`` on synthetic prompt/completion examples of about
``--tokens`` tokens, batch ``--batch-size``; tokens/s over the steps after the warm-up, and
MFU = 6 · N · tokens/s / peak bf16 FLOP/s, with N all the model's parameters (the usual convention;
LoRA skips the frozen weights' gradients, so the FLOPs actually done are nearer 4 · N). The peak
comes from the GPU's name (dense bf16, from the vendors' data sheets) or ``--peak-tflops``. The
weightings alternate within each repetition. Writes ``benchmarks/results/gpu_throughput.{json,md}``.
``--device cpu`` runs the same code on the CPU (for checking the script, not for its figures).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_lightning.lora import LoraSettings
from pear_lightning.strategies import TokenIS, UniformSFT

from .common import synthetic_examples, with_range, write_results
from .throughput import fit_pear, training_data

# Dense bf16 tensor-core peaks, TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}
WEIGHTINGS = {"UniformSFT": UniformSFT, "TokenIS": TokenIS}


def peak_tflops(device: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak: ``override``, else looked up by name; None when unknown."""
    if override or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def bench_model(model: str, args: argparse.Namespace, root: Path) -> dict:
    """Tokens/s of each weighting on ``model``, ``args.repeats`` alternated repetitions."""
    model_dir = root / model.replace("/", "--")
    # A local copy, so every run loads the same files without touching the hub again.
    pretrained = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    parameters = sum(p.numel() for p in pretrained.parameters())
    pretrained.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model).save_pretrained(model_dir)
    del pretrained
    count = (args.warmup + args.steps) * args.batch_size
    rows = synthetic_examples(count, args.tokens, spread_tokens=args.tokens // 4)
    (data_dir := root / f"{model_dir.name}-data").mkdir()
    data = training_data(data_dir, model_dir, rows, 2 * args.tokens)
    timed_tokens = data.timed_tokens(args.batch_size, args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in WEIGHTINGS}
    for repeat in range(args.repeats):
        for name in WEIGHTINGS if repeat % 2 == 0 else reversed(WEIGHTINGS):
            times = fit_pear(
                model_dir,
                data,
                WEIGHTINGS[name](),
                args.batch_size,
                2 * args.tokens,
                args.warmup + args.steps,
                args.device,
                precision="bf16-mixed",
                lora=LoraSettings(),
            )
            rates[name].append(timed_tokens / (times[-1] - times[args.warmup - 1]))
    mean_tokens = sum(map(len, data.input_ids)) / len(data.input_ids)
    return {"model": model, "parameters": parameters, "mean_tokens": mean_tokens, "tokens_per_s": rates}


def main(args: argparse.Namespace) -> None:
    """Benchmark every model and write the results."""
    peak = peak_tflops(args.device, args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="pear-gpu-bench-") as root:
        results = [bench_model(model, args, Path(root)) for model in args.models]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (script check only)"
    lines = [
        f"LoRA (r 16, all linear layers), bf16-mixed, {device_name}; batch {args.batch_size} × about {args.tokens} "
        f"tokens; {args.steps} timed steps after {args.warmup}; median (min–max) of {args.repeats} alternated "
        f"repetitions (`python -m benchmarks.gpu_throughput`). MFU = 6·N·tokens/s / "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'peak (unknown for this GPU: pass --peak-tflops)'}.",
        "",
        "| model | parameters | mean tokens / example | weighting | tokens/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, rates in result["tokens_per_s"].items():
            mfu = [6 * result["parameters"] * r / (peak * 1e12) for r in rates] if peak else None
            result.setdefault("mfu", {})[name] = mfu
            lines.append(
                f"| {result['model']} | {result['parameters'] / 1e6:,.0f}M | {result['mean_tokens']:.0f} | {name} | "
                f"{with_range(rates, 0)} | "
                f"{with_range(mfu) if mfu else 'n/a'} |"
            )
    settings = {k: getattr(args, k) for k in ("device", "batch_size", "tokens", "steps", "warmup", "repeats")}
    write_results("gpu_throughput", {"settings": settings, "peak_tflops": peak, "results": results}, lines, args.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"]
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="mean tokens per example (±25%%)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

"""``python -m pear_lightning inspect_logprobs``: look at the behaviour log-probs before spending GPU hours.

Prints the counts and quantiles of the behaviour log-probs a run would train with, and, with the
run's model as π_θ, the initial log-ratios δ = log π_θ − log π_β and the weights each PEAR strategy
would give at step 0 (with their diagnostics), overall and, for a mixture, per source. ``--plot`` writes a PNG of
their histograms.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from pear_lightning.atomic import atomic_write, check_writable
from pear_lightning.data.datamodule import PearDataModule
from pear_lightning.errors import PearError
from pear_lightning.model.load import check_example_positions
from pear_lightning.strategies import BlockIS, ImportanceSampling, SequenceIS, TokenIS
from pear_lightning.training.diagnostics import source_masks, source_metrics, token_sources
from pear_lightning.training.module import PearModule

QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)


def describe(name: str, values: torch.Tensor) -> str:
    """One line: count, mean and quantiles."""
    q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    cells = "  ".join(f"{v:>9.4f}" for v in q)
    return f"{name:<22} {values.numel():>9}  {values.double().mean().item():>9.4f}  {cells}"


@torch.no_grad()
def inspect_logprobs(
    module: PearModule, data: PearDataModule, plot: str | None = None, max_examples: int = 2000
) -> str:
    """Print (and return) the report on the behaviour log-probs ``module`` would train with on ``data``.

    Args:
        module: the run's module: π_θ, and its weighting (reported beside the built-in PEAR strategies).
        data: the run's data, with its behaviour log-probs (a cache, or columns of the data).
        plot: write histograms to this PNG file.
        max_examples: inspect at most this many examples.

    Returns:
        The report's text.

    Raises:
        PearError: if ``max_examples`` < 1, the plot cannot be written, or the data has no behaviour log-probs.
    """
    if max_examples < 1:
        raise PearError(f"--max_examples {max_examples}: must be >= 1")
    if plot:
        pyplot()  # before the work: a missing matplotlib or an unwritable place is found now
        if Path(plot).is_dir():
            raise PearError(f"--plot {plot}: a folder; give the PNG file to write")
        check_writable(Path(plot).parent, "--plot")
    data.setup("fit")
    train = data.paths["train"] or f"data.mixture (sources {', '.join(data.source_names)})"
    if "behavior_logp" not in data.datasets["train"].column_names:
        raise PearError(
            f"{train}: has no behaviour log-probs to inspect: set data.logprobs_path to a cache made by "
            "`python -m pear_lightning cache_logprobs`, or give the data `token_ids` and `logprobs` columns"
        )
    module.configure_model()
    module.eval()
    check_example_positions(module.hparams.model_name_or_path, module.model.config, data.longest(("train",)))
    strategies = {"SequenceIS": SequenceIS(), "TokenIS": TokenIS(), "BlockIS": BlockIS()}
    if isinstance(module.weighting, ImportanceSampling):
        strategies[f"{type(module.weighting).__name__} (config)"] = module.weighting
    seen, behavior, deltas, weights, metrics, sources = collect(module, data, strategies, max_examples)
    header = f"{'':<22} {'tokens':>9}  {'mean':>9}  " + "  ".join(f"{'q' + str(q):>9}" for q in QUANTILES)
    lines = [f"{sum(seen.values())} examples of {train}, π_θ = {module.hparams.model_name_or_path}", header]
    lines.append(describe("log π_β", behavior))
    lines.append(describe("δ = log π_θ − log π_β", deltas))
    lines += [describe(f"weight {name}", weights[name]) for name in strategies]
    lines.append("")
    lines += [metrics_line(name, metrics[("", name)]) for name in strategies]
    for index, source in enumerate(data.source_names):  # a mixture's sources, each on its own
        if seen[source]:
            lines += ["", f"source {source}: {seen[source]} examples", header]
            lines.append(describe(f"{source}: log π_β", behavior[sources == index]))
            lines.append(describe(f"{source}: δ", deltas[sources == index]))
            lines += [metrics_line(f"{source}: {name}", metrics[(source, name)]) for name in strategies]
    report = "\n".join(lines)
    print(report)
    if plot:
        draw(plot, behavior, deltas, weights)
        rank_zero_info(f"wrote {plot}")
    return report


def metrics_line(name: str, per_batch: list[dict[str, float]]) -> str:
    """A strategy's diagnostics, each the mean over the batches."""
    averaged = {k: sum(m[k] for m in per_batch) / len(per_batch) for k in per_batch[0]}
    return f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in averaged.items()) + " (mean over batches)"


def collect(
    module: PearModule, data: PearDataModule, strategies: dict[str, ImportanceSampling], max_examples: int
) -> tuple[Counter, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[tuple[str, str], list], torch.Tensor]:
    """Score the first ``max_examples`` training examples (whole batches) of the epoch's order (a mixture's draw).

    Returns:
        The examples seen (by source name, "" without a mixture); their loss tokens' behaviour log-probs and
        log-ratios; each strategy's weights; its diagnostics per batch, by (source name, strategy name), "" naming all
        the sources; and each loss token's source index (-1 without a mixture).
    """
    behavior, deltas, sources, seen = [], [], [], Counter()
    weights: dict[str, list[torch.Tensor]] = {name: [] for name in strategies}
    metrics: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for batch in data.train_dataloader():
        if sum(seen.values()) >= max_examples:
            break
        tokens, masks = module.token_batch(batch), source_masks(batch, data.source_names)
        of_token = token_sources(batch)
        of_token = of_token if of_token is not None else torch.full_like(tokens.mask, -1, dtype=torch.long)
        of_example = batch["source"].tolist() if "source" in batch else [-1] * len(batch["ids"])
        seen.update(data.source_names[s] if s >= 0 else "" for s in of_example)
        behavior.append(tokens.behavior_logp[tokens.mask])
        deltas.append((tokens.logp - tokens.behavior_logp)[tokens.mask])
        sources.append(of_token[tokens.mask])
        for name, strategy in strategies.items():
            w = strategy.weights(tokens)
            weights[name].append(w[tokens.mask])
            metrics[("", name)].append({k: v.item() for k, v in strategy.metrics(tokens, w).items()})
            for source_name, mask in masks.items():
                own = source_metrics(strategy, tokens, w, mask)
                metrics[(source_name, name)].append({k: v.item() for k, v in own.items()})
    behavior, deltas = torch.cat(behavior), torch.cat(deltas)
    return seen, behavior, deltas, {n: torch.cat(w) for n, w in weights.items()}, metrics, torch.cat(sources)


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PearError("--plot needs matplotlib: pip install 'pear_lightning[plot]'") from err
    return plt


def draw(path: str, behavior: torch.Tensor, deltas: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    """Histograms of the behaviour log-probs, the log-ratios and each strategy's weights, in one PNG."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(behavior.numpy(), bins=60, log=True)
    axes[0].set(title="behaviour log-probs log π_β", xlabel="log-prob", ylabel="tokens")
    axes[1].hist(deltas.clamp(-5, 5).numpy(), bins=60, log=True)
    axes[1].set(title="initial log-ratio δ (clamped to ±5 for display)", xlabel="δ")
    for name, w in weights.items():
        axes[2].hist(w.log().numpy(), bins=60, histtype="step", label=name, log=True)
    axes[2].set(title="log of the step-0 weights", xlabel="log w")
    axes[2].legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)

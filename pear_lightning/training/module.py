"""PearModule: a Hugging Face causal LM fine-tuned with a pluggable weighting strategy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.core.optimizer import LightningOptimizer
from torchmetrics.aggregation import MeanMetric
from transformers import AutoConfig, PreTrainedModel

from pear_lightning.data.datamodule import PearDataModule
from pear_lightning.errors import LOAD_ERRORS
from pear_lightning.model.attention import model_inputs
from pear_lightning.model.load import check_checkpoint, check_example_positions, load_model, trainable_keys
from pear_lightning.model.logprobs import ChunkSize, response_logprobs, target_logprobs
from pear_lightning.model.lora import LoraSettings
from pear_lightning.strategies import TokenBatch, UniformSFT, WeightingStrategy
from pear_lightning.training.diagnostics import StepDiagnostics, log_nll, log_step, logging_step, source_masks
from pear_lightning.training.distill import LossKind, score
from pear_lightning.training.loss import LossTerms, Normalizer, loss_terms
from pear_lightning.training.schedule import build_optimization
from pear_lightning.training.step import StepBooks, check_strategy, scale_gradients

DEFAULT_WEIGHTING = lazy_instance(UniformSFT)


class PearModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM whose per-token loss comes from a weighting strategy.

    Each micro-batch's fp32 log-probs go to ``weighting`` as a ``TokenBatch`` (``loss``); the optimizer step divides the
    sum of its token losses over all micro-batches and ranks by the step's ``loss_normalizer`` (``step``), so
    ``accumulate_grad_batches`` and the device count do not change the gradient. Validation and test report the
    unweighted token-mean negative log-likelihood, so runs with different weightings stay comparable.

    Args:
        model_name_or_path: a Hugging Face hub name or a local folder holding a causal LM.
        weighting: the weighting strategy, by class name (``UniformSFT``) or with arguments.
        loss: each token's loss: ``nll`` (SFT), ``kl`` (KL from the cached teacher's top k: distillation, see
            ``distill``) or ``nll+kl`` (their sum); the weights multiply it, IS ratios still use the data token.
        loss_normalizer: what the step's summed token losses are divided by: ``tokens``, its loss tokens (a weight
            below 1 shrinks that token's gradient), or ``weights``, Σ weights (self-normalised: only ratios matter).
        logprob_chunk_size: loss tokens projected to the vocabulary at once (recomputed in backward); 0: full logits;
            ``auto``: all, kept, if they fit a budget (half the free GPU memory, 1 GiB on CPU), else the most that fit.
        lora: train LoRA adapters on the frozen model instead of all its weights (checkpoints hold the adapters).
        gradient_checkpointing: recompute each decoder layer's activations in backward to save memory.
        load_in_4bit: QLoRA: the frozen base model in 4-bit NF4 through bitsandbytes (one CUDA GPU; needs ``lora``).
        attn_implementation: transformers' (``sdpa``, ``eager``, ``flash_attention_2``…; default: its own choice), or
            ``pear_varlen``: torch's FlashAttention varlen kernel for packed batches on CUDA (else SDPA).
        trust_remote_code: allow the model folder or hub repository to run its own code.
        max_nonfinite_steps: optimizer steps that may be skipped for a NaN or an infinity in their loss or gradient
            (any micro-batch, any rank): weights, optimizer state and schedule stay as they were, a warning names the
            examples. One more stops the run (0: the first one does).
        saturation_warning: warn once when more than this fraction of the loss tokens of the logging steps of 20
            optimizer steps (at least one) have their per-token log-ratio at one clip bound or their log-weight at a
            clip bound (the clip, not π_θ/π_β, sets the weights), or, under ``tokens``, when the mean weight leaves
            [1/10, 10]; 1: never.
        float32_matmul_precision: on a CUDA GPU, how fp32 matrix products may run (torch's setting): ``high``
            lets tensor cores use TF32 (mixed-precision compute is bf16 anyway), ``highest`` keeps full fp32.
        optimizer: set by the CLI's ``optimizer:`` key; default AdamW(lr=1e-5), over the trainable parameters.
        lr_scheduler: set by the CLI's ``lr_scheduler:`` key; default none (constant learning rate).
    """

    def __init__(
        self,
        model_name_or_path: str,
        weighting: WeightingStrategy = DEFAULT_WEIGHTING,
        loss: LossKind = "nll",
        loss_normalizer: Normalizer = "tokens",
        logprob_chunk_size: ChunkSize = "auto",
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        load_in_4bit: bool = False,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_nonfinite_steps: int = 3,
        saturation_warning: float = 0.5,
        float32_matmul_precision: Literal["highest", "high", "medium"] = "high",
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["weighting", "lora"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None  # plain data: checkpoints load weights_only
        self.weighting = weighting
        self.model: PreTrainedModel | None = None
        self.chunk_size = logprob_chunk_size
        self.books = StepBooks(max_nonfinite_steps)
        self.diagnostics = StepDiagnostics(saturation_warning)
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()
        self.source_names: list[str] = []  # a mixture's, by the index in batch["source"] (see setup)

    def setup(self, stage: str) -> None:
        """Refuse a training strategy the step's normalisation cannot serve, and examples longer than the model's
        positions (before the first step); on CUDA, set the fp32 matmul precision."""
        check_strategy(self.trainer.strategy)
        data, path = self.trainer.datamodule, self.hparams.model_name_or_path
        if isinstance(data, PearDataModule):
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=self.hparams.trust_remote_code)
            except LOAD_ERRORS:
                config = None  # configure_model names the problem
            check_example_positions(path, config, data.longest())
            self.source_names = data.source_names
        if self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision(self.hparams.float32_matmul_precision)

    def configure_model(self) -> None:
        """Load the model (once); Lightning then applies the precision (see ``model.load_model``)."""
        if self.model is None:
            hp = self.hparams
            lora = LoraSettings(**hp.lora) if hp.lora is not None else None
            args = (hp.trust_remote_code, lora, hp.gradient_checkpointing, hp.load_in_4bit, self.device_mesh)
            self.model, chunkable = load_model(hp.model_name_or_path, *args, hp.attn_implementation)
            self.chunk_size = self.chunk_size if chunkable else 0
            self.strict_loading = lora is None  # checkpoints hold only the adapters; on_load_checkpoint checks them

    def checkpointed_keys(self) -> set[str]:
        """The state-dict keys a checkpoint of this module holds: the trainable ones under LoRA, else all."""
        return set(self.state_dict()) if self.hparams.lora is None else trainable_keys(self.model, "model.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under LoRA, keep only the adapters: the frozen base model is the pretrained folder's."""
        keep = self.checkpointed_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["nonfinite_steps"] = self.books.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (or another LoRA setup) before any weight is loaded."""
        setup = f"{self.hparams.model_name_or_path}, lora={'on' if self.hparams.lora else 'off'}"
        if "state_dict" in checkpoint:  # absent from a sharded one: its strategy loaded the weights itself, strictly
            check_checkpoint(self.checkpointed_keys(), self.state_dict(), checkpoint["state_dict"], setup)
        self.books.skipped_steps = checkpoint.get("nonfinite_steps", 0)

    def token_batch(self, batch: dict[str, Any]) -> TokenBatch:
        """fp32 log-probs of a collated batch, padded or packed."""
        inputs = model_inputs(batch, self.model.config._attn_implementation)
        mask, segments = batch["loss_mask"], batch.get("segment_ids")
        logp = target_logprobs(self.model, inputs, mask, self.chunk_size, batch.get("scored"))
        return TokenBatch(logp=logp, mask=mask, behavior_logp=batch.get("behavior_logp"), segment_ids=segments)

    def loss_terms(self, batch: dict[str, Any], metrics: bool = True) -> LossTerms:
        """Score a batch and weigh it with the strategy (see ``loss.loss_terms``; ``distill.score`` for the KL)."""
        hp = self.hparams
        if hp.loss == "nll":
            return loss_terms(self.weighting, self.token_batch(batch), hp.loss_normalizer, metrics=metrics)
        tokens, per_token, kl_metrics = score(self.model, batch, hp.loss, self.chunk_size, metrics)
        return loss_terms(self.weighting, tokens, hp.loss_normalizer, per_token, kl_metrics, metrics)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Count one micro-batch in its optimizer step and return its unnormalised loss (see ``optimizer_step``).
        Diagnostics (overall, and per source of a mixture) and throughput are computed and logged on logging steps only
        (``trainer.log_every_n_steps``)."""
        terms = self.loss_terms(batch, metrics=(logs := logging_step(self.trainer)))
        self.books.add(terms, batch["ids"])
        sources = source_masks(batch, self.source_names) if logs else None
        self.diagnostics.log(self, self.weighting, terms, batch["num_tokens"], logs, sources)
        return terms.total

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer | LightningOptimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """One optimizer step, in order: the last micro-batch's forward and backward; the step's totals over all ranks;
        skip the step if its loss or gradient is non-finite (AdamW would still decay the weights and move its moments
        on zeroed gradients); else rescale the gradient (undo Lightning's division by ``accumulate_grad_batches`` and
        the mean over ranks, divide by the step's normaliser; clipping, in ``optimizer.step``, sees it) and update."""
        loss = optimizer_closure() if optimizer_closure is not None else None
        totals = self.books.close(self.trainer, self.parameters())
        log_step(self, totals, self.books.skipped_steps, optimizer.param_groups[0]["lr"])  # the schedule steps after
        if totals.skipped:
            return
        accumulated = self.trainer.accumulate_grad_batches * self.trainer.world_size
        scale_gradients(self.parameters(), accumulated / max(totals.normalizer, 1e-8))
        optimizer.step(closure=lambda: loss)

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """Step the learning-rate schedule, except after a skipped optimizer step: it follows the updates made."""
        if not self.books.last_skipped:
            super().lr_scheduler_step(scheduler, metric)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the token-mean negative log-likelihood of the validation responses as ``val/loss``."""
        log_nll(self, batch, self.val_nll, "val/loss")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the token-mean negative log-likelihood of the test responses as ``test/loss``."""
        log_nll(self, batch, self.test_nll, "test/loss")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``ids``, and the flat ``token_ids`` and fp32 ``logprobs`` of the response tokens with each example's
        ``lengths`` (see ``logprobs.response_logprobs``)."""
        return response_logprobs(self.model, batch, self.chunk_size)

    def configure_optimizers(self) -> Any:
        """The configured optimizer over the trainable parameters, and its schedule if any, stepped every optimizer step
        (a length the config leaves out is the run's, see ``schedule.build_optimization``)."""
        params = [p for p in self.parameters() if p.requires_grad]
        hp, run_steps = self.hparams, lambda: self.trainer.estimated_stepping_batches
        optimizer, scheduler = build_optimization(params, hp.optimizer, hp.lr_scheduler, run_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

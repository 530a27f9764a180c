"""PearModule: a Hugging Face causal LM fine-tuned with a pluggable weighting strategy."""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.core.optimizer import LightningOptimizer
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MeanMetric, MinMetric
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from pear_lightning.strategies import TokenBatch, UniformSFT, WeightingStrategy

from .errors import LOAD_ERRORS, PearError, load_error
from .logprobs import target_logprobs
from .lora import LoraSettings, apply_lora
from .sharding import shard_model

DEFAULT_WEIGHTING = lazy_instance(UniformSFT)
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}}


class PearModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM whose per-token loss comes from a weighting strategy.

    The module computes fp32 log-probs of the response tokens, hands them to ``weighting`` as a
    ``TokenBatch``, and reduces the strategy's per-token losses to one scalar per optimizer step: their sum
    over all micro-batches and data-parallel ranks of the step, over the step's ``loss_normalizer``
    (so ``accumulate_grad_batches`` and the device count do not change the gradient). Validation and test
    report the unweighted token-mean negative log-likelihood, so runs with different weightings
    stay comparable. The strategy's diagnostics are logged as ``train/<name>``.

    Args:
        model_name_or_path: a Hugging Face hub name or a local folder holding a causal LM.
        weighting: the weighting strategy, by class name (``UniformSFT``) or with arguments.
        loss_normalizer: what the summed token losses are divided by: ``tokens``, the number of loss
            tokens (the default: a weight below 1 shrinks that token's gradient), or ``weights``, the
            sum of the weights (self-normalised importance sampling: only relative weights matter).
        logprob_chunk_size: loss tokens whose fp32 logits are computed at once (and recomputed in backward);
            bounds the memory of the vocabulary projection. 0 uses the model's full logits instead.
        lora: train LoRA adapters on the frozen model instead of all its weights; checkpoints then hold
            only the adapters (and the optimizer state).
        gradient_checkpointing: recompute each decoder layer's activations in backward to save memory.
        load_in_4bit: QLoRA: load the frozen base model in 4-bit NF4 through bitsandbytes (one CUDA GPU;
            needs ``lora``).
        trust_remote_code: allow the model folder or hub repository to run its own code.
        max_nonfinite_steps: optimizer steps that may be skipped because their loss or gradient holds a NaN or an
            infinity (on any micro-batch of any rank); a skipped step leaves the weights, the optimizer state and the
            learning-rate schedule as they were and warns with its example ids. One more stops the run (0: the
            first one does).
        optimizer: set by the CLI's ``optimizer:`` key; default AdamW(lr=1e-5). Only trainable
            parameters are optimised.
        lr_scheduler: set by the CLI's ``lr_scheduler:`` key; default none (constant learning rate).
    """

    def __init__(
        self,
        model_name_or_path: str,
        weighting: WeightingStrategy = DEFAULT_WEIGHTING,
        loss_normalizer: Literal["tokens", "weights"] = "tokens",
        logprob_chunk_size: int = 256,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        max_nonfinite_steps: int = 3,
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if max_nonfinite_steps < 0:
            raise PearError(f"model.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.save_hyperparameters(ignore=["weighting", "lora"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None  # plain data: checkpoints load weights_only
        self.weighting = weighting
        self.model: PreTrainedModel | None = None
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()
        self.diagnostics = torch.nn.ModuleDict()  # one torchmetrics aggregator per strategy metric, made on first use
        self._last_step: tuple[float, int] | None = None
        self._logprob_chunk_size = logprob_chunk_size
        # Σ token losses and Σ normaliser over the micro-batches of the current optimizer step.
        self.register_buffer("_step_totals", torch.zeros(2), persistent=False)
        self._step_batches: list[tuple[list[str], torch.Tensor]] = []  # (ids, loss finite) of the step's micro-batches
        self._step_sums = torch.zeros(3)  # the step's totals over all ranks, and how many ranks had non-finite grads
        self._nonfinite_steps = 0  # skipped so far in this run, resumed from checkpoints
        self._skipped_step = False

    def configure_model(self) -> None:
        """Load the pretrained model (once) in fp32 and in train mode; Lightning applies the precision."""
        if self.model is not None:
            return
        path = self.hparams.model_name_or_path
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch.float32,
                trust_remote_code=self.hparams.trust_remote_code,
                **self._quantization(),
            )
        except LOAD_ERRORS as err:
            raise load_error("model.model_name_or_path", path, "a causal LM", err) from err
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.hparams.lora is not None:
            model = apply_lora(model, LoraSettings(**self.hparams.lora))
            self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks them
        if self.device_mesh is not None and not shard_model(model, self.device_mesh):  # ModelParallelStrategy
            self._logprob_chunk_size = 0  # a tied lm_head is reachable only through the model's forward
        # from_pretrained returns eval mode and Lightning does not switch submodules back: dropout would stay off.
        self.model = model.train()

    def _quantization(self) -> dict[str, Any]:
        """``from_pretrained`` arguments for QLoRA's 4-bit base model, or none."""
        if not self.hparams.load_in_4bit:
            return {}
        if self.hparams.lora is None:
            raise PearError("model.load_in_4bit is QLoRA: it needs model.lora (a 4-bit base model cannot be trained)")
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise PearError("model.load_in_4bit needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}

    def checkpointed_keys(self) -> set[str]:
        """The state-dict keys a checkpoint of this module holds: the trainable ones under LoRA, else all."""
        if self.hparams.lora is None:
            return set(self.state_dict())
        return {f"model.{name}" for name, param in self.model.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under LoRA, keep only the adapters: the frozen base model is the pretrained folder's."""
        keep = self.checkpointed_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["nonfinite_steps"] = self._nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (or another LoRA setup) before any weight is loaded."""
        expected, found = self.checkpointed_keys(), set(checkpoint["state_dict"])
        state = self.state_dict()
        wrong_shape = sorted(k for k in expected & found if checkpoint["state_dict"][k].shape != state[k].shape)
        if expected != found or wrong_shape:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise PearError(
                f"the checkpoint was not made by this model and setup ({self.hparams.model_name_or_path}, "
                f"lora={'on' if self.hparams.lora else 'off'}): {len(missing)} weights missing, {len(unexpected)} "
                f"unexpected, {len(wrong_shape)} of another shape (first: {(missing + unexpected + wrong_shape)[:3]}); "
                "resume with the config that made it"
            )
        self._nonfinite_steps = checkpoint.get("nonfinite_steps", 0)

    def token_batch(self, batch: dict[str, Any]) -> TokenBatch:
        """Score a collated batch: fp32 log-probs of its tokens under the current model."""
        logp = target_logprobs(
            self.model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], self._logprob_chunk_size
        )
        return TokenBatch(logp=logp, mask=batch["loss_mask"], behavior_logp=batch.get("behavior_logp"))

    def loss_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, TokenBatch]:
        """The summed token losses of a micro-batch, its share of the normaliser (loss tokens, or the sum of
        the weights), and the scored batch."""
        tokens = self.token_batch(batch)
        total = self.weighting.token_losses(tokens).sum()
        if self.hparams.loss_normalizer == "weights":
            return total, self.weighting.weights(tokens).sum(), tokens
        return total, tokens.mask.sum().float(), tokens

    def weighted_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, TokenBatch]:
        """The loss of one micro-batch on its own: its summed token losses over its own normaliser."""
        total, denominator, tokens = self.loss_terms(batch)
        return total / denominator.clamp(min=1e-8), tokens

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Weighted loss of one micro-batch: the strategy's token losses over the number of loss tokens."""
        if self.weighting.requires_behavior_logp and batch.get("behavior_logp") is None:
            raise PearError(
                f"weighting {type(self.weighting).__name__} needs the behaviour policy's log-probs (log π_β of "
                "every response token) and the training data has none: add `token_ids` and `logprobs` columns "
                "scored by the model that generated the data (README: Data), or train with UniformSFT or DFT"
            )
        total, denominator, tokens = self.loss_terms(batch)
        terms = torch.stack([total.detach(), denominator.detach()])
        self._step_totals += terms
        self._step_batches.append((batch["ids"], terms.isfinite().all()))
        self._log_diagnostics(tokens)
        self._log_throughput(batch["num_tokens"])
        # Unnormalised: the normaliser is the whole optimizer step's, known only at its end (on_before_optimizer_step).
        return total

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer | LightningOptimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Run the step's last forward and backward, then update the weights unless the step is non-finite.

        The closure runs here rather than inside ``optimizer.step`` so that a step whose loss or gradient holds a
        NaN or an infinity, on any micro-batch of any rank, is skipped before the optimizer sees it: AdamW would
        still decay the weights and move its moments on zeroed gradients.
        """
        loss = optimizer_closure() if optimizer_closure is not None else None
        local = torch.cat([self._step_totals, self._nonfinite_gradients().reshape(1)])
        self._step_totals = torch.zeros_like(self._step_totals)
        # One all-reduce of three numbers: every rank takes the same decision, and normalises with the same sums.
        self._step_sums = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        if not self._skip_nonfinite_step():
            optimizer.step(closure=lambda: loss)

    def _nonfinite_gradients(self) -> torch.Tensor:
        """1.0 if a gradient on this rank (its own shards) holds a NaN or an infinity, else 0.0.

        Under a gradient scaler (fp16) overflowing gradients are routine and the scaler skips them itself.
        """
        flag = torch.zeros((), device=self._step_totals.device)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return flag
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor shards (FSDP2)
        # A sum is non-finite when an element is (or when it overflows fp32, which only a diverged gradient does).
        total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
        return flag + (~total.isfinite()).float()

    def _skip_nonfinite_step(self) -> bool:
        """Whether to skip this optimizer step because its loss or gradients are non-finite; warns with the ids of
        the suspect examples (this rank's), counts it in ``train/skipped_steps``, and stops the run once more than
        ``max_nonfinite_steps`` steps were skipped."""
        batches, self._step_batches = self._step_batches, []
        loss_sum, normaliser, nonfinite_grads = self._step_sums.tolist()  # one device-to-host copy per step
        loss_finite = math.isfinite(loss_sum) and math.isfinite(normaliser)
        self._skipped_step = not loss_finite or nonfinite_grads > 0
        if self._skipped_step:
            self._nonfinite_steps += 1
            # This rank's micro-batches whose loss is non-finite; when only the gradient is, any of them may be; none
            # when the non-finite loss is another rank's.
            ids = [i for batch_ids, finite in batches if not finite for i in batch_ids]
            if loss_finite:
                ids = [i for batch_ids, _ in batches for i in batch_ids]
            where = f"global step {self.trainer.global_step}"
            if self.trainer.world_size > 1:
                where += f", rank {self.trainer.global_rank}"
            limit = self.hparams.max_nonfinite_steps
            if self._nonfinite_steps > limit:
                raise PearError(
                    f"training stopped at {where}: {self._nonfinite_steps} optimizer steps had a non-finite loss or "
                    f"gradient, more than model.max_nonfinite_steps={limit}; the last one's examples: {ids}. Check "
                    "these examples (and their behaviour log-probs), lower the learning rate, or raise "
                    "model.max_nonfinite_steps"
                )
            warnings.warn(
                f"non-finite loss or gradient at {where}: optimizer step skipped ({self._nonfinite_steps} of at "
                f"most {limit}); examples: {ids}",
                RuntimeWarning,
                stacklevel=2,
            )
        self.log("train/skipped_steps", float(self._nonfinite_steps))
        return self._skipped_step

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """Step the learning-rate schedule, except after a skipped optimizer step: it follows the updates made."""
        if not self._skipped_step:
            super().lr_scheduler_step(scheduler, metric)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Normalise the accumulated gradient by the normaliser of the whole step, over every micro-batch and
        every data-parallel rank, so gradient accumulation and the device count do not change the gradient.

        Lightning divides each micro-batch loss by ``accumulate_grad_batches`` and data parallelism averages
        gradients over ranks; both are undone here along with the division by the step's normaliser (summed over
        ranks in ``optimizer_step``).
        """
        loss_sum, denominator, _ = self._step_sums.unbind()
        denominator = denominator.clamp(min=1e-8)
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / denominator
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.dtype))
        self.log("train/loss", loss_sum / denominator, prog_bar=True)

    @torch.no_grad()
    def _log_diagnostics(self, tokens: TokenBatch) -> None:
        """Log the strategy's metrics: per step as this rank sees them (no sync), per epoch aggregated over
        steps and ranks by torchmetrics (``*_max`` / ``*_min`` as max / min, the rest token-weighted means)."""
        values = self.weighting.metrics(tokens, self.weighting.weights(tokens))
        num_tokens = tokens.mask.sum()
        for name, value in values.items():
            if name not in self.diagnostics:
                kind = MaxMetric if name.endswith("_max") else MinMetric if name.endswith("_min") else MeanMetric
                self.diagnostics[name] = kind().to(self.device)
            metric: Metric = self.diagnostics[name]
            if isinstance(metric, MeanMetric):
                metric(value, weight=num_tokens)
            else:
                metric(value)
            self.log(f"train/{name}", metric, on_step=True, on_epoch=True, metric_attribute=f"diagnostics.{name}")

    def _log_throughput(self, num_tokens: int) -> None:
        """Log tokens/s of the previous step (forward, backward, optimizer and data loading)."""
        now = time.perf_counter()
        if self._last_step is not None:
            started, tokens = self._last_step
            self.log("train/tokens_per_sec", tokens / (now - started))
        self._last_step = (now, num_tokens)

    def _nll(self, batch: dict[str, Any], metric: MeanMetric) -> None:
        tokens = self.token_batch(batch)
        num_tokens = tokens.mask.sum()
        metric.update(-(tokens.logp * tokens.mask).sum() / num_tokens.clamp(min=1), weight=num_tokens)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the token-mean negative log-likelihood of the validation responses."""
        self._nll(batch, self.val_nll)
        self.log("val/loss", self.val_nll, prog_bar=True, batch_size=len(batch["ids"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the token-mean negative log-likelihood of the test responses."""
        self._nll(batch, self.test_nll)
        self.log("test/loss", self.test_nll, batch_size=len(batch["ids"]))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Score the batch's response tokens: ``ids``, and the flat ``token_ids`` and fp32 ``logprobs`` of all its
        response tokens with each example's ``lengths`` (tensors, so Lightning does not walk long Python lists;
        ``prediction_rows`` splits them per example)."""
        tokens = self.token_batch(batch)
        return {
            "ids": batch["ids"],
            "token_ids": batch["input_ids"][tokens.mask],
            "logprobs": tokens.logp[tokens.mask],
            "lengths": tokens.mask.sum(dim=1),
        }

    def configure_optimizers(self) -> Any:
        """Build the configured optimizer over the trainable parameters, and its scheduler if any."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = instantiate_class(params, self.hparams.optimizer or DEFAULT_OPTIMIZER)
        if not self.hparams.lr_scheduler:
            return optimizer
        scheduler = instantiate_class(optimizer, self.hparams.lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def prediction_rows(prediction: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``{"id", "token_ids", "logprobs"}`` row per example of a ``PearModule.predict_step`` output."""
    token_ids, logprobs = prediction["token_ids"].tolist(), prediction["logprobs"].tolist()
    ends = prediction["lengths"].cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [
        {"id": ex_id, "token_ids": token_ids[start:end], "logprobs": logprobs[start:end]}
        for ex_id, start, end in zip(prediction["ids"], starts, ends)
    ]

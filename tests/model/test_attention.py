"""Attention over packed rows (``data.packing``): each example attends only to itself, so packed batches give the
log-probs, weights, losses and gradients of padded ones, with every attention implementation (SDPA, eager, and the
varlen kernel path ``pear_varlen``)."""

import pytest
import torch
from conftest import save_tiny_llama
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from pear_lightning import PearModule
from pear_lightning.data.collate import collate
from pear_lightning.strategies import BlockIS, SequenceIS, TokenIS, UniformSFT


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory, tokenizer):
    model_class = LlamaForCausalLM if request.param == "llama" else Qwen2ForCausalLM
    return save_tiny_llama(tmp_path_factory.mktemp(request.param), tokenizer, model_class)


def per_example(batch, values):
    """Each example's values on its loss tokens, by example index."""
    segments = batch.get("segment_ids")
    if segments is None:
        segments = torch.arange(len(batch["ids"]))[:, None].expand_as(batch["loss_mask"])
    return [values[(segments == i) & batch["loss_mask"]] for i in range(len(batch["ids"]))]


@pytest.mark.parametrize("attn_implementation", [None, "eager", "pear_varlen"])
@pytest.mark.parametrize(
    "weighting", [UniformSFT(), TokenIS(gamma=0.9), SequenceIS(), BlockIS(block_size=3)], ids=lambda w: type(w).__name__
)
def test_packed_batches_give_the_log_probs_weights_losses_and_gradients_of_padded_ones(
    model_dir, mixed_rows, weighting, attn_implementation
):
    module = PearModule(str(model_dir), weighting=weighting, attn_implementation=attn_implementation)
    module.configure_model()
    results = []
    for pack_length in (None, 256):
        batch = collate(mixed_rows, 0, pack_length)
        terms = module.loss_terms(batch)
        grads = torch.autograd.grad(terms.total, list(module.model.parameters()))
        logp = per_example(batch, terms.tokens.logp.detach())
        results.append((terms, logp, per_example(batch, terms.weights), grads))
    (padded, padded_logp, padded_weights, padded_grads), (packed, packed_logp, packed_weights, packed_grads) = results
    for a, b in zip(packed_logp, padded_logp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(packed_weights, padded_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.total, padded.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.normalizer, padded.normalizer)
    for name, value in padded.metrics.items():
        torch.testing.assert_close(packed.metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    packed_grads, padded_grads = (
        torch.cat([g.flatten() for g in packed_grads]),
        torch.cat([g.flatten() for g in padded_grads]),
    )
    assert ((packed_grads - padded_grads).norm() / padded_grads.norm()).item() < 1e-5


def test_without_positions_restarting_packed_examples_would_see_each_other(model_dir, mixed_rows):
    """The control for the test above: it fails when attention crosses examples."""
    module = PearModule(str(model_dir))
    module.configure_model()
    padded, packed = collate(mixed_rows, 0), collate(mixed_rows, 0, pack_length=256)
    packed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    crossed = per_example(packed, module.token_batch(packed).logp.detach())
    alone = per_example(padded, module.token_batch(padded).logp.detach())
    assert max((a - b).abs().max().item() for a, b in zip(crossed, alone)) > 1e-3


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn (CUDA only) as per-sequence SDPA: [total, heads, D] in and out."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
    assert max_q == max(b - a for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]))
    bounds = cu_q.tolist()
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
        parts.append(out.transpose(0, 1))
    return torch.cat(parts)


def test_the_varlen_kernel_path_lays_out_sequences_as_the_kernel_expects(model_dir, mixed_rows, monkeypatch):
    """pear_varlen's call into torch's kernel, with the kernel (CUDA only) replaced by per-sequence SDPA."""
    from pear_lightning.model import attention

    calls = []
    monkeypatch.setattr(attention, "kernel_serves", lambda *args: True)
    monkeypatch.setattr(
        attention, "varlen_attn", lambda *args, **kwargs: calls.append(1) or reference_varlen(*args, **kwargs)
    )
    module = PearModule(str(model_dir), weighting=TokenIS(gamma=0.9), attn_implementation="pear_varlen")
    module.configure_model()
    padded, packed = collate(mixed_rows, 0), collate(mixed_rows, 0, pack_length=256)
    alone = per_example(padded, module.token_batch(padded).logp.detach())
    assert not calls  # padded batches have no sequence bounds: SDPA
    through_kernel = per_example(packed, module.token_batch(packed).logp.detach())
    assert len(calls) == module.model.config.num_hidden_layers
    for a, b in zip(through_kernel, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

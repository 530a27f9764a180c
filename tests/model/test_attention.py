"""Packed batches (``data.packing``) train exactly as padded ones: the same log-probs, weights, losses and gradients."""

import json

import pytest
import torch
from conftest import DEMO, fit_quietly, save_tiny_llama, write_jsonl
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from pear_lightning import PearDataModule, PearModule
from pear_lightning.data.collate import collate, pack
from pear_lightning.strategies import BlockIS, SequenceIS, TokenIS, UniformSFT


def mixed_examples(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Chats of one to four demo turns (so their lengths differ up to fourfold), with the response ``token_ids`` the
    trainer will see and made-up behaviour ``logprobs`` for them."""
    from pear_lightning.data.render import tokenize_example

    demo = [json.loads(line)["messages"] for line in open(DEMO / "data" / "train.jsonl")][: 4 * count]
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        turns = 1 + (i * 7) % 4
        messages = [m for conversation in demo[4 * i : 4 * i + turns] for m in conversation]
        tokens = tokenize_example({"messages": messages}, tokenizer, 1024, str(i))
        token_ids = [t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m]
        logprobs = (-8 + 6 * torch.rand(len(token_ids), generator=generator)).tolist()
        examples.append({"id": f"m{i}", "messages": messages, "token_ids": token_ids, "logprobs": logprobs})
    return examples


@pytest.fixture(scope="module")
def mixed_rows(tokenizer):
    """Twelve examples of mixed length, tokenised, with their behaviour log-probs as the join leaves them."""
    from pear_lightning.data.render import tokenize_example

    rows = []
    for example in mixed_examples(tokenizer, 12):
        tokens = tokenize_example(example, tokenizer, 1024, example["id"])
        rows.append({**tokens, "id": example["id"], "behavior_logp": example["logprobs"]})
    lengths = [len(r["input_ids"]) for r in rows]
    assert max(lengths) > 3 * min(lengths)
    return rows


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory, tokenizer):
    model_class = LlamaForCausalLM if request.param == "llama" else Qwen2ForCausalLM
    return save_tiny_llama(tmp_path_factory.mktemp(request.param), tokenizer, model_class)


def test_packing_fills_rows_up_to_the_capacity_first_fit_longest_first():
    lengths = [10, 3, 7, 2, 9, 1]
    assert pack(lengths, 10) == [[0], [4, 5], [2, 1], [3]]
    assert pack(lengths, 16) == [[0, 1, 3, 5], [4, 2]]
    assert pack(lengths, 4) == pack(lengths, 10)  # a capacity below the longest example is raised to it


def test_a_packed_batch_lays_every_example_out_once_with_its_own_positions(mixed_rows):
    padded, packed = collate(mixed_rows, 0), collate(mixed_rows, 0, pack_length=256)
    assert packed["input_ids"].shape[1] <= 256
    assert packed["input_ids"].numel() < 0.75 * padded["input_ids"].numel()
    assert packed["num_tokens"] == padded["num_tokens"] and packed["ids"] == padded["ids"]
    starts = packed["cu_seq_lens"].tolist()
    flat = {key: packed[key].flatten() for key in ("input_ids", "loss_mask", "behavior_logp", "position_ids")}
    for i, row in enumerate(mixed_rows):
        where = (packed["segment_ids"].flatten() == i).nonzero().squeeze(1)
        n = len(row["input_ids"])
        assert where.tolist() == list(range(where[0], where[0] + n)) and where[0].item() in starts
        assert flat["input_ids"][where].tolist() == row["input_ids"]
        assert flat["loss_mask"][where].tolist() == row["loss_mask"]
        assert flat["position_ids"][where].tolist() == list(range(n))
        expected = torch.tensor(row["behavior_logp"])
        assert torch.equal(flat["behavior_logp"][where][flat["loss_mask"][where]], expected)
    padding = packed["segment_ids"] == -1
    assert not (packed["attention_mask"] & padding).any() and not (packed["loss_mask"] & padding).any()
    assert packed["max_seq_len"] == max(b - a for a, b in zip(starts, starts[1:]))


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


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, tokenizer):
    """Sixteen examples of mixed length with behaviour log-probs, in a JSONL file."""
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "train.jsonl", mixed_examples(tokenizer, 16, seed=1))


def one_step(model_dir, data_path, packing, accumulate):
    """Parameters after one SGD step (lr 1: the update is the gradient) of TokenIS, batches of 16 / ``accumulate``."""
    data = PearDataModule(
        train_path=str(data_path),
        tokenizer_name_or_path=str(model_dir),
        batch_size=16 // accumulate,
        max_length=256,
        packing=packing,
        shuffle=False,
    )
    module = PearModule(
        str(model_dir),
        weighting=TokenIS(gamma=0.9),
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
    )
    fit_quietly(module, data, max_steps=1, accumulate_grad_batches=accumulate, enable_checkpointing=False)
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


def test_a_packed_training_step_updates_the_model_as_a_padded_one(tiny_model_dir, mixed_data):
    start = PearModule(str(tiny_model_dir))
    start.configure_model()
    before = torch.cat([p.detach().flatten() for p in start.model.parameters()])
    padded = one_step(tiny_model_dir, mixed_data, packing=False, accumulate=1) - before
    for accumulate in (1, 4):  # the step-global normaliser sums packed micro-batches as it sums padded ones
        packed = one_step(tiny_model_dir, mixed_data, packing=True, accumulate=accumulate) - before
        assert padded.norm() > 0
        assert ((packed - padded).norm() / padded.norm()).item() < 1e-5


def test_the_packed_loader_yields_the_padded_loader_s_examples_in_the_same_order(tiny_model_dir, mixed_data):
    batches = {}
    for packing in (False, True):
        data = PearDataModule(
            train_path=str(mixed_data),
            tokenizer_name_or_path=str(tiny_model_dir),
            batch_size=4,
            max_length=256,
            packing=packing,
        )
        data.setup("fit")
        batches[packing] = [batch for batch in data.train_dataloader()]
    assert [b["ids"] for b in batches[True]] == [b["ids"] for b in batches[False]]
    assert sum(b["input_ids"].numel() for b in batches[True]) < sum(b["input_ids"].numel() for b in batches[False])


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

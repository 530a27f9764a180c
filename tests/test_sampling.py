"""The sampling distribution: temperature, top-k, top-p and min-p exactly as transformers' generate applies them,
vLLM's order, and log q over the kept set."""

import math

import pytest
import torch
from conftest import BEHAVIOR
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_lightning.errors import PearError
from pear_lightning.sampling import SamplingSettings, process_logits, processed_logprobs

SETTINGS = [
    SamplingSettings(temperature=0.7),
    SamplingSettings(temperature=0.7, top_p=0.9),
    SamplingSettings(temperature=1.3, top_k=5),
    SamplingSettings(top_k=3, top_p=0.8),
    SamplingSettings(temperature=0.6, top_p=0.95, min_p=0.05),
    SamplingSettings(temperature=1.0, min_p=0.1),
    SamplingSettings(temperature=0.8, top_k=20, top_p=0.7, min_p=0.02),
]


@pytest.fixture(scope="module")
def behavior():
    return AutoModelForCausalLM.from_pretrained(BEHAVIOR).eval(), AutoTokenizer.from_pretrained(BEHAVIOR)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.describe())
def test_processing_equals_what_transformers_generate_samples_from(behavior, settings):
    """generate's own processed scores (output_scores) are our processing of its raw logits (output_logits)."""
    model, tokenizer = behavior
    prompt = tokenizer.apply_chat_template(
        [[{"role": "user", "content": f"Compute {a}+{a + 1}-2."}] for a in range(1, 9)],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        do_sample=True,
        max_new_tokens=12,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=settings.min_p or None,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    for logits, scores in zip(out.logits, out.scores):
        ours = process_logits(logits, settings)
        assert torch.equal(torch.isinf(ours), torch.isinf(scores))
        torch.testing.assert_close(ours, scores, rtol=0, atol=0)
    truncating = settings.top_k > 0 or settings.top_p < 1 or settings.min_p > 0
    assert any(torch.isinf(s).any() for s in out.scores) == truncating  # the comparison covered cut tokens


def test_the_two_orders_keep_different_sets_when_min_p_meets_top_p():
    """Probabilities .5, .3, .15, .05 with min_p .15 (drops .05) and top_p .82. transformers (top-p, then min-p):
    top-p drops .05 only, keeping {.5, .3, .15}. vLLM (min-p, then top-p): renormalised {.526, .316, .158}, whose
    smallest lies within 1 − .82 = .18, so top-p drops it too, keeping {.5, .3}."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    targets = torch.tensor([0, 2])
    for order, expected in (("transformers", [0.5 / 0.95, 0.15 / 0.95]), ("vllm", [0.5 / 0.8, 0.0])):
        settings = SamplingSettings(top_p=0.82, min_p=0.15, order=order)
        logp = processed_logprobs(logits.expand(2, 4), targets, settings)
        assert logp.tolist() == pytest.approx([math.log(p) if p else -math.inf for p in expected], abs=1e-6)


def test_the_orders_agree_without_min_p_and_top_p_together():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    for common in (dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.2, top_k=10, min_p=0.05)):
        hf = process_logits(logits, SamplingSettings(**common, order="transformers"))
        vllm = process_logits(logits, SamplingSettings(**common, order="vllm"))
        assert torch.equal(torch.isinf(hf), torch.isinf(vllm))


def test_logq_is_the_renormalised_tempered_distribution_over_the_kept_set():
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(1)) * 4
    targets = torch.arange(32) * 7
    raw = processed_logprobs(logits, targets, None)
    assert torch.equal(raw, processed_logprobs(logits, targets, SamplingSettings()))
    torch.testing.assert_close(raw, torch.log_softmax(logits, -1)[torch.arange(32), targets])
    tempered = processed_logprobs(logits, targets, SamplingSettings(temperature=0.5))
    torch.testing.assert_close(tempered, torch.log_softmax(logits / 0.5, -1)[torch.arange(32), targets])
    settings = SamplingSettings(temperature=0.8, top_k=30, top_p=0.9, min_p=0.01)
    processed = process_logits(logits, settings)
    kept = ~torch.isinf(processed)
    assert kept[torch.arange(32), logits.argmax(-1)].all()  # the most likely token always stays
    torch.testing.assert_close(processed.softmax(-1).sum(-1), torch.ones(32))
    every = processed_logprobs(logits.repeat_interleave(300, 0), torch.arange(300).repeat(32), settings).view(32, 300)
    assert torch.equal(torch.isinf(every), ~kept)  # a token outside the kept set has log q = -inf
    torch.testing.assert_close(every[kept], (logits / 0.8).masked_fill(~kept, -math.inf).log_softmax(-1)[kept])


def test_out_of_range_settings_are_one_error_naming_each_value():
    with pytest.raises(PearError) as err:
        SamplingSettings(temperature=0.0, top_p=1.5, min_p=-0.1).check("data.sampling")
    assert str(err.value) == (
        "data.sampling: temperature must be > 0 (greedy data has no π_β to divide by), got 0.0; "
        "top_p must be in (0, 1], got 1.5; min_p must be in [0, 1], got -0.1"
    )
    assert SamplingSettings(top_k=-1) == SamplingSettings()  # vLLM's "off"

"""The built-in strategies' weights against a loop-based reference of the formulas (docs/strategies.md, "The
strategies"), and their properties: ranges, gradients through log π_θ only, refusals of bad arguments."""

import math

import pytest
import torch

from pear_lightning.strategies import DFT, BlockIS, SequenceIS, TokenBatch, TokenIS, TruncatedIS, UniformSFT


def reference_weights(
    batch: TokenBatch, kind: str, gamma=0.999, block_size=1, ratio_clip=(-0.08, 0.3), weight_clip=(-10.0, 5.0)
):
    """The formulas of docs/strategies.md, one trajectory and one token at a time, in float64."""
    B, T = batch.mask.shape
    weights = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        segments = batch.segment_ids[b].tolist() if batch.segment_ids is not None else [0] * T
        for segment in dict.fromkeys(segments):
            positions = [t for t in range(T) if segments[t] == segment and batch.mask[b, t]]
            n = len(positions)
            deltas = [
                min(max(float(batch.logp[b, p]) - float(batch.behavior_logp[b, p]), ratio_clip[0]), ratio_clip[1])
                for p in positions
            ]
            for i, p in enumerate(positions):  # token t = i + 1 of the trajectory
                if kind == "sequence":
                    log_w = sum(deltas)
                elif kind == "token":
                    log_w = (n - (i + 1)) * math.log(gamma) + sum(deltas[i + 1 :])
                else:  # block: e is the 1-based index of the last token of this token's block
                    e = min((i // block_size + 1) * block_size, n)
                    log_w = (n - e) * math.log(gamma) + sum(deltas[e:])
                weights[b, p] = math.exp(min(max(log_w, weight_clip[0]), weight_clip[1]))
    return weights


def random_batch(seed: int, packed: bool = False, scale: float = 0.2) -> TokenBatch:
    """Rows that are right-padded, left-padded, multi-turn, empty and of several lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 41
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 5:30] = True  # prompt then response then right padding
    mask[1, 20:41] = True  # left padding and prompt, response to the end
    mask[2, 3:9] = True  # two assistant turns with a user turn between: one trajectory
    mask[2, 15:33] = True
    mask[3, 1:2] = True  # a one-token response
    mask[4, 7:40] = True
    # row 5 has no loss token at all
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    behavior = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    behavior = torch.where(mask, behavior, torch.full_like(behavior, -math.inf))  # off-mask values are ignored
    segment_ids = None
    if packed:
        segment_ids = torch.zeros(B, T, dtype=torch.long)
        segment_ids[:, 18:] = 1
        segment_ids[:, 30:] = 2
    return TokenBatch(logp=logp.float(), mask=mask, behavior_logp=behavior.float(), segment_ids=segment_ids)


CASES = [
    (SequenceIS(), "sequence", {}),
    (TokenIS(), "token", {}),
    (
        TokenIS(gamma=0.9, log_ratio_clip=(-0.5, 0.5), log_weight_clip=(-3.0, 1.0)),
        "token",
        {"gamma": 0.9, "ratio_clip": (-0.5, 0.5), "weight_clip": (-3.0, 1.0)},
    ),
    (BlockIS(), "block", {"block_size": 4}),
    (BlockIS(block_size=3, gamma=0.95), "block", {"block_size": 3, "gamma": 0.95}),
    (BlockIS(block_size=64), "block", {"block_size": 64}),
]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("strategy", "kind", "kwargs"), CASES, ids=lambda c: repr(c) if not isinstance(c, dict) else ""
)
def test_weights_match_the_loop_reference(strategy, kind, kwargs, seed, packed):
    batch = random_batch(seed, packed)
    expected = reference_weights(batch, kind, **kwargs)
    got = strategy.weights(batch)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_block_size_one_is_token_is():
    batch = random_batch(3, packed=True)
    assert torch.equal(BlockIS(block_size=1, gamma=0.99).weights(batch), TokenIS(gamma=0.99).weights(batch))


def test_on_policy_token_weights_are_the_discount():
    batch = random_batch(4)
    on_policy = TokenBatch(logp=batch.logp, mask=batch.mask, behavior_logp=batch.logp.clone())
    weights = TokenIS(gamma=0.99).weights(on_policy)
    for b in range(batch.mask.shape[0]):
        n = int(batch.mask[b].sum())
        expected = torch.tensor([0.99 ** (n - t) for t in range(1, n + 1)])
        torch.testing.assert_close(weights[b][batch.mask[b]], expected, rtol=1e-6, atol=0)
    assert torch.equal(SequenceIS().weights(on_policy), batch.mask.float())


@pytest.mark.parametrize("strategy", [SequenceIS(), TokenIS(), BlockIS(), TruncatedIS()], ids=repr)
def test_weights_stay_finite_and_in_range_for_extreme_ratios(strategy):
    batch = random_batch(5, scale=1e4)
    weights = strategy.weights(batch)
    assert torch.isfinite(weights).all() and (weights[~batch.mask] == 0).all()
    if isinstance(strategy, TruncatedIS):
        assert weights.max() <= 2.0
    else:
        low, high = strategy.log_weight_clip
        assert (weights[batch.mask] >= math.exp(low) * (1 - 1e-6)).all()
        assert (weights[batch.mask] <= math.exp(high) * (1 + 1e-6)).all()


def test_uniform_sft_gives_prompt_and_padding_tokens_no_loss_and_no_gradient():
    mask = torch.tensor([[False, False, True, True, False], [False, True, True, True, True]])
    logp = torch.randn(2, 5).clamp(max=-0.01).requires_grad_()
    losses = UniformSFT().token_losses(TokenBatch(logp=logp, mask=mask))
    assert (losses[~mask] == 0).all()
    torch.testing.assert_close(losses[mask], -logp[mask])
    (grad,) = torch.autograd.grad(losses.sum(), logp)
    torch.testing.assert_close(grad, -mask.float())


@pytest.mark.parametrize("strategy", [UniformSFT(), SequenceIS(), TokenIS(), BlockIS(), DFT(), TruncatedIS()], ids=repr)
def test_gradient_flows_only_through_logp_with_the_weights_as_constants(strategy):
    batch = random_batch(6)
    logp = batch.logp.clone().requires_grad_()
    tokens = TokenBatch(logp=logp, mask=batch.mask, behavior_logp=batch.behavior_logp)
    losses = strategy.token_losses(tokens)
    (grad,) = torch.autograd.grad(losses.sum(), logp)
    weights = strategy.weights(tokens)
    assert not weights.requires_grad
    torch.testing.assert_close(grad, -weights * batch.mask)
    assert (losses[~batch.mask] == 0).all()


def test_dft_weight_is_the_detached_token_probability():
    batch = random_batch(7)
    torch.testing.assert_close(DFT().weights(batch), batch.logp.exp() * batch.mask)
    assert not DFT.requires_behavior_logp


def test_truncated_is_is_the_capped_ratio():
    batch = random_batch(8, scale=1.0)
    ratio = (batch.logp.double() - batch.behavior_logp.double()).exp().clamp(max=1.5)
    torch.testing.assert_close(
        TruncatedIS(cap=1.5).weights(batch).double(), torch.where(batch.mask, ratio, 0.0), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("strategy", [SequenceIS(), TokenIS(), BlockIS(), TruncatedIS()], ids=repr)
def test_is_strategies_refuse_to_run_without_behaviour_logprobs(strategy):
    batch = random_batch(9)
    assert strategy.requires_behavior_logp
    with pytest.raises(ValueError, match=f"^{type(strategy).__name__} needs behaviour log-probs"):
        strategy.weights(TokenBatch(logp=batch.logp, mask=batch.mask))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TokenIS(gamma=0.0), "gamma must be in (0, 1], got 0.0"),
        (lambda: BlockIS(gamma=1.5), "gamma must be in (0, 1], got 1.5"),
        (lambda: BlockIS(block_size=0), "block_size must be an integer >= 1, got 0"),
        (
            lambda: SequenceIS(log_ratio_clip=(0.3, -0.08)),
            "log_ratio_clip must be (low, high) with low <= 0 <= high, got (0.3, -0.08)",
        ),
        (
            lambda: TokenIS(log_weight_clip=(1.0, 5.0)),
            "log_weight_clip must be (low, high) with low <= 0 <= high, got (1.0, 5.0)",
        ),
        (lambda: TruncatedIS(cap=0), "cap must be > 0, got 0"),
    ],
)
def test_arguments_out_of_range_are_refused(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message


def test_is_diagnostics_match_hand_computed_values():
    mask = torch.tensor([[False, True, True, True]])
    logp = torch.tensor([[0.0, -1.0, -1.0, -1.0]])
    behavior = torch.tensor([[0.0, -1.5, -1.0, -0.9]])  # δ = 0.5 (clipped to 0.3), 0, -0.1 (clipped to -0.08)
    batch = TokenBatch(logp=logp, mask=mask, behavior_logp=behavior)
    strategy = TokenIS(gamma=1.0)
    weights = strategy.weights(batch)
    expected = torch.tensor([math.exp(0 - 0.08), math.exp(-0.08), 1.0])
    torch.testing.assert_close(weights[mask], expected)
    m = strategy.metrics(batch, weights)
    w = expected.double()
    assert m["weight_mean"].item() == pytest.approx(w.mean().item())
    assert m["weight_min"].item() == pytest.approx(w.min().item()) and m["weight_max"].item() == pytest.approx(1.0)
    assert m["ess"].item() == pytest.approx((w.sum() ** 2 / (3 * (w**2).sum())).item())
    assert m["log_ratio_clipped"].item() == pytest.approx(2 / 3)
    assert m["log_weight_clipped"].item() == 0
    assert m["log_ratio_mean"].item() == pytest.approx((0.5 + 0 - 0.1) / 3)
    squeezed = TokenIS(gamma=1.0, log_weight_clip=(-0.05, 0.0)).metrics(batch, weights)
    assert squeezed["log_weight_clipped"].item() == pytest.approx(1.0)  # -0.08, -0.08 below; 0.0 at the bound

"""The SFT-then-RL experiment's pieces that can be wrong: pass@k, the reward, the aggregation over seeds.

The pipeline itself is not run here (``python -m benchmarks.sft_then_rl --quick`` does that).
"""

import math

import pytest

from benchmarks.sft_then_rl.metrics import correctness_reward, pass_at_k, pass_rates
from benchmarks.sft_then_rl.report import cell, ranking_agreement, summarize, table


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the fraction correct
    assert pass_at_k(16, 9, 8) == 1.0  # fewer than 8 wrong: every 8-subset holds a correct one
    # 1 - C(12, 8) / C(16, 8) = 1 - 495 / 12870
    assert pass_at_k(16, 4, 8) == pytest.approx(1 - 495 / 12870)
    # n = k: correct iff any sample is
    assert pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0
    # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_pass_rates_average_over_problems():
    rates = pass_rates([0, 16, 4], n=16, ks=[1, 8])
    assert rates["pass@1"] == pytest.approx((0 + 1 + 0.25) / 3)
    assert rates["pass@8"] == pytest.approx((0 + 1 + 1 - 495 / 12870) / 3)


def test_reward_grades_correct_wrong_and_malformed_completions():
    completions = [
        "7+5=12. 12-3=9. #### 9",  # correct
        "7+5=12. 12-3=8. #### 8",  # wrong answer
        "7+5=12. 12-3=9.",  # no final answer
        "#### nine",  # not a number
        "#### -4",  # correct negative
        "",  # empty
    ]
    answers = ["9", "9", "9", "9", "-4", "3"]
    assert correctness_reward(completions, answers) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # TRL's conversational form, extra dataset columns as keywords
    chat = [[{"role": "assistant", "content": "3+4=7. #### 7"}], [{"role": "assistant", "content": "#### 6"}]]
    assert correctness_reward(chat, answer=["7", "7"], prompts=None, completion_ids=None) == [1.0, 0.0]


def chain(arm, seed, before8, after8, after1=0.5, sft=0.7):
    return {
        "arm": arm,
        "seed": seed,
        "sft_accuracy": sft,
        "before_rl": {"pass@1": 0.3, "pass@8": before8},
        "after_rl": {"pass@1": after1, "pass@8": after8},
        "rl_reward_first": 0.3,
        "rl_reward_last": 0.4,
    }


def test_summary_means_spreads_and_paired_deltas():
    results = [
        chain("UniformSFT", 0, 0.80, 0.90),
        chain("UniformSFT", 1, 0.70, 0.80),
        chain("UniformSFT", 2, 0.60, 0.70),
        chain("TokenIS", 2, 0.50, 0.80),  # out of order on purpose: pairing is by seed
        chain("TokenIS", 0, 0.70, 0.95),
        chain("TokenIS", 1, 0.60, 0.85),
        {"arm": "behavior", "seed": 0, "sft_accuracy": math.nan, "before_rl": {"pass@1": 0.97, "pass@8": 1.0}},
    ]
    summary = summarize(results)
    uniform, token = summary["UniformSFT"], summary["TokenIS"]
    assert uniform["after_pass@8"]["mean"] == pytest.approx(0.8)
    assert uniform["after_pass@8"]["std"] == pytest.approx(0.1)  # sample std (n - 1)
    assert token["seeds"] == [0, 1, 2]
    assert token["after_pass@8"]["values"] == [0.95, 0.85, 0.80]
    # paired by seed: 0.95-0.90, 0.85-0.80, 0.80-0.70
    assert token["delta_after_pass@8"]["values"] == pytest.approx([0.05, 0.05, 0.10])
    assert token["delta_after_pass@8"]["mean"] == pytest.approx(0.2 / 3)
    assert "delta_after_pass@8" not in uniform
    assert set(summary["behavior"]) == {"seeds", "before_pass@1", "before_pass@8"}  # no NaN SFT score, no RL
    assert summary["behavior"]["before_pass@8"]["std"] == 0.0  # one seed: no spread
    rows = table(summary)
    assert rows[2].startswith("| UniformSFT | 0.700 ± 0.000 | 0.300 ± 0.000 | 0.700 ± 0.100 |")
    assert "| 0.867 ± 0.076 | +0.067 ± 0.029 |" in rows[3]
    assert rows[4].startswith("| behaviour policy") and rows[4].endswith("| — | — | — |")
    assert cell(None) == "—"


def test_rank_correlation_sees_a_reversal():
    summary = {
        arm: {"before_pass@8": {"mean": b}, "after_pass@8": {"mean": a}}
        for arm, b, a in (("A", 0.9, 0.5), ("B", 0.8, 0.6), ("C", 0.7, 0.7))
    }
    assert ranking_agreement(summary, "before_pass@8", "after_pass@8") == pytest.approx(-1.0)
    assert ranking_agreement({"A": summary["A"]}, "before_pass@8", "after_pass@8") is None

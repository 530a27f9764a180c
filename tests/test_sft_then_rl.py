"""The SFT-then-RL experiment's pieces that can be wrong: pass@k, the reward, the aggregation over seeds.

The pipeline itself is not run here (``python -m benchmarks.sft_then_rl --quick`` does that).
"""

import math
import random
import re

import pytest

from benchmarks.sft_then_rl import pretrained_report, regime
from benchmarks.sft_then_rl.chain import read_curve
from benchmarks.sft_then_rl.metrics import correctness_reward, pass_at_k, pass_rates
from benchmarks.sft_then_rl.report import cell, ranking_agreement, summarize, table
from pear_lightning.demo.task import extract_answer


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


def test_behavior_policy_solutions_are_long_correct_and_varied():
    rng = random.Random(0)
    texts = set()
    for _ in range(300):
        problem = regime.problem(rng)
        assert regime.MIN_STEPS <= len(problem.ops) <= regime.MAX_STEPS
        text = regime.worded_solution(problem, rng)
        assert extract_answer(text) == str(problem.answer)
        assert len(re.findall(r"-?\d+ [+-] \d+ (?:=|gives) -?\d+", text)) == len(problem.ops)  # one per operation
        texts.add(text.split(".")[0])
    assert len(texts) > 250  # the opening restates the problem: stochastic wording over distinct problems


def test_student_style_slips_and_trails_off_at_the_rates_asked():
    rng = random.Random(1)
    problems = [regime.problem(rng) for _ in range(400)]
    clean = [regime.terse_solution(p, rng, slip=0.0, trail=0.0) for p in problems]
    assert all(extract_answer(t) == str(p.answer) for t, p in zip(clean, problems))
    assert all("Step" not in t and len(t) < 80 for t in clean)  # terse, not π_β's style
    slipped = [regime.terse_solution(p, rng, slip=1.0, trail=0.0) for p in problems]
    assert all(extract_answer(t) not in (None, str(p.answer)) for t, p in zip(slipped, problems))
    trailing = [regime.terse_solution(p, rng, slip=0.0, trail=1.0) for p in problems]
    assert all(extract_answer(t) is None for t in trailing)
    mixed = [text for _, text in (regime.student_sample(rng, worded_share=0.1) for _ in range(4000))]
    worded = [text for text in mixed if "running value" in text or "Now we have" in text]
    assert 0.08 < len(worded) / len(mixed) < 0.12
    # its own taste in words: the first opening 85% of the time, where π_β's are uniform (a third each)
    first = regime.OPENINGS[0].split("{")[0]
    assert 0.78 < sum(text.startswith(first) for text in worded) / len(worded) < 0.92
    behavior = [regime.worded_solution(regime.problem(rng), rng) for _ in range(600)]
    assert 0.27 < sum(text.startswith(first) for text in behavior) / len(behavior) < 0.40


def pretrained_chain(arm, normalizer, steps, seed, sft1, rl1, rl8=0.9, curve=None):
    return {
        "arm": arm,
        "normalizer": normalizer,
        "sft_steps": steps,
        "seed": seed,
        "before_rl": {"pass@1": sft1, "pass@8": 0.8, "pass@16": 0.9},
        "after_rl": {"pass@1": rl1, "pass@8": rl8, "pass@16": 0.95},
        "sft_curve": curve or {},
    }


def test_sweep_finds_a_stronger_sft_checkpoint_that_ends_weaker_after_rl():
    results = [
        pretrained_chain("UniformSFT", "tokens", steps, seed, sft1, rl1)
        for seed in (0, 1)
        for steps, sft1, rl1 in ((0, 0.40, 0.70), (100, 0.30, 0.40), (200, 0.50, 0.55))
    ]
    results.append(pretrained_chain("UniformSFT", "tokens", 200, 2, 0.9, 0.9))  # not a sweep seed: left out
    table = pretrained_report.sweep(results, seeds=[0, 1])
    assert list(table) == [0, 100, 200]
    assert table[200]["sft_pass@1"]["mean"] == pytest.approx(0.5) and table[200]["seeds"] == [0, 1]
    lines = pretrained_report.phenomenon(table)
    assert lines[0] == (
        "- The phenomenon appears (pass@1): 200 SFT steps score higher than 0 before RL (0.500 vs 0.400) and lower "
        "after the same RL (0.550 vs 0.700); 1 of the 3 pairs of lengths are reversed this way."
    )
    assert lines[1] == "- Rank correlation over the SFT lengths of the SFT pass@1 with the post-RL pass@1: +0.50."
    monotone = [pretrained_chain("UniformSFT", "tokens", s, 0, s / 1000, s / 500) for s in (0, 100, 200)]
    assert pretrained_report.phenomenon(pretrained_report.sweep(monotone, [0]))[0].startswith(
        "- The phenomenon does not appear (pass@1)"
    )


def test_arms_are_labelled_by_normalizer_and_paired_with_uniform_by_seed():
    results = []
    for seed, base, token in ((0, 0.50, 0.60), (1, 0.40, 0.45), (2, 0.30, 0.25)):
        results.append(pretrained_chain("UniformSFT", "tokens", 200, seed, 0.3, base))
        results.append(pretrained_chain("TokenIS", "weights", 200, seed, 0.3, token))
    results.append(pretrained_chain("UniformSFT", "tokens", 400, 0, 0.3, 0.99))  # another length: not an arm row
    table = pretrained_report.arms(results, steps=200)
    assert list(table) == ["UniformSFT", "TokenIS (weights)"]
    delta = table["TokenIS (weights)"]["delta_pass@1"]
    assert delta["mean"] == pytest.approx((0.10 + 0.05 - 0.05) / 3)
    assert delta["higher"] == 2 and delta["n"] == 3
    assert delta["low"] == pytest.approx(-0.05) and delta["high"] <= 0.10 + 1e-12
    assert table["TokenIS (weights)"]["delta_pass@8"]["mean"] == pytest.approx(0.0)
    assert "delta_pass@1" not in table["UniformSFT"]
    # the SFT-stage scores are equal (0.3), so the RL gain's difference is the post-RL one
    assert table["TokenIS (weights)"]["delta_sft_pass@1"]["mean"] == pytest.approx(0.0)
    assert table["TokenIS (weights)"]["delta_gain_pass@1"]["mean"] == pytest.approx(delta["mean"])
    assert pretrained_report.verdicts(table) == [
        "- TokenIS (weights) vs UniformSFT: post-RL pass@1 +0.033, no different (interval holds 0); "
        "post-RL pass@8 +0.000, no different (interval holds 0); SFT pass@1 +0.000, no different (interval holds 0); "
        "RL gain in pass@1 +0.033, no different (interval holds 0)."
    ]


def test_weight_diagnostics_average_curves_over_seeds(tmp_path):
    def curve(ess):
        return {
            "step": [4.0, 9.0],
            "ess": ess,
            "log_weight_at_lower_clip": [0.0, 0.1],
            "log_weight_at_upper_clip": [0.2, 0.4],
            "log_ratio_mean": [-1.0, -0.5],
        }

    results = [
        pretrained_chain("TokenIS", "tokens", 200, 0, 0.3, 0.5, curve=curve([1.0, 0.8])),
        pretrained_chain("TokenIS", "tokens", 200, 1, 0.3, 0.5, curve=curve([0.8, 0.6])),
        pretrained_chain("UniformSFT", "tokens", 200, 0, 0.3, 0.5, curve={"step": [4.0], "nll": [1.0]}),
    ]
    diagnostics = pretrained_report.weight_diagnostics(results, steps=200)
    assert list(diagnostics) == ["TokenIS (tokens)"]
    ess = diagnostics["TokenIS (tokens)"]["ess"]
    assert ess["curve"] == pytest.approx([0.9, 0.7]) and ess["first"] == pytest.approx(0.9)
    assert ess["last"] == pytest.approx(0.7) and ess["mean"] == pytest.approx(0.8)
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,step,train/loss_step,train/ess_step,train/nll_step,train/lr\n"
        "0,4,1.5,0.9,1.4,0.1\n0,5,,,,\n0,9,1.2,0.7,1.1,0.2\n"
    )
    assert read_curve(metrics) == {"step": [4.0, 9.0], "nll": [1.4, 1.1], "ess": [0.9, 0.7]}

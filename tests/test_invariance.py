"""The reward-equivalence checks: each passes on its f(x) shift and fails on its y-dependent control."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.evaluate import tost_equivalence
from dpo_bench.invariance import (
    implicit_reward_checks, lemma1_preferences, lemma2_and_theorem1, lemma2_empirical, loss_invariance, prompt_shift,
)


def _assert_all_pass_and_detect(results):
    assert results
    for r in results:
        assert r.passed, r
        assert r.control_detected, r


def test_lemma1_on_reward_scores():
    rng = np.random.default_rng(0)
    r_w, r_l = rng.normal(size=50), rng.normal(size=50)
    _assert_all_pass_and_detect(lemma1_preferences(r_w, r_l, np.arange(50) // 5, rng))


def test_lemma2_and_theorem1_on_random_tables():
    rng = np.random.default_rng(1)
    ref = rng.dirichlet(np.ones(6), size=3)
    rewards = rng.uniform(-1, 1, size=(3, 6))
    results = lemma2_and_theorem1(ref, rewards, [0.05, 0.5, 5.0], rng)
    _assert_all_pass_and_detect(results)
    assert {r.check for r in results} >= {"theorem1[β=0.05]", "lemma2_policy[β=5]"}


def test_the_margin_losses_are_shift_invariant():
    rng = np.random.default_rng(2)
    ref_c, ref_r = torch.randn(40, dtype=torch.float64) - 5, torch.randn(40, dtype=torch.float64) - 5
    results = loss_invariance(ref_c, ref_r, np.arange(40) // 4, 0.2, rng, ["dpo", "cdpo", "robust", "ipo", "hinge"])
    assert {r.check for r in results} >= {"loss_invariance[dpo]", "loss_invariance[ipo]", "loss_invariance[hinge]"}
    _assert_all_pass_and_detect(results)


def test_implicit_reward_checks_pass_on_a_good_reward_and_fail_on_its_reversal():
    rng = np.random.default_rng(3)
    gold = rng.normal(size=400)
    implicit = gold + rng.normal(0, 0.5, 400)
    prompt_ids = np.repeat(np.arange(100), 4)
    chosen = rng.normal(1, 1, 300)
    rejected = rng.normal(0, 1, 300)
    results = implicit_reward_checks("dpo", 0.1, chosen, rejected, prompt_ids, implicit, gold, 0.1)
    _assert_all_pass_and_detect(results)
    # A reward with no relation to gold must not pass.
    many_ids = np.repeat(np.arange(2000), 4)
    bad = implicit_reward_checks("noise", 0.1, rng.normal(size=5000), rng.normal(size=5000), many_ids,
                                 rng.normal(size=8000), rng.normal(size=8000), 0.1)
    assert not any(r.passed for r in bad)


def _lemma2_frames(seed=4, n=2000, control_gold=-0.4, control_kl=5.0, shift=0.0):
    """Per-prompt frames of the three PPO runs, sampled with common random numbers: every run's
    noise is mostly the prompt's and the draw's, which the runs share."""
    rng = np.random.default_rng(seed)
    prompts = [f"x{i}" for i in range(n)]
    shared_gold, shared_kl = rng.normal(0, 0.5, n), rng.normal(0, 1.0, n)

    def frame(mean_gold, mean_kl):
        return pd.DataFrame({"prompt": prompts, "gold_reward": mean_gold + shared_gold + rng.normal(0, 0.1, n),
                             "policy_logp": mean_kl + shared_kl + rng.normal(0, 0.3, n), "ref_logp": np.zeros(n)})

    return {"r": frame(0.4, 2.0), "r+f": frame(0.4 + shift, 2.0), "r+g": frame(control_gold, control_kl)}


def test_lemma2_empirical_tost():
    _assert_all_pass_and_detect(lemma2_empirical(_lemma2_frames(), 0.1, 1.0))


def test_lemma2_empirical_is_paired_by_prompt():
    """400 prompts, a difference of 0.05 in gold reward between the r and r+f runs: paired, it is
    well inside ±0.1; unpaired (Welch), the shared noise would hide it (as it did in 3 of 15 runs
    of the default preset: README, "Why the Lemma 2 test is paired")."""
    frames = _lemma2_frames(n=400, shift=0.05)
    gold = next(r for r in lemma2_empirical(frames, 0.1, 1.0) if r.check == "lemma2_ppo[gold_reward]")
    assert gold.passed and gold.control_detected
    assert tost_equivalence(frames["r+f"]["gold_reward"], frames["r"]["gold_reward"], 0.1) > 0.05


def test_lemma2_empirical_refuses_runs_on_other_prompts():
    frames = _lemma2_frames(n=50)
    frames["r+g"] = frames["r+g"].iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match=r"r\+g run was evaluated on other prompts than the r run, or in another order"):
        lemma2_empirical(frames, 0.1, 1.0)


def test_prompt_shift_depends_on_the_prompt_only():
    f = prompt_shift(["a", "b", "a"], seed=0)
    assert f[0] == f[2] != f[1]
    assert np.array_equal(prompt_shift(["a"], seed=0), prompt_shift(["a"], seed=0))

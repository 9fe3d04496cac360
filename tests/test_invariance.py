"""The checks on trained models: each passes where the theory holds, and its negative control (an
independent perturbation, never a function of the checked value) is detected."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.evaluate import tost_equivalence
from dpo_bench.invariance import (
    BanditPairs, ChecksConfig, ImplicitRewards, bandit_convergence, convergence_tolerance, dpo_objective, fit_tabular_reward,
    implicit_reward_checks, lemma2_empirical, lemma2_speed, prompt_shift, reference_pairs, train_table,
)
from dpo_bench.preferences import shuffle_train_labels
from dpo_bench.tasks.bandit import BanditConfig, bandit_tables

torch.set_num_threads(1)


def _assert_all_pass_and_detect(results):
    assert results
    for r in results:
        assert r.passed, r
        assert r.control_detected, r


def _default_bandit() -> tuple[np.ndarray, np.ndarray]:
    rewards, logits = bandit_tables(BanditConfig())
    ref = np.exp(logits - logits.max(1, keepdims=True))
    return ref / ref.sum(1, keepdims=True), rewards


# --- the bandit convergence check -----------------------------------------------------------


def test_dpo_and_the_policy_gradient_reach_pi_star_of_the_fitted_reward_on_the_default_bandit():
    ref, rewards = _default_bandit()
    config = ChecksConfig()
    results = bandit_convergence(ref, rewards, config, np.random.default_rng(0))
    checks = [r for r in results if r.kind == "check"]
    n = config.convergence_steps
    assert {r.check for r in checks} == {f"bandit_convergence[{m}, {b} steps]" for m in ("dpo", "policy_gradient") for b in (n, 4 * n)}
    _assert_all_pass_and_detect(checks)
    # The control is not a function of the value: it is a policy trained on other labels, far off.
    assert all(r.control_value > 5 * r.tolerance for r in checks)
    curves = pd.DataFrame([r.row() for r in results if r.kind == "finding"])
    assert set(curves["quantity"]) == {"TV(π, π*(r̂))", "KL(π‖π*(r̂))"}
    for _, curve in curves.groupby(["check", "quantity"]):
        assert curve.sort_values("step")["value"].is_monotonic_decreasing


def test_the_convergence_tolerance_shrinks_as_training_grows():
    config = ChecksConfig(convergence_steps=40, convergence_tolerance=0.08)
    assert convergence_tolerance(config, 40) == pytest.approx(0.08)
    assert convergence_tolerance(config, 160) == pytest.approx(0.02)
    assert convergence_tolerance(config, 160) < convergence_tolerance(config, 80) < convergence_tolerance(config, 40)


def test_the_convergence_check_fails_when_training_is_too_short():
    """Five steps of training cannot reach π*(r̂): the check must say so rather than pass."""
    ref, rewards = _default_bandit()
    results = bandit_convergence(ref, rewards, ChecksConfig(convergence_steps=2, convergence_lr=0.01), np.random.default_rng(0))
    assert not any(r.passed for r in results if r.kind == "check")


def test_the_fitted_reward_recovers_the_gold_reward_up_to_a_shift_per_context():
    ref, rewards = _default_bandit()
    pairs = reference_pairs(ref, rewards, 20000, np.random.default_rng(1))
    fitted = fit_tabular_reward(pairs, rewards.shape)
    np.testing.assert_allclose(fitted.mean(1), 0, atol=1e-9)
    np.testing.assert_allclose(fitted, rewards - rewards.mean(1, keepdims=True), atol=0.25)


def test_the_fitted_reward_refuses_pairs_that_do_not_compare_every_response_both_ways():
    # Response 2 of context 0 always loses: its maximum-likelihood reward is −∞.
    pairs = BanditPairs(np.zeros(4, dtype=int), np.array([0, 1, 0, 1]), np.array([1, 0, 2, 2]))
    with pytest.raises(ValueError, match="context 0: the preference pairs do not compare every response both ways"):
        fit_tabular_reward(pairs, (1, 3))


# --- the implicit reward, against a DPO on shuffled labels -----------------------------------


def _implicit(logits: np.ndarray, ref: np.ndarray, beta: float, pairs: BanditPairs, rewards: np.ndarray) -> ImplicitRewards:
    reward = beta * (np.log(logits) - np.log(ref))
    n_x, n_y = rewards.shape
    # Each held-out pair is its own draw from π_ref: its own cluster.
    return ImplicitRewards(reward[pairs.context, pairs.chosen], reward[pairs.context, pairs.rejected], np.arange(len(pairs.context)),
                           np.repeat(np.arange(n_x), n_y), reward.ravel(), rewards.ravel())


def test_the_implicit_reward_of_a_trained_dpo_passes_and_its_shuffled_label_control_is_detected():
    """A small trained case: tabular DPO on 64 pairs per context of the default bandit, and the same
    DPO on the same pairs with shuffled labels, both measured on fresh held-out pairs."""
    ref, rewards = _default_bandit()
    rng = np.random.default_rng(2)
    beta = 0.5
    train, heldout = (reference_pairs(ref, rewards, n, rng) for n in (64, 200))
    trained = train_table(dpo_objective(train, ref, beta), ref, 0.05, [100])[100]
    shuffled = train_table(dpo_objective(train.shuffled(rng), ref, beta), ref, 0.05, [100])[100]
    policy, control = _implicit(trained, ref, beta, heldout, rewards), _implicit(shuffled, ref, beta, heldout, rewards)
    results = implicit_reward_checks("dpo", beta, policy, control, 0.1)
    _assert_all_pass_and_detect(results)
    accuracy = next(r for r in results if r.check == "implicit_reward_accuracy[dpo]")
    assert accuracy.control_value != pytest.approx(1 - accuracy.value)  # not the mirror image


def test_a_policy_that_learnt_nothing_fails_the_implicit_reward_checks():
    rng = np.random.default_rng(3)
    noise = ImplicitRewards(rng.normal(size=3000), rng.normal(size=3000), np.repeat(np.arange(500), 6),
                            np.repeat(np.arange(500), 4), rng.normal(size=2000), rng.normal(size=2000))
    assert not any(r.passed for r in implicit_reward_checks("noise", 0.1, noise, noise, 0.1))


def test_the_accuracy_interval_is_between_prompts_not_pairs():
    """Six pairs of one prompt that all agree are one observation, not six: 20 prompts whose pairs are
    all right or all wrong (12 of 20 right) give an interval that includes 0.5, while 120 independent
    pairs at the same accuracy would not."""
    right = np.repeat(np.arange(20) < 12, 6)
    rewards = ImplicitRewards(np.where(right, 1.0, -1.0), np.zeros(120), np.repeat(np.arange(20), 6),
                              np.arange(4) // 2, np.arange(4.0), np.arange(4.0))
    estimate = rewards.accuracy()
    assert estimate.value == pytest.approx(0.6) and estimate.n == 20 and estimate.ci_low < 0.5


def test_shuffled_labels_flip_about_half_the_train_pairs_and_no_held_out_pair():
    n = 4000
    pairs = pd.DataFrame({"prompt": [f"p{i}" for i in range(n)], "chosen": ["good"] * n, "rejected": ["bad"] * n,
                          "gold_chosen": np.ones(n), "gold_rejected": np.zeros(n), "split": ["train", "heldout"] * (n // 2)})
    out = shuffle_train_labels(pairs, np.random.default_rng(0))
    train, heldout = out[out["split"] == "train"], out[out["split"] == "heldout"]
    assert (heldout["chosen"] == "good").all()
    assert 0.45 < (train["chosen"] == "bad").mean() < 0.55
    assert ((train["chosen"] == "bad") == (train["gold_chosen"] == 0)).all()  # gold rewards move with their texts


# --- Lemma 2 with PPO ------------------------------------------------------------------------


def _lemma2_frames(seed=4, n=2000, control_gold=1.2, control_kl=8.0, shift=0.0):
    """Per-prompt frames of the three PPO runs, sampled with common random numbers: every run's
    noise is mostly the prompt's and the draw's, which the runs share. The r run gains 0.5 over
    SFT at KL 2: margins ±0.1 in gold reward and ±0.4 nats at a fraction of 0.2."""
    rng = np.random.default_rng(seed)
    prompts = [f"x{i}" for i in range(n)]
    shared_gold, shared_kl = rng.normal(0, 0.5, n), rng.normal(0, 1.0, n)
    sft = np.zeros(n)

    def frame(mean_gold, mean_kl):
        return pd.DataFrame({"prompt": prompts, "gold_reward": mean_gold + shared_gold + rng.normal(0, 0.1, n),
                             "kl": mean_kl + shared_kl + rng.normal(0, 0.3, n), "ref_gold_reward": sft})

    return {"r": frame(0.5, 2.0), "r+f": frame(0.5 + shift, 2.0), "r+g": frame(control_gold, control_kl)}


def test_lemma2_empirical_tost_with_margins_tied_to_the_effect():
    results = lemma2_empirical(_lemma2_frames(), 0.2)
    _assert_all_pass_and_detect(results)
    margins = [float(re.search(r"within ±([0-9.]+)", r.quantity).group(1)) for r in results]
    assert margins == pytest.approx([0.1, 0.4], abs=0.01)


def test_lemma2_empirical_fails_when_the_r_run_did_not_move():
    frames = _lemma2_frames()
    frames = {k: f.assign(gold_reward=f["ref_gold_reward"]) for k, f in frames.items()}
    gold = lemma2_empirical(frames, 0.2)[0]
    assert gold.value == 1.0 and not gold.passed


def test_lemma2_empirical_is_paired_by_prompt():
    """A difference of 0.05 in gold reward between the r and r+f runs on 400 prompts: paired, it is
    well inside ±0.1; unpaired (Welch), the shared noise would hide it (docs/checks.md, "Why the
    test is paired")."""
    frames = _lemma2_frames(n=400, shift=0.05)
    gold = next(r for r in lemma2_empirical(frames, 0.2) if r.check == "lemma2_ppo[gold_reward]")
    assert gold.passed and gold.control_detected
    assert tost_equivalence(frames["r+f"]["gold_reward"], frames["r"]["gold_reward"], 0.1) > 0.05


def test_lemma2_empirical_refuses_runs_on_other_prompts():
    frames = _lemma2_frames(n=50)
    frames["r+g"] = frames["r+g"].iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match=r"r\+g run was evaluated on other prompts than the r run, or in another order"):
        lemma2_empirical(frames, 0.2)


def test_lemma2_speed_is_reported_as_findings_at_each_checkpoint():
    curve = pd.DataFrame({"iteration": [10, 20], "gold_reward": [0.1, 0.3], "kl": [0.5, 1.5]})
    rows = lemma2_speed({"r": curve, "r+f": curve.assign(gold_reward=[0.0, 0.1]), "r+g": curve})
    assert {r.kind for r in rows} == {"finding"} and len(rows) == 8
    assert all(r.passed is None for r in rows)


def test_prompt_shift_depends_on_the_prompt_only():
    f = prompt_shift(["a", "b", "a"], seed=0)
    assert f[0] == f[2] != f[1]
    assert np.array_equal(prompt_shift(["a"], seed=0), prompt_shift(["a"], seed=0))


def test_the_shuffled_label_control_is_the_checked_cell_on_other_labels():
    from dpo_bench.bench import Cell
    from dpo_bench.stages import shuffled_label_cell

    cell = Cell("dpo", 0.3, 0, (("lr", 1e-4), ("steps", 150)), preferences=(("k", 4),))
    control = shuffled_label_cell(cell)
    # Same method, β, config and name: the same seed schedule (run_cell derives it from these).
    assert (control.display_name, control.strength_value, control.seed, control.config()) == \
        (cell.display_name, cell.strength_value, cell.seed, cell.config())
    assert dict(control.preferences) == {"k": 4, "shuffle_labels": True}


def test_a_reference_that_never_draws_some_responses_is_refused():
    """A reference so peaked that two responses are never drawn: no maximum-likelihood reward exists
    for them, and the fit says so (the run then records the check as failed, with this message)."""
    ref = np.full((1, 4), 1e-12)
    ref[0, 0] = ref[0, 1] = 0.5
    ref /= ref.sum()
    pairs = reference_pairs(ref, np.zeros((1, 4)), 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not strongly connected"):
        fit_tabular_reward(pairs, (1, 4))

"""The checks on trained models: each passes where the theory holds, and its negative control (an
independent perturbation, never a function of the checked value) is detected."""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.evaluate import tost_equivalence
from dpo_bench.invariance import (
    BanditPairs, ChecksConfig, ImplicitRewards, bandit_convergence, control_offset, convergence_checks, convergence_tolerance,
    dpo_learner, dpo_objective, fit_tabular_reward, implicit_reward_checks, iterations_to_stay_within, lemma2_bandit,
    lemma2_empirical, lemma2_speed, ppo_learner, ppo_table, predicted_shift, prompt_shift, reference_pairs,
    sampled_convergence_tolerance, total_variation, train_table,
)
from dpo_bench.preferences import shuffle_train_labels
from dpo_bench.tasks.bandit import BanditConfig, bandit_tables, optimal_policy

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


def test_dpo_and_sampled_ppo_reach_pi_star_of_the_fitted_reward_on_the_default_bandit():
    ref, rewards = _default_bandit()
    config = ChecksConfig()
    results = bandit_convergence(ref, rewards, config, np.random.default_rng(0))
    checks = {r.check: r for r in results if r.kind == "check"}
    n = config.convergence_steps
    convergence = [f"bandit_convergence[dpo, {b} steps]" for b in (n, 4 * n)] + \
        [f"bandit_convergence[ppo, {b} iterations]" for b in (n, 4 * n)]
    assert set(checks) == {*convergence, "lemma2_bandit_ppo[r̂]", "lemma2_bandit_ppo[r̂+f]"}
    assert all(checks[c].passed for c in convergence)
    assert checks[convergence[-1]].tolerance == pytest.approx(config.convergence_tolerance / 2)  # √(N/4N)
    # Each control moved π* by 3 tolerances and must have followed it; at the second budget all do.
    # (At N, DPO is still on the steep part of its curve: whether it has reached the moved optimum
    # by step 50 depends on the draw; docs/checks.md.)
    for c in (convergence[1], *convergence[2:], "lemma2_bandit_ppo[r̂]"):
        assert checks[c].control_detected, checks[c]
        assert checks[c].control_value == pytest.approx(3 * checks[c].tolerance, abs=checks[c].tolerance)
    predicted = [r for r in results if r.quantity.startswith("predicted shift")]
    assert [r.value for r in predicted] == pytest.approx([3 * convergence_tolerance(config, n), 3 * convergence_tolerance(config, 4 * n),
                                                          3 * sampled_convergence_tolerance(config, n),
                                                          3 * sampled_convergence_tolerance(config, 4 * n)])
    # Lemma 2: the global-baseline learner reaches π*(r̂) against r̂, and against r̂ + f(x) with the batch
    # that matches its gradient noise; at r̂'s batch, r̂ + f(x) is slower.
    assert checks["lemma2_bandit_ppo[r̂]"].passed and checks["lemma2_bandit_ppo[r̂+f]"].passed
    speed = {r.check: r.value for r in results if r.check.startswith("lemma2_bandit_ppo_speed") and r.step == 4 * n}
    assert speed["lemma2_bandit_ppo_speed[r̂+f, 64 a context]"] > speed["lemma2_bandit_ppo_speed[r̂]"]
    curves = pd.DataFrame([r.row() for r in results if r.check.startswith("bandit_convergence_curve")])
    assert set(curves["quantity"]) == {"TV(π, π*(r̂))", "KL(π‖π*(r̂))"}
    for _, curve in curves.groupby(["check", "quantity"]):
        assert curve.sort_values("step")["value"].is_monotonic_decreasing


def test_the_convergence_tolerance_shrinks_as_training_grows():
    config = ChecksConfig(convergence_steps=40, convergence_tolerance=0.08)
    assert convergence_tolerance(config, 40) == pytest.approx(0.08)
    assert convergence_tolerance(config, 160) == pytest.approx(0.02)
    assert convergence_tolerance(config, 160) < convergence_tolerance(config, 80) < convergence_tolerance(config, 40)
    # The sampled learner's: stochastic approximation's 1/√T.
    assert sampled_convergence_tolerance(config, 40) == pytest.approx(0.08)
    assert sampled_convergence_tolerance(config, 160) == pytest.approx(0.04)


def test_the_convergence_check_fails_when_training_is_too_short():
    """Two steps (eight at 4N) of training cannot reach π*(r̂): the checks must say so rather than pass."""
    ref, rewards = _default_bandit()
    results = bandit_convergence(ref, rewards, ChecksConfig(convergence_steps=2, convergence_lr=0.01), np.random.default_rng(0))
    assert not any(r.passed for r in results if r.kind == "check")


# A tiny table whose optimum is known: a uniform reference and r = β·log(π*/π_ref), so π* is STAR.
BETA = 0.5
STAR = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
UNIFORM = np.full((2, 3), 1 / 3)
TINY_REWARD = BETA * np.log(STAR / UNIFORM)
TINY_DIRECTION = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])


def _tiny_checks(learner, reward, budgets=(20, 80)):
    config = ChecksConfig(convergence_steps=budgets[0])
    unit, tolerance = (("iterations", lambda t: sampled_convergence_tolerance(config, t)) if learner[0] == "ppo"
                       else ("steps", lambda t: convergence_tolerance(config, t)))
    return [r for r in convergence_checks(learner[0], learner[1], reward, UNIFORM, BETA, list(budgets), tolerance,
                                          TINY_DIRECTION, 3.0, unit) if r.kind == "check"]


def _tiny_pairs(rng_seed=5):
    pairs = reference_pairs(UNIFORM, TINY_REWARD, 1024, np.random.default_rng(rng_seed))
    return pairs, fit_tabular_reward(pairs, TINY_REWARD.shape)


def test_sampled_ppo_reaches_a_known_optimum_on_a_tiny_table():
    np.testing.assert_allclose(optimal_policy(UNIFORM, TINY_REWARD, BETA), STAR, atol=1e-12)
    path = ppo_table(TINY_REWARD, UNIFORM, BETA, 80, np.random.default_rng(0), decay=20.0)
    assert path.shape == (81, 2, 3)
    np.testing.assert_allclose(path[0], UNIFORM)
    assert total_variation(path[-1], STAR) < 0.01 < total_variation(path[0], STAR)
    _assert_all_pass_and_detect(_tiny_checks(("ppo", ppo_learner(TINY_REWARD, UNIFORM, BETA, 0, 64, 20.0)), TINY_REWARD))


@pytest.mark.parametrize("mistake", ["sign", "beta"])
def test_a_wrong_sign_or_beta_in_ppo_fails_the_check(mistake):
    """PPO against −r (a flipped sign) or with kl_coef 2β (π* of another β, 0.13 away in total
    variation) is checked against π*(r) at β: no budget may pass, and no control may be called detected."""
    reward, kl_coef = (-TINY_REWARD, BETA) if mistake == "sign" else (TINY_REWARD, 2 * BETA)
    checks = _tiny_checks(("ppo", ppo_learner(reward, UNIFORM, kl_coef, 0, 64, 20.0)), TINY_REWARD)
    assert not any(r.passed for r in checks)


def test_dpo_reaches_pi_star_of_its_pairs_and_fails_with_a_wrong_sign_or_beta():
    pairs, fitted = _tiny_pairs()
    _assert_all_pass_and_detect(_tiny_checks(("dpo", dpo_learner(pairs, UNIFORM, BETA, 0.05)), fitted, (50, 200)))
    flipped = BanditPairs(pairs.context, pairs.rejected, pairs.chosen)
    for learner in (dpo_learner(flipped, UNIFORM, BETA, 0.05), dpo_learner(pairs, UNIFORM, 2 * BETA, 0.05)):
        assert not any(r.passed for r in _tiny_checks(("dpo", learner), fitted, (50, 200)))


def test_the_controls_offset_moves_pi_star_by_the_hand_computed_amount():
    """Two responses, π_ref uniform, r = (a, 0), g = (1, −1): π*(y₀) = σ(a/β), and with r + δg it is
    σ((a + 2δ)/β), so a shift s needs δ = (β·logit(σ(a/β) + s) − a)/2."""
    beta, a, shift = 0.5, 0.3, 0.15
    reward, ref, direction = np.array([[a, 0.0]]), np.full((1, 2), 0.5), np.array([[1.0, -1.0]])
    sigmoid = 1 / (1 + np.exp(-a / beta))
    delta = (beta * np.log((sigmoid + shift) / (1 - sigmoid - shift)) - a) / 2
    offset = control_offset(reward, ref, beta, direction, shift)
    np.testing.assert_allclose(offset, delta * direction, rtol=1e-9)
    assert predicted_shift(reward, ref, beta, offset) == pytest.approx(shift, abs=1e-12)
    # A prompt-only offset moves nothing (Lemma 2), so no multiple of it can make a control.
    assert predicted_shift(reward, ref, beta, np.array([[5.0, 5.0]])) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="no multiple of the control's direction"):
        control_offset(reward, ref, beta, np.ones((1, 2)), shift)


def test_the_lemma2_pair_reaches_the_same_policy_and_the_prompt_shift_slows_it():
    """Global-baseline PPO against r and r + f(x) (f = ±0.5, its batch enlarged to match the start's
    gradient noise) ends within the tolerance of the same π*(r); at r's batch, f, which the baseline
    cannot absorb, makes it slower. The controls (a y-dependent term) are detected."""
    config = ChecksConfig()
    tolerance = functools.partial(sampled_convergence_tolerance, config)
    control = control_offset(TINY_REWARD, UNIFORM, BETA, TINY_DIRECTION, 3 * tolerance(200))
    results = lemma2_bandit(TINY_REWARD, np.array([[0.5], [-0.5]]), UNIFORM, BETA, 0, 64, 50.0, [50, 200], tolerance, control)
    checks = {r.check: r for r in results if r.kind == "check"}
    assert set(checks) == {"lemma2_bandit_ppo[r̂]", "lemma2_bandit_ppo[r̂+f]"}
    _assert_all_pass_and_detect(checks.values())
    reach = {r.quantity: r.value for r in results if r.check == "lemma2_bandit_ppo_reach"}
    assert reach["iterations until TV stays ≤ 0.05 under r̂"] < reach["iterations until TV stays ≤ 0.05 under r̂+f, 64 a context"]
    ratio = next(r.value for r in results if r.check == "lemma2_bandit_ppo_noise")
    # By hand: π_ref uniform, r = TINY_REWARD; Var(r − b) and Var(r + f − b) over x uniform, y ~ π_ref.
    r = TINY_REWARD
    shifted = r + np.array([[0.5], [-0.5]])
    assert ratio == pytest.approx(((shifted - shifted.mean()) ** 2).mean() / ((r - r.mean()) ** 2).mean())
    assert ratio > 1


def test_iterations_to_stay_within_ignores_an_early_dip():
    target = np.array([[1.0, 0.0]])
    path = np.array([[[1 - tv, tv]] for tv in (0.5, 0.01, 0.2, 0.04, 0.03)])
    assert iterations_to_stay_within(path, target, 0.05) == 3
    assert iterations_to_stay_within(path, target, 0.6) == 0
    assert np.isnan(iterations_to_stay_within(path, target, 0.02))


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


def test_the_bandit_checks_are_computed_once_per_process_for_the_same_inputs(monkeypatch):
    import dpo_bench.invariance.bandit as invariance

    calls = []
    monkeypatch.setattr(invariance, "bandit_convergence", lambda ref, rewards, config, rng: calls.append(rng.random()) or [])
    monkeypatch.setattr(invariance, "_BANDIT_CHECKS", {})
    ref, rewards = _default_bandit()
    config = ChecksConfig()
    invariance.bandit_checks(ref, rewards, config, 7)
    invariance.bandit_checks(ref.copy(), rewards.copy(), ChecksConfig(), 7)  # equal inputs: read, not computed
    assert len(calls) == 1
    invariance.bandit_checks(ref, rewards, config, 8)  # another seed
    invariance.bandit_checks(ref, rewards + 1, config, 7)  # other tables
    invariance.bandit_checks(ref, rewards, ChecksConfig(convergence_steps=20), 7)  # another config
    assert len(calls) == 4 and calls.count(calls[0]) == 3  # seed 7 draws the same numbers for any tables

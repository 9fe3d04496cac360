"""The verdict's wiring: the cells' per-prompt results become frontier points and an anchor, RLHF is
compared with each DPO-family method (not with the oracle or the inference-time baseline), and the
p-values are corrected across every claim."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpo_bench.configs import ConfigError
from dpo_bench.evaluate import benjamini_hochberg, holm
from dpo_bench.verdict import Objective, VerdictConfig, frontier_inputs, objective_rows, verdict_comparisons, verdict_frames
from reward.normalise import Normaliser

ROLES = {"sft": "reference", "ppo": "rlhf", "dpo": "direct", "ipo": "direct", "ppo_gt": "oracle", "best_of_n": "inference"}


def _per_prompt(gains: dict[str, float], seeds=(0, 1, 2), n=40, kl=(0.5, 1.5), noise=0.05, splits=("val", "test")) -> pd.DataFrame:
    """Per-prompt rows of a run: each method at two strengths whose KL is ``kl`` and whose gold is the
    SFT model's plus gain × KL (plus noise), on the same prompts in every seed."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        for split in splits:
            base = rng.normal(0, 0.3, n)
            rows.append(pd.DataFrame({"method": "sft", "beta": np.nan, "seed": seed, "step": 0, "split": split,
                                      "prompt_index": np.arange(n), "reward": base, "kl": 0.0}))
            for method, gain in gains.items():
                for beta, k in zip((1.0, 0.1), kl):
                    rows.append(pd.DataFrame({"method": method, "beta": beta, "seed": seed, "step": 10, "split": split,
                                              "prompt_index": np.arange(n), "reward": base + gain * k + rng.normal(0, noise, n),
                                              "kl": k + rng.normal(0, 0.01, n)}))
    return pd.concat(rows, ignore_index=True)


def test_frontier_inputs_split_points_from_the_reference_anchor():
    points, anchor = frontier_inputs(_per_prompt({"dpo": 0.1}))
    assert list(points.columns) == ["method", "seed", "point", "split", "prompt", "gold", "kl"]
    assert set(points["method"]) == {"dpo"} and set(points["point"]) == {"1@10", "0.1@10"}
    assert list(anchor.columns) == ["seed", "split", "prompt", "gold"] and len(anchor) == 3 * 2 * 40


def test_without_validation_prompts_the_choice_is_made_on_the_test_prompts():
    points, anchor = frontier_inputs(_per_prompt({"dpo": 0.1}, splits=("test",)))
    val, test = (points[points["split"] == s].reset_index(drop=True) for s in ("val", "test"))
    pd.testing.assert_frame_equal(val.drop(columns="split"), test.drop(columns="split"))
    frames = verdict_frames(_per_prompt({"dpo": 0.1, "ppo": 0.2}, splits=("test",)), ROLES, VerdictConfig(n_bootstrap=50))
    assert set(frames["frontier"]["chosen_on"]) == {"test"}


def test_rlhf_is_compared_with_the_dpo_family_only_and_corrected_across_claims():
    per_prompt = _per_prompt({"ppo": 0.3, "dpo": 0.1, "ipo": 0.1, "ppo_gt": 0.5, "best_of_n": 0.4})
    points, anchor = frontier_inputs(per_prompt)
    config = VerdictConfig(kl_budgets=(0.25, 1.0, 2.0))
    out = verdict_comparisons(points, anchor, ROLES, config)
    # 2.0 nats is beyond every method's largest KL (1.5), 0.25 below its smallest (0.5: only the chord
    # from the SFT model reaches it): neither is a claim.
    assert sorted(zip(out["method_b"], out["kl_budget"])) == [("dpo", 1.0), ("ipo", 1.0)]
    assert (out["method_a"] == "ppo").all() and (out["n_seeds"] == 3).all()
    np.testing.assert_allclose(out["p_adjusted"], holm(out["p"].to_numpy()))
    # PPO gains 0.3 per nat where DPO gains 0.1: ahead at every budget, beyond doubt.
    assert (out["diff"] > 0).all() and (out["p_adjusted"] < 0.05).all()
    np.testing.assert_allclose(out.loc[out["kl_budget"] == 1.0, "diff"], 0.2, atol=0.03)
    bh = verdict_comparisons(points, anchor, ROLES, VerdictConfig(kl_budgets=(0.25, 1.0), correction="bh"))
    np.testing.assert_allclose(bh["p_adjusted"], benjamini_hochberg(bh["p"].to_numpy()))


def test_no_rlhf_entry_gives_no_comparisons():
    points, anchor = frontier_inputs(_per_prompt({"dpo": 0.1, "ipo": 0.2}))
    assert verdict_comparisons(points, anchor, ROLES, VerdictConfig()).empty


def test_equal_methods_are_not_separated():
    per_prompt = _per_prompt({"ppo": 0.1, "dpo": 0.1}, noise=0.3)
    frames = verdict_frames(per_prompt, ROLES, VerdictConfig(kl_budgets=(0.5, 1.0), n_bootstrap=100))
    assert (frames["comparisons"]["p_adjusted"] > 0.05).all()
    assert set(frames["frontier"]["method"]) == {"ppo", "dpo"} and (frames["frontier"]["n_seeds"] == 3).all()


@pytest.mark.parametrize("budgets, message", [((), "kl_budgets must be positive"), ((0.5, -1.0), "kl_budgets must be positive"),
                                              ((1.0, 0.5), "increasing and distinct")])
def test_budgets_are_validated(budgets, message):
    with pytest.raises(ConfigError, match=message):
        VerdictConfig(kl_budgets=budgets)


def test_each_rlhf_cell_is_checked_on_its_own_objective_against_sft_and_best_of_n():
    """E[r̂] − c·KL on the test prompts at the final checkpoint, by hand."""
    def rows(method, beta, step, proxy, kl, split="test"):
        return pd.DataFrame({"method": method, "beta": beta, "seed": 0, "step": step, "split": split, "prompt_index": [0, 1],
                             "reward": 0.0, "proxy_reward": proxy, "kl": kl})

    per_prompt = pd.concat([
        rows("sft", np.nan, 0, [0.0, 1.0], [0.0, 0.0]),
        rows("ppo", 0.5, 10, [5.0, 5.0], [9.0, 9.0]),  # an early checkpoint: not the one checked
        rows("ppo", 0.5, 20, [2.0, 3.0], [1.0, 3.0]),
        rows("ppo", 0.5, 20, [9.0, 9.0], [0.0, 0.0], split="val"),  # validation prompts: never read here
        rows("best_of_n", 4.0, 0, [1.5, 2.5], [0.5, 0.7]),
        rows("dpo", 0.1, 30, [9.0, 9.0], [0.0, 0.0]),  # not RLHF: no objective of its own
    ], ignore_index=True)
    out = objective_rows(per_prompt, ROLES).set_index("metric")
    assert set(out.index) == {"objective", "objective/sft", "objective/best_of_n (N=4)", "objective_kl_coef", "objective_eos_penalty"}
    assert out.loc["objective_kl_coef", "value"] == 0.5 and out.loc["objective_eos_penalty", "value"] == 0.0
    assert (out["method"] == "ppo").all() and (out["beta"] == 0.5).all() and (out["step"] == 20).all()
    # ppo: mean(2 − 0.5, 3 − 1.5) = 1.5; sft: mean(0, 1) = 0.5; best-of-4: mean(1.25, 2.15) = 1.7.
    np.testing.assert_allclose(out.loc[["objective", "objective/sft", "objective/best_of_n (N=4)"], "value"], [1.5, 0.5, 1.7])
    np.testing.assert_allclose(out.loc["objective", "stderr"], np.std([1.5, 1.5], ddof=1) / np.sqrt(2))
    np.testing.assert_allclose(out.loc["objective/best_of_n (N=4)", "stderr"], np.std([1.25, 2.15], ddof=1) / np.sqrt(2))


def test_the_objective_is_what_ppo_maximises_eos_penalty_and_adaptive_kl_coef_included():
    """E[r̂ − p·truncated] − c·KL for the cell and every policy it is held against, with the cell's
    own p and c (here the adaptive controller's final kl_coef 0.2, not the config's 0.5), by hand."""
    def rows(method, beta, step, proxy, kl, truncated):
        return pd.DataFrame({"method": method, "beta": beta, "seed": 0, "step": step, "split": "test", "prompt_index": [0, 1],
                             "reward": 0.0, "proxy_reward": proxy, "kl": kl, "truncated": truncated})

    per_prompt = pd.concat([
        rows("sft", np.nan, 0, [0.0, 1.0], [0.0, 0.0], [False, True]),
        rows("ppo", 0.5, 20, [2.0, 3.0], [1.0, 3.0], [True, False]),
        rows("best_of_n", 4.0, 0, [1.5, 2.5], [0.5, 0.7], [True, True]),
    ], ignore_index=True)
    objective = Objective(kl_coef=0.2, eos_penalty=1.5, adaptive=True)
    out = objective_rows(per_prompt, ROLES, {("ppo", 0.5, 0): objective}).set_index("metric")
    # ppo: mean(2 − 1.5 − 0.2, 3 − 0.6) = mean(0.3, 2.4) = 1.35
    # sft: mean(0, 1 − 1.5) = −0.25
    # best-of-4: mean(1.5 − 1.5 − 0.1, 2.5 − 1.5 − 0.14) = mean(−0.1, 0.86) = 0.38
    np.testing.assert_allclose(out.loc[["objective", "objective/sft", "objective/best_of_n (N=4)"], "value"], [1.35, -0.25, 0.38])
    np.testing.assert_allclose(out.loc["objective", "stderr"], np.std([0.3, 2.4], ddof=1) / np.sqrt(2))
    # The row says which c it used: the controller's, not the config's (the beta column keeps the cell's key).
    assert "objective_kl_coef" not in out.index
    assert out.loc["objective_kl_coef_adaptive", "value"] == 0.2 and out.loc["objective_eos_penalty", "value"] == 1.5
    assert (out["beta"] == 0.5).all()


def test_the_optimum_is_estimated_from_the_pool_of_reference_draws():
    """c·mean over prompts of log mean_j exp(s_j/c), s = r̂ − p·truncated, by hand; c = 0: the best draw."""
    per_prompt = pd.DataFrame({"method": ["sft", "ppo"], "beta": [np.nan, 0.5], "seed": 0, "step": [0, 20], "split": "test",
                               "prompt_index": 0, "reward": 0.0, "proxy_reward": [0.0, 1.0], "kl": [0.0, 0.4]})
    pool = pd.DataFrame({"seed": 0, "split": ["val"] * 2 + ["test"] * 4, "prompt_index": 0, "draw": [0, 1, 0, 1, 2, 3],
                         "proxy_reward": [9.0, 9.0, 0.0, 1.0, 2.0, 3.0], "truncated": [False, False, False, False, False, True]})
    out = objective_rows(per_prompt, ROLES, {("ppo", 0.5, 0): Objective(0.5, eos_penalty=2.0)}, pools=pool).set_index("metric")
    # s = 0, 1, 2, 1 (the last draw cut without EOS); the validation prompts' draws are not read
    expected = 0.5 * np.log(np.mean(np.exp(np.array([0.0, 1.0, 2.0, 1.0]) / 0.5)))
    np.testing.assert_allclose(out.loc["objective/optimum (pool of 4)", "value"], expected)
    assert out.loc["objective/optimum (pool of 4)", "value"] > out.loc["objective", "value"]  # 1 − 0.2: below it
    np.testing.assert_allclose(Objective(0.0).optimum(pool[pool["split"] == "test"]), [3.0])
    assert "objective/optimum (pool of 4)" not in objective_rows(per_prompt, ROLES, pools=pool.assign(seed=1)).set_index("metric").index


def test_an_objective_on_raw_scores_undoes_the_normalisation():
    """normalise_reward off: PPO read r = r̂·std + mean, so the objective does too."""
    frame = pd.DataFrame({"proxy_reward": [1.0, -1.0], "kl": [2.0, 0.0], "truncated": [False, True]})
    objective = Objective(kl_coef=0.1, eos_penalty=0.5, raw=Normaliser(mean=3.0, std=2.0, n=10))
    np.testing.assert_allclose(objective.values(frame), [5.0 - 0.2, 1.0 - 0.5])


def test_a_cell_is_held_to_its_own_config_and_its_controllers_final_kl_coef(tmp_path):
    """The objective's c and p come from the cell's resolved config; with target_kl > 0, c is the
    train/kl_coef logged at the final checkpoint (not after it: a failed cell's last checkpoint is earlier)."""
    from dpo_bench.bench import Cell
    from dpo_bench.run import rlhf_objective
    from dpo_bench.stages import Stage

    pd.DataFrame({"metric": ["train/kl_coef"] * 3 + ["train/kl"], "step": [1, 2, 3, 2], "value": [0.1, 0.13, 0.17, 9.0]}
                 ).to_parquet(tmp_path / "metrics.parquet")
    pd.DataFrame({"step": [0, 2, 2]}).to_parquet(tmp_path / "per_prompt.parquet")
    stage = Stage("cell", "key", tmp_path)
    adaptive = rlhf_objective(Cell("ppo", 0.1, 0, (("missing_eos_penalty", 0.5), ("target_kl", 2.0))), stage, None)
    assert adaptive == Objective(kl_coef=0.13, eos_penalty=0.5, adaptive=True)
    fixed = rlhf_objective(Cell("ppo", 0.1, 0), stage, None)
    assert fixed == Objective(kl_coef=0.1, eos_penalty=1.0)  # PPOConfig's default missing_eos_penalty


def test_a_dpo_cell_is_held_to_the_problem_it_solves_in_the_reward_models_units(tmp_path):
    """DPO at β solves max E[r] − β·KL with r in Bradley-Terry units: on the normalised r̂ = (r − mean)/σ
    that is E[r̂] − (β/σ)·KL, σ the reward model's std on SFT samples; other losses get no objective."""
    import json

    from dpo_bench.bench import Cell
    from dpo_bench.run import dpo_objective
    from dpo_bench.stages import Stage

    (tmp_path / "normalisers.json").write_text(json.dumps({"reward_model": {"mean": -0.2, "std": 2.0, "n": 100}}))
    stage = Stage("reward_model", "key", tmp_path)
    assert dpo_objective(Cell("dpo", 0.3, 0), stage) == Objective(kl_coef=0.15)
    assert dpo_objective(Cell("ipo", 0.3, 0), stage) is None
    assert dpo_objective(Cell("dpo", 0.3, 0), None) is None
    per_prompt = pd.DataFrame({"method": ["dpo"] * 2 + ["best_of_n"] * 2, "beta": [0.3, 0.3, 4.0, 4.0], "seed": 0,
                               "step": [30, 30, 0, 0], "split": "test", "prompt_index": [0, 1, 0, 1], "reward": 0.0,
                               "proxy_reward": [1.0, 2.0, 1.5, 2.5], "kl": [2.0, 4.0, 0.5, 0.7]})
    out = objective_rows(per_prompt, {"dpo": "direct", "best_of_n": "inference"}, {("dpo", 0.3, 0): Objective(0.15)}).set_index("metric")
    # dpo: mean(1 − 0.3, 2 − 0.6) = 1.05; best-of-4: mean(1.5 − 0.075, 2.5 − 0.105) = 1.91
    np.testing.assert_allclose(out.loc[["objective", "objective/best_of_n (N=4)"], "value"], [1.05, 1.91])
    assert out.loc["objective_kl_coef", "value"] == 0.15

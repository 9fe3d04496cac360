"""The DPO paper's reward-equivalence results, checked on trained models and measured quantities.

Rewards that differ by a function f(x) of the prompt alone are equivalent: they induce the same
Bradley-Terry preferences (Lemma 1) and the same KL-constrained optimal policy (Lemma 2), and each
class holds the reward β·log π(y|x)/π_ref(y|x) (Theorem 1). On closed-form quantities these are
identities of the code; they are unit tests (``tests/test_reward_equivalence.py``). What is checked
here is what training could get wrong, each with a negative control that is an independent
perturbation (never a function of the checked value):

- on the bandit tables, DPO on Bradley-Terry pairs and sampled PPO against the pairs'
  maximum-likelihood reward r̂ both reach π* = π_ref·exp(r̂/β)/Z, and PPO with a global baseline
  reaches it against r̂ + f(x) too (control: the same learner with a y-dependent term added to its
  reward, which moves π* by a predicted amount; it must move by that much);
- a trained DPO policy's implicit reward β·log π/π_ref ranks held-out pairs and tracks the gold
  reward (control: the same DPO trained on shuffled labels);
- PPO against r and against r + f(x) reach the same gold reward and KL (control: f(x) + c·r).

Rows are checks (pass/fail, with their control) or findings (measured numbers, no verdict).
"""

from .results import COLUMNS, CheckResult, ChecksConfig
from .bandit import (
    BanditPairs, Learner, MAX_NOISE_MATCH, UnidentifiedReward, bandit_checks, bandit_convergence, context_baseline,
    control_offset, convergence_checks, convergence_tolerance, dpo_learner, dpo_objective, fit_tabular_reward,
    global_baseline, global_noise_ratio, iterations_to_stay_within, lemma2_bandit, ppo_learner, ppo_table,
    predicted_shift, reference_pairs, sample_responses, sampled_convergence_tolerance, total_variation, train_table,
)
from .trained import ImplicitRewards, implicit_reward_checks, lemma2_empirical, lemma2_speed, prompt_shift

__all__ = [
    "BanditPairs",
    "COLUMNS",
    "CheckResult",
    "ChecksConfig",
    "ImplicitRewards",
    "Learner",
    "MAX_NOISE_MATCH",
    "UnidentifiedReward",
    "bandit_checks",
    "bandit_convergence",
    "context_baseline",
    "control_offset",
    "convergence_checks",
    "convergence_tolerance",
    "dpo_learner",
    "dpo_objective",
    "fit_tabular_reward",
    "global_baseline",
    "global_noise_ratio",
    "implicit_reward_checks",
    "iterations_to_stay_within",
    "lemma2_bandit",
    "lemma2_empirical",
    "lemma2_speed",
    "ppo_learner",
    "ppo_table",
    "predicted_shift",
    "prompt_shift",
    "reference_pairs",
    "sample_responses",
    "sampled_convergence_tolerance",
    "total_variation",
    "train_table",
]

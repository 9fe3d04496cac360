"""The reward-KL frontier of a method, and its gold reward at fixed KL budgets.

A method traces points (kl_i, gold_i), one per (strength, checkpoint). Its frontier is the upper
concave hull of those points and of the SFT reference (the anchor, at KL 0), made non-decreasing
in KL. Why concave: a per-prompt random mixture of policies a and b with weight w has gold reward
w g_a + (1 - w) g_b and, KL being convex in the policy, KL at most w kl_a + (1 - w) kl_b, so every
chord of the hull is achievable. Why non-decreasing: the best policy within a KL budget k is the
best at KL <= k. Beyond the largest KL a method was measured at, nothing is claimed. Below the
smallest, the frontier is the chord from the reference to the method's nearest policy: a mixture
with the reference that every method gets for free, not a policy the method trained there. Such a
budget is not *covered* by the method; the verdict compares methods only at budgets both cover.

Three layers, each pure numpy (pandas only where a DataFrame is the input or output):
  points      upper_envelope, mixture_at, envelope_value, budget_value (chosen on validation
              means, reported on test means)
  per prompt  per_seed_budget_values, frontier_table (hierarchical bootstrap over seeds and
              prompts), compare_at_budgets (paired across seeds, or across prompts for one seed)
  best-of-n   best_of_n_kl_estimate (exact plug-in KL from a reference pool), best_of_n_kl_bound
Each layer is a module of this package: envelope.py, prompts.py, best_of_n.py.
"""

from .envelope import ANCHOR, ANCHOR_POINT, Envelope, budget_value, envelope_value, mixture_at, upper_envelope
from .best_of_n import best_of_n_kl_bound, best_of_n_kl_estimate
from .prompts import compare_at_budgets, frontier_table, per_seed_budget_values

__all__ = [
    "ANCHOR",
    "ANCHOR_POINT",
    "Envelope",
    "upper_envelope",
    "mixture_at",
    "envelope_value",
    "budget_value",
    "per_seed_budget_values",
    "frontier_table",
    "compare_at_budgets",
    "best_of_n_kl_estimate",
    "best_of_n_kl_bound",
]

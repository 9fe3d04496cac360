"""Checks on the models a run trained: a DPO policy's implicit reward against a DPO on shuffled
labels, and Lemma 2 with PPO against r and r + f(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dpo_engine.seeds import derive_seed

from ..evaluate import Estimate, estimate_from_samples, tost_equivalence, within_prompt_spearman
from .results import CheckResult


@dataclass(frozen=True)
class ImplicitRewards:
    """A policy's implicit reward β·log π/π_ref on the held-out pairs (``chosen``, ``rejected``: (n,),
    from the prompts ``pair_prompt_ids``), and on K reference samples per held-out prompt
    (``samples``: (m,), grouped by ``prompt_ids``) next to their ``gold`` rewards."""

    chosen: np.ndarray
    rejected: np.ndarray
    pair_prompt_ids: np.ndarray
    prompt_ids: np.ndarray
    samples: np.ndarray
    gold: np.ndarray

    def accuracy(self) -> Estimate:
        """Each held-out prompt's share of pairs the implicit reward orders as the label does (ties
        count one half), averaged over prompts, with a Student-t interval between prompts: the pairs
        of a prompt share its completions (K = 4 give 6 pairs), so they are not independent draws
        and an interval over pairs would be too narrow."""
        correct = (self.chosen > self.rejected) + 0.5 * (self.chosen == self.rejected)
        return estimate_from_samples(pd.Series(correct).groupby(np.asarray(self.pair_prompt_ids)).mean())

    def spearman(self) -> float:
        """Within-prompt Spearman correlation with the gold reward (prompt means removed: exactly removing f(x))."""
        return float(within_prompt_spearman(self.prompt_ids, self.samples, self.gold))


def implicit_reward_checks(label: str, beta: float, policy: ImplicitRewards, control: ImplicitRewards,
                           threshold: float) -> list[CheckResult]:
    """The trained DPO policy's implicit reward ranks held-out pairs better than chance (the 95%
    lower bound of its accuracy, between prompts, exceeds 0.5) and tracks the gold reward within
    prompts (Spearman above ``threshold``).

    Control: the implicit reward of a DPO policy trained the same way (same β, steps, seed schedule)
    on the same pairs with shuffled labels, measured on the same held-out pairs and samples. It
    learnt no preference, so it must fail both: its accuracy's lower bound at most 0.5, its
    correlation at most the threshold.
    """
    accuracy, control_accuracy = policy.accuracy(), control.accuracy()
    rho, control_rho = policy.spearman(), control.spearman()
    return [
        CheckResult(f"implicit_reward_accuracy[{label}]",
                    f"held-out pairwise accuracy of β·log π/π_ref (β={beta:g}), mean over {accuracy.n} prompts; its 95% "
                    f"interval [{accuracy.ci_low:.3f}, {accuracy.ci_high:.3f}] must lie above the tolerance (control: DPO on "
                    f"shuffled labels, [{control_accuracy.ci_low:.3f}, {control_accuracy.ci_high:.3f}])",
                    accuracy.value, 0.5, control_accuracy.value, bool(accuracy.ci_low > 0.5), not bool(control_accuracy.ci_low > 0.5)),
        CheckResult(f"implicit_reward_spearman[{label}]",
                    "within-prompt Spearman(β·log π/π_ref, gold reward) on reference samples; must exceed the tolerance "
                    "(control: DPO on shuffled labels)",
                    rho, threshold, control_rho, bool(rho > threshold), not bool(control_rho > threshold)),
    ]


def lemma2_empirical(results: dict[str, pd.DataFrame], margin_fraction: float) -> list[CheckResult]:
    """PPO against r and against r + f(x) ends at equivalent gold reward and KL (paired TOST, 5%),
    while PPO against r + f(x) + g(x, y) does not (g = (c − 1)·r: the reward scaled by c, which moves the
    optimum as dividing kl_coef by c would).

    The margins are tied to the effect, decided before the runs: ``margin_fraction`` of the r run's
    gold-reward gain over the SFT model (its reference samples on the same prompts) and of its KL.
    A run that did not move has no effect to compare against, and the check fails.
    ``results`` maps "r", "r+f", "r+g" to per-prompt frames (``prompt``, ``gold_reward``,
    ``ref_gold_reward``, ``kl``). The three policies are evaluated on the same prompts with the same
    random numbers, so the tests are paired, prompt by prompt: a Welch test would count the sampling
    noise they share twice."""
    base, shifted, perturbed = results["r"], results["r+f"], results["r+g"]
    for name, frame in (("r+f", shifted), ("r+g", perturbed)):
        if not np.array_equal(base["prompt"].to_numpy(), frame["prompt"].to_numpy()):
            raise ValueError(f"lemma2 PPO: the {name} run was evaluated on other prompts than the r run, "
                             "or in another order; the paired tests need the same prompts in the same order")
    effects = {"gold_reward": float(base["gold_reward"].mean() - base["ref_gold_reward"].mean()), "kl": float(base["kl"].mean())}
    units = {"gold_reward": "gain over SFT", "kl": "KL"}
    out = []
    for quantity, effect in effects.items():
        margin = margin_fraction * effect
        x, y, z = (f[quantity].to_numpy(dtype=float) for f in (shifted, base, perturbed))
        if margin > 0:
            p, p_control = (tost_equivalence(a, y, margin, paired=True) for a in (x, z))
        else:  # nothing moved: nothing tested, and a control that cannot be tested is not detected either
            p, p_control = 1.0, math.nan
        out.append(CheckResult(
            f"lemma2_ppo[{quantity}]",
            f"paired TOST p-value that PPO against r and r+f(x) reach the same {quantity} within ±{margin:.3g} "
            f"({margin_fraction:g} × the r run's {units[quantity]} {effect:.3g}; must be < tolerance)",
            p, 0.05, p_control, bool(p < 0.05), bool(p_control >= 0.05),
        ))
    return out


def lemma2_speed(curves: dict[str, pd.DataFrame]) -> list[CheckResult]:
    """Findings: gold reward and KL along PPO's runs against r and r + f(x) (``curves``: per variant,
    ``iteration``, ``gold_reward``, ``kl`` on the eval prompts). A prompt-only shift leaves the optimum
    where it is but adds advantage variance a value head cannot learn quickly: it can slow PPO down."""
    out = []
    for variant in ("r", "r+f"):
        for _, row in curves[variant].iterrows():
            out.append(CheckResult.finding(f"lemma2_ppo_speed[{variant}]", "gold reward", row["gold_reward"], row["iteration"]))
            out.append(CheckResult.finding(f"lemma2_ppo_speed[{variant}]", "KL(π‖π_ref)", row["kl"], row["iteration"]))
    return out


def prompt_shift(prompts, seed: int, scale: float = 1.0) -> np.ndarray:
    """f(x): one N(0, scale²) value per distinct prompt, stable across processes."""
    return np.array([np.random.default_rng(derive_seed(seed, "f(x)", p)).normal(0, scale) for p in prompts])



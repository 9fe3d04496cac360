"""A check's row: its config (ChecksConfig) and its result (CheckResult), the columns of
invariance.parquet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..configs import ConfigError, field, positive


COLUMNS = ["kind", "check", "quantity", "step", "value", "tolerance", "passed", "negative_control_detected", "control_value"]


@dataclass(frozen=True)
class ChecksConfig:
    """The checks on trained models: the bandit convergence check always runs; the empirical ones on request."""

    empirical: bool = field(False, "run the checks that train and sample on the task: the DPO policy's implicit reward "
                                   "(against a DPO trained on shuffled labels), and Lemma 2 with PPO against r, r + f(x), r + g(x, y)")
    convergence_beta: float = field(0.5, "β of the bandit convergence check (DPO's β, and PPO's KL coefficient)")
    convergence_pairs: int = field(1024, "Bradley-Terry pairs per context drawn from the reference for the bandit convergence check")
    convergence_steps: int = field(50, "N: the first training budget of the bandit convergence check (DPO's full-batch Adam "
                                       "steps, PPO's iterations); the second is 4N")
    convergence_lr: float = field(0.05, "Adam learning rate of the bandit convergence check's tabular policies")
    convergence_tolerance: float = field(0.05, "total variation to π*(r̂) the policies must be within after N steps; after "
                                               "T steps the tolerance is this·N/T for full-batch DPO (the O(1/T) rate of "
                                               "gradient methods) and this·√(N/T) for sampled PPO (stochastic approximation's)")
    convergence_ppo_batch: int = field(64, "responses sampled per context per iteration by the bandit check's PPO "
                                           "(the grid's PPO rollout batch, here per context)")
    convergence_control_shift: float = field(3.0, "the controls' y-dependent perturbation δ·g(x, y) moves π* by this many "
                                                  "tolerances (total variation, computed exactly); the learner must follow it")
    lemma2_bandit_shift: float = field(1.0, "std of the prompt-only shift f(x) ~ N(0, std²) per context of the bandit Lemma 2 "
                                            "check (sampled PPO with a global baseline against r̂ and r̂ + f(x))")
    # Lemma 2 is about the KL-regularised optimum, and the check is only worth running where the
    # policies move: of kl_coef 0.05, 0.1 and 0.2 on the raw gold reward, 0.2 is the strongest
    # penalty (the closest to its optimum in 40 iterations) whose r run still passes 1 nat of KL
    # (`python -m benchmarks.lemma2_regimes`; docs/checks.md).
    lemma2_kl_coef: float = field(0.2, "kl_coef of the three PPO runs of the empirical Lemma 2 check (on the raw gold reward)")
    lemma2_iterations: int = field(40, "PPO iterations of each of those runs")
    lemma2_lr: float = field(3e-4, "learning rate of those runs")
    lemma2_checkpoints: int = field(4, "evaluations along each run (the finding on PPO's speed under r and r + f(x))")
    lemma2_control_scale: float = field(10.0, "c of the negative control r + g(x, y) = f(x) + c·r (the reward scaled: the optimum moves)")
    lemma2_margin_fraction: float = field(0.2, "equivalence margins of the Lemma 2 check, as a fraction of the r run's effect: "
                                               "of its gold-reward gain over the SFT model, and of its KL (TOST, 5%)")
    spearman_completions: int = field(4, "completions per held-out prompt for the implicit-vs-gold Spearman correlation")
    spearman_threshold: float = field(0.1, "within-prompt Spearman correlation the implicit reward must exceed")
    label_temperatures: tuple[float, ...] = field((), "extra label temperatures at which a reward model is trained (accuracy vs Bayes ceiling)")

    def __post_init__(self) -> None:
        for name in ("convergence_beta", "convergence_pairs", "convergence_steps", "convergence_lr", "convergence_tolerance",
                     "convergence_ppo_batch", "convergence_control_shift", "lemma2_bandit_shift", "lemma2_kl_coef",
                     "lemma2_iterations", "lemma2_lr", "lemma2_checkpoints", "lemma2_margin_fraction", "spearman_completions"):
            positive(name, getattr(self, name))
        if self.lemma2_margin_fraction >= 1:
            raise ConfigError(f"lemma2_margin_fraction must be < 1 (a fraction of the effect), got {self.lemma2_margin_fraction}")
        if any(t < 0 for t in self.label_temperatures):
            raise ValueError(f"label_temperatures must be >= 0, got {self.label_temperatures}")


@dataclass(frozen=True)
class CheckResult:
    """One row. A check: ``passed`` says the property held, ``control_detected`` that its negative
    control failed it. A finding (``kind="finding"``): a measured number, with no tolerance or verdict."""

    check: str
    quantity: str
    value: float
    tolerance: float
    control_value: float
    passed: bool | None
    control_detected: bool | None
    kind: str = "check"
    step: float = math.nan

    @classmethod
    def within(cls, check: str, quantity: str, value: float, tolerance: float, control_value: float) -> "CheckResult":
        """A distance check: the value must be at most ``tolerance``; the control's must exceed it."""
        return cls(check, quantity, value, tolerance, control_value, bool(value <= tolerance), bool(control_value > tolerance))

    @classmethod
    def finding(cls, check: str, quantity: str, value: float, step: float = math.nan) -> "CheckResult":
        return cls(check, quantity, float(value), math.nan, math.nan, None, None, kind="finding", step=float(step))

    def row(self) -> dict:
        return {
            "kind": self.kind, "check": self.check, "quantity": self.quantity, "step": self.step, "value": self.value,
            "tolerance": self.tolerance, "passed": self.passed, "negative_control_detected": self.control_detected,
            "control_value": self.control_value,
        }



"""The reward-equivalence results of the DPO paper, checked in every run, each with a negative control.

Rewards that differ by a function f(x) of the prompt alone are equivalent: they induce the same
Bradley-Terry / Plackett-Luce preferences (Lemma 1) and the same KL-constrained optimal policy
(Lemma 2), and each class holds the reward β·log π(y|x)/π_ref(y|x) (Theorem 1). Every check
also runs on a perturbation g(x, y) that depends on y, which must be detected: a check that
cannot fail proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import pandas as pd
import torch

from reward.bradley_terry import bt_loss, bt_probability, pl_log_likelihood

from .configs import field, positive
from .evaluate import tost_equivalence, wilson_interval, within_prompt_spearman
from .losses import LOSSES
from .policy import derive_seed
from .tasks.bandit import BanditConfig, bandit_tables, exact_metrics, optimal_policy

COLUMNS = ["check", "quantity", "value", "tolerance", "passed", "negative_control_detected", "control_value"]


@dataclass(frozen=True)
class ChecksConfig:
    """The empirical checks (they train and sample; the exact ones always run)."""

    empirical: bool = field(False, "run checks 5-6: the DPO policies' implicit reward, and Lemma 2 with PPO against r, r + f(x), r + g(x, y)")
    # Lemma 2 is about the KL-regularised optimum: the PPO runs need a penalty strong enough that they
    # reach it. With kl_coef 0.1 and 60 iterations PPO is still climbing, and a prompt-only shift of
    # N(0, 1) slows it down (it is noise in the advantages a value head cannot learn); measured by
    # `python -m benchmarks.lemma2_regimes` (README, "Invariance checks").
    lemma2_kl_coef: float = field(1.0, "kl_coef of the three PPO runs of the empirical Lemma 2 check")
    lemma2_iterations: int = field(40, "PPO iterations of each of those runs")
    lemma2_lr: float = field(3e-4, "learning rate of those runs")
    lemma2_control_scale: float = field(10.0, "c of the negative control r + g(x, y) = f(x) + c·r (the reward scaled: the optimum moves)")
    tost_margin_reward: float = field(0.1, "equivalence margin on the gold reward (TOST, 5%)")
    tost_margin_kl: float = field(1.0, "equivalence margin on the KL in nats (TOST, 5%)")
    spearman_completions: int = field(4, "completions per held-out prompt for the implicit-vs-gold Spearman correlation")
    spearman_threshold: float = field(0.1, "within-prompt Spearman correlation the implicit reward must exceed")
    label_temperatures: tuple[float, ...] = field((), "extra label temperatures at which a reward model is trained (accuracy vs Bayes ceiling)")

    def __post_init__(self) -> None:
        for name in ("lemma2_kl_coef", "lemma2_iterations", "lemma2_lr", "tost_margin_reward", "tost_margin_kl", "spearman_completions"):
            positive(name, getattr(self, name))
        if any(t < 0 for t in self.label_temperatures):
            raise ValueError(f"label_temperatures must be >= 0, got {self.label_temperatures}")


@dataclass(frozen=True)
class CheckResult:
    """One check: ``passed`` says the property held; ``control_detected`` that its negative control failed."""

    check: str
    quantity: str
    value: float
    tolerance: float
    control_value: float
    passed: bool
    control_detected: bool

    @classmethod
    def within(cls, check: str, quantity: str, value: float, tolerance: float, control_value: float) -> "CheckResult":
        """An identity check: the difference must be at most ``tolerance``; the control's must exceed it."""
        return cls(check, quantity, value, tolerance, control_value, bool(value <= tolerance), bool(control_value > tolerance))

    def row(self) -> dict:
        return {
            "check": self.check, "quantity": self.quantity, "value": self.value, "tolerance": self.tolerance,
            "passed": bool(self.passed), "negative_control_detected": bool(self.control_detected),
            "control_value": self.control_value,
        }


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def lemma1_preferences(r_chosen: np.ndarray, r_rejected: np.ndarray, prompt_ids: np.ndarray, rng: np.random.Generator) -> list[CheckResult]:
    """Lemma 1: BT probabilities, BT loss and PL likelihoods of r and r + f(x) agree.

    ``r_chosen``/``r_rejected`` are a reward model's scores of held-out pairs; ``prompt_ids``
    groups the pairs by prompt so that f is one value per prompt.
    """
    n_prompts = int(prompt_ids.max()) + 1
    f = rng.normal(0, 5, n_prompts)[prompt_ids]  # one shift per prompt
    g_w, g_l = rng.normal(0, 1, len(r_chosen)), rng.normal(0, 1, len(r_chosen))  # depends on y
    r_w, r_l = torch.tensor(r_chosen, dtype=torch.float64), torch.tensor(r_rejected, dtype=torch.float64)
    shift = torch.tensor(f)
    gw, gl = torch.tensor(g_w), torch.tensor(g_l)
    p = bt_probability(r_w, r_l)
    results = [
        CheckResult.within("lemma1_bt", "max |P_r(y_w≻y_l) − P_{r+f}(y_w≻y_l)|",
                    _max_abs(p, bt_probability(r_w + shift, r_l + shift)), 1e-9,
                    _max_abs(p, bt_probability(r_w + shift + gw, r_l + shift + gl))),
        CheckResult.within("lemma1_bt_loss", "|BT loss(r) − BT loss(r+f)|",
                    abs(bt_loss(r_w, r_l).mean().item() - bt_loss(r_w + shift, r_l + shift).mean().item()), 1e-9,
                    abs(bt_loss(r_w, r_l).mean().item() - bt_loss(r_w + shift + gw, r_l + shift + gl).mean().item())),
    ]
    # Plackett-Luce over K = 3: the pair plus a third response scored by the mean of the two.
    third = (r_w + r_l) / 2 + torch.tensor(rng.normal(0, 1, len(r_chosen)))
    ranked = torch.stack([r_w, r_l, third], dim=1)
    shifted = ranked + shift[:, None]
    perturbed = shifted + torch.tensor(rng.normal(0, 1, ranked.shape))
    base = pl_log_likelihood(ranked)
    results.append(CheckResult.within("lemma1_pl", "max |log P_PL(r) − log P_PL(r+f)| (K=3)",
                               _max_abs(base, pl_log_likelihood(shifted)), 1e-9, _max_abs(base, pl_log_likelihood(perturbed))))
    return results


def lemma2_and_theorem1(ref_probs: np.ndarray, rewards: np.ndarray, betas: list[float], rng: np.random.Generator) -> list[CheckResult]:
    """Lemma 2 (same optimum, KL and reward under r + f(x)) and Theorem 1 (β log π*/π_ref − r = −β log Z(x))."""
    f = rng.normal(0, 5, (rewards.shape[0], 1))
    g = rng.normal(0, 1, rewards.shape)
    results = []
    for beta in betas:
        opt = optimal_policy(ref_probs, rewards, beta)
        shifted = optimal_policy(ref_probs, rewards + f, beta)
        perturbed = optimal_policy(ref_probs, rewards + f + g, beta)
        results.append(CheckResult.within(f"lemma2_policy[β={beta:g}]", "max |π*_r − π*_{r+f}|", _max_abs(opt, shifted), 1e-9,
                                   _max_abs(opt, perturbed)))
        m, ms, mp = (exact_metrics(p, ref_probs, rewards) for p in (opt, shifted, perturbed))
        results.append(CheckResult.within(f"lemma2_kl_reward[β={beta:g}]", "max |Δ exact KL|, |Δ exact reward|",
                                   max(abs(m["kl"] - ms["kl"]), abs(m["gold_reward"] - ms["gold_reward"])), 1e-9,
                                   max(abs(m["kl"] - mp["kl"]), abs(m["gold_reward"] - mp["gold_reward"]))))
        with np.errstate(divide="ignore"):
            implied = beta * (np.log(opt) - np.log(ref_probs)) - rewards
            implied_control = beta * (np.log(perturbed) - np.log(ref_probs)) - rewards
        spread = float(np.max(implied.max(1) - implied.min(1)))
        control_spread = float(np.max(implied_control.max(1) - implied_control.min(1)))
        results.append(CheckResult.within(f"theorem1[β={beta:g}]", "max_x spread_y of β·log π*/π_ref − r (= −β log Z(x))",
                                   spread, 1e-9, control_spread))
    return results


def loss_invariance(
    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, prompt_ids: np.ndarray, beta: float, rng: np.random.Generator,
    losses: list[str],
) -> list[CheckResult]:
    """The named DPO-family losses and their gradients are unchanged when both implicit rewards of a pair move by f(x)."""
    n_prompts = int(prompt_ids.max()) + 1
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    ref_c, ref_r = ref_chosen.double(), ref_rejected.double()
    pol_c = ref_c + torch.randn(ref_c.shape, generator=gen, dtype=torch.float64)
    pol_r = ref_r + torch.randn(ref_r.shape, generator=gen, dtype=torch.float64)
    f = torch.tensor(rng.normal(0, 3, n_prompts)[prompt_ids]) / beta  # implicit reward β·(π − ref) moves by f
    g = torch.tensor(rng.normal(0, 1, len(ref_c))) / beta
    results = []
    for name in losses:
        spec = LOSSES[name]

        def loss_and_grad(shift_c: torch.Tensor, shift_r: torch.Tensor) -> tuple[float, torch.Tensor]:
            c = (pol_c + shift_c).requires_grad_(True)
            r = (pol_r + shift_r).requires_grad_(True)
            loss = spec.fn(c, r, ref_c, ref_r, beta=beta, params=spec.params()).mean()
            loss.backward()
            return loss.item(), torch.cat([c.grad, r.grad])

        base, grad = loss_and_grad(torch.zeros_like(f), torch.zeros_like(f))
        shifted, grad_s = loss_and_grad(f, f)
        control, grad_c = loss_and_grad(f + g, f)
        results.append(CheckResult.within(f"loss_invariance[{name}]", "max(|Δ loss|, max |Δ gradient|) under f(x)",
                                   max(abs(base - shifted), _max_abs(grad, grad_s)), 1e-9,
                                   max(abs(base - control), _max_abs(grad, grad_c))))
    return results


def implicit_reward_checks(
    label: str, beta: float, implicit_chosen: np.ndarray, implicit_rejected: np.ndarray,
    prompt_ids: np.ndarray, implicit: np.ndarray, gold: np.ndarray, threshold: float,
) -> list[CheckResult]:
    """Check 5: the trained DPO policy's implicit reward β·log π/π_ref ranks held-out pairs better than
    chance, and tracks the gold reward within prompts (prompt means removed: exactly removing f(x)).

    Control: the y-dependent perturbation g(x, y) = −2·β·log π/π_ref, which turns the implicit
    reward around; the same checks on it must fail.
    """
    n = len(implicit_chosen)

    def accuracy_of(c: np.ndarray, r: np.ndarray) -> float:
        return float(((c > r) + 0.5 * (c == r)).mean())

    accuracy = accuracy_of(implicit_chosen, implicit_rejected)
    low, _ = wilson_interval(accuracy, n)
    control = accuracy_of(-implicit_chosen, -implicit_rejected)
    control_low, _ = wilson_interval(control, n)
    rho = within_prompt_spearman(prompt_ids, implicit, gold)
    rho_control = within_prompt_spearman(prompt_ids, -implicit, gold)
    return [
        CheckResult(f"implicit_reward_accuracy[{label}]",
                    f"held-out pairwise accuracy of β·log π/π_ref (β={beta:g}); tolerance: the 95% lower bound must exceed it",
                    accuracy, 0.5, control, bool(low > 0.5), not bool(control_low > 0.5)),
        CheckResult(f"implicit_reward_spearman[{label}]",
                    "within-prompt Spearman(β·log π/π_ref, gold reward) on reference samples; must exceed the tolerance",
                    float(rho), threshold, float(rho_control), bool(rho > threshold), not bool(rho_control > threshold)),
    ]


def lemma2_empirical(results: dict[str, pd.DataFrame], margin_reward: float, margin_kl: float) -> list[CheckResult]:
    """Check 6: PPO against r and against r + f(x) ends at equivalent gold reward and KL (TOST, 5%),
    while PPO against r + f(x) + g(x, y) does not (g = (c − 1)·r: the reward scaled by c, which moves the
    optimum as dividing kl_coef by c would).
    ``results`` maps "r", "r+f", "r+g" to per-prompt frames. The three policies are evaluated on the
    same prompts with the same random numbers, so the tests are paired, prompt by prompt: a
    Welch test would count the sampling noise they share twice."""
    def kl_terms(frame: pd.DataFrame) -> np.ndarray:
        return (frame["policy_logp"] - frame["ref_logp"]).to_numpy()

    base, shifted, perturbed = results["r"], results["r+f"], results["r+g"]
    for name, frame in (("r+f", shifted), ("r+g", perturbed)):
        if not np.array_equal(base["prompt"].to_numpy(), frame["prompt"].to_numpy()):
            raise ValueError(f"lemma2 PPO: the {name} run was evaluated on other prompts than the r run, "
                             "or in another order; the paired tests need the same prompts in the same order")
    out = []
    for quantity, get, margin in (("gold_reward", lambda f: f["gold_reward"].to_numpy(), margin_reward), ("kl", kl_terms, margin_kl)):
        p = tost_equivalence(get(shifted), get(base), margin, paired=True)
        p_control = tost_equivalence(get(perturbed), get(base), margin, paired=True)
        out.append(CheckResult(
            f"lemma2_ppo[{quantity}]",
            f"paired TOST p-value that PPO against r and r+f(x) reach the same {quantity} within ±{margin:g} (must be < tolerance)",
            p, 0.05, p_control, bool(p < 0.05), bool(p_control >= 0.05),
        ))
    return out


def prompt_shift(prompts, seed: int, scale: float = 1.0) -> np.ndarray:
    """f(x): one N(0, scale²) value per distinct prompt, stable across processes."""
    return np.array([np.random.default_rng(derive_seed(seed, "f(x)", p)).normal(0, scale) for p in prompts])


def run_invariance_checks(bench, stages: dict, cells: list | None = None) -> pd.DataFrame:
    """Every check this run's data supports, as rows of ``invariance.parquet``."""
    from .stages import _collate_texts, _pairs_frame, evaluate_reward_model, load_tensors  # noqa: PLC0415

    config = bench.config
    rng = np.random.default_rng(derive_seed(config.seed, "invariance"))
    results: list[CheckResult] = []
    task = bench.task(stages["task"])
    prefs = stages.get("preferences")
    rm_stage = stages.get("reward_model")
    if prefs is not None and rm_stage is not None:
        heldout = _pairs_frame(prefs, "heldout")
        if len(heldout):
            from reward.train import PairTensors  # noqa: PLC0415

            batch_w = _collate_texts(task, heldout["prompt"], heldout["chosen"])
            batch_l = _collate_texts(task, heldout["prompt"], heldout["rejected"])
            r_w, r_l = evaluate_reward_model(bench.reward_model(rm_stage, stages["sft"]),
                                             PairTensors(batch_w.input_ids, batch_w.attention_mask, batch_l.input_ids, batch_l.attention_mask),
                                             task.pad_id)
            prompt_ids = pd.factorize(heldout["prompt"])[0]
            results += lemma1_preferences(r_w.double().numpy(), r_l.double().numpy(), prompt_ids, rng)
    # Lemma 2 and Theorem 1 are exact on a tabular problem: the run's own bandit, or the bandit config's tables.
    if task.exact:
        ref_probs, rewards = task.response_probs(bench.reference(stages["sft"])), task.rewards
    else:
        bandit: BanditConfig = config.bandit
        rewards, logits = bandit_tables(bandit)
        ref_probs = np.exp(logits - logits.max(1, keepdims=True))
        ref_probs /= ref_probs.sum(1, keepdims=True)
    results += lemma2_and_theorem1(ref_probs, rewards, [0.1, 1.0], rng)
    if stages.get("ref_logps") is not None:
        logps = load_tensors(stages["ref_logps"].path / "ref_logps.safetensors")
        train = _pairs_frame(prefs, "train")
        prompt_ids = pd.factorize(train["prompt"])[0]
        # DPO itself, and every pairwise reference-based loss the grid trains with.
        used = {"dpo"} | {c.method for c in config.cells()}
        losses = [n for n, spec in LOSSES.items() if n in used and not spec.listwise and not spec.reference_free]
        results += loss_invariance(logps["chosen"], logps["rejected"], prompt_ids, 0.1, rng, losses)
    # Checks 5-6 compare against a gold reward: a task judged only by a proxy has none to compare with.
    if config.checks.empirical and not task.exact and task.has_gold:
        from .stages import implicit_reward_data, lemma2_ppo  # noqa: PLC0415

        for cell, stage in cells or []:
            if cell.method == "dpo" and (stage.path / "policy").exists():
                data = implicit_reward_data(bench, stages, cell, stage)
                results += implicit_reward_checks(cell.label, cell.strength_value, *data, config.checks.spearman_threshold)
        results += lemma2_empirical(lemma2_ppo(bench, stages), config.checks.tost_margin_reward, config.checks.tost_margin_kl)
    return pd.DataFrame([r.row() for r in results], columns=COLUMNS)

"""The DPO family as pure functions over sequence log-probabilities, in a registry.

Every pairwise loss has the signature

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
       beta, chosen_lengths=None, rejected_lengths=None, params) -> Tensor (B,)

where each log-prob is (B,), the sum of token log-probs over the completion (prompt masked), and
the result is the per-example loss (the trainer takes the mean). Listwise losses take
(policy_logps (B, K), ref_logps (B, K), *, beta, params), columns ranked best first.

Most losses are functions of the log-ratio margin (DPO paper, Eq. 7)

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),

so adding any f(x) to both implicit rewards of a pair changes nothing (Theorem 1's equivalence).

Adding a loss: write the function, decorate it with `register_loss(...)`. The tests are
parametrised over `LOSSES`, so a new entry is tested the moment it exists.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from reward.bradley_terry import pl_log_likelihood

from .configs import field

__all__ = [
    "LossSpec",
    "LOSSES",
    "UnknownLossError",
    "register_loss",
    "get_loss",
    "implicit_rewards",
    "preference_margin",
    "NoParams",
    "CDPOParams",
    "RobustParams",
    "SimPOParams",
]


# ---------------------------------------------------------------------------------------------
# Hyper-parameter dataclasses (one per loss that has extra knobs)
# ---------------------------------------------------------------------------------------------


def _require_finite(obj: object) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{type(obj).__name__}.{f.name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class NoParams:
    """For losses whose only hyper-parameter is beta."""


@dataclass(frozen=True)
class CDPOParams:
    """Conservative DPO."""

    epsilon: float = field(0.1, "label-smoothing rate: the assumed probability that a label is flipped, in [0, 0.5]")

    def __post_init__(self) -> None:
        _require_finite(self)
        if not 0.0 <= self.epsilon <= 0.5:
            raise ValueError(f"CDPOParams.epsilon must be in [0, 0.5], got {self.epsilon}")


@dataclass(frozen=True)
class RobustParams:
    """Robust DPO (rDPO)."""

    epsilon: float = field(0.1, "known label-flip rate, in [0, 0.5); the loss divides by 1 - 2*epsilon")

    def __post_init__(self) -> None:
        _require_finite(self)
        if not 0.0 <= self.epsilon < 0.5:
            raise ValueError(f"RobustParams.epsilon must be in [0, 0.5), got {self.epsilon}")


@dataclass(frozen=True)
class SimPOParams:
    """SimPO."""

    gamma: float = field(0.5, "target reward margin γ (>= 0) subtracted inside the sigmoid (SimPO Eq. 6)")

    def __post_init__(self) -> None:
        _require_finite(self)
        if self.gamma < 0:
            raise ValueError(f"SimPOParams.gamma must be >= 0, got {self.gamma}")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A registered preference loss and what a trainer needs to know to call it."""

    name: str
    fn: Callable[..., torch.Tensor]
    description: str
    """One line: what the loss does."""
    citation: str
    """Paper and equation number."""
    params: type = NoParams
    """Frozen dataclass type of the loss's extra hyper-parameters; `params()` gives the defaults."""
    listwise: bool = False
    """True: fn(policy_logps (B, K), ref_logps (B, K), ...); False: the four-tensor pairwise form."""
    reference_free: bool = False
    """True: the reference log-probs are ignored (the trainer may skip the reference forward)."""

    def make_params(self, **overrides: float) -> object:
        """Build (and validate) this loss's params from keyword overrides of the defaults."""
        known = {f.name for f in fields(self.params)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(
                f"loss {self.name!r} has no parameter(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return self.params(**overrides)


class UnknownLossError(KeyError, ValueError):
    """Raised by get_loss for a name that is not registered (a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    description: str,
    citation: str,
    params: type = NoParams,
    listwise: bool = False,
    reference_free: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register `fn` under `name` in LOSSES and return it unchanged."""

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(
            name=name,
            fn=fn,
            description=description,
            citation=citation,
            params=params,
            listwise=listwise,
            reference_free=reference_free,
        )
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The LossSpec registered under `name`; UnknownLossError lists the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (DPO paper, Theorem 1 / Eq. 5,
    up to the partition term beta * log Z(x), which cancels in every comparison). Any shape."""
    return beta * (policy_logps - ref_logps)


def preference_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin; all (B,) -> (B,)."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, numbers.Real) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_params(params: object, expected: type) -> None:
    if not isinstance(params, expected):
        raise TypeError(f"params must be a {expected.__name__}, got {type(params).__name__}")


def _check_pairwise(*logps: torch.Tensor) -> None:
    shape = logps[0].shape
    if len(shape) != 1:
        raise ValueError(f"pairwise log-probs must have shape (B,), got {tuple(shape)}")
    for t in logps[1:]:
        if t.shape != shape:
            raise ValueError(f"pairwise log-probs must share shape (B,), got {tuple(shape)} and {tuple(t.shape)}")


def _checked_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    _check_beta(beta)
    _check_pairwise(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return preference_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


# ---------------------------------------------------------------------------------------------
# Pairwise losses
# ---------------------------------------------------------------------------------------------


@register_loss(
    "dpo",
    description="Bradley-Terry NLL of the implicit reward margin: -log sigma(beta*h).",
    citation="Rafailov et al. 2023, Direct Preference Optimization, Eq. 7",
)
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    params: NoParams = NoParams(),
) -> torch.Tensor:
    """-log sigma(beta * h); inputs (B,) sequence log-probs, output (B,). Lengths are unused."""
    _check_params(params, NoParams)
    h = _checked_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return -F.logsigmoid(beta * h)


@register_loss(
    "cdpo",
    description="Conservative DPO: DPO with labels smoothed towards a flip rate epsilon.",
    citation="Mitchell 2023, A note on DPO with noisy preferences & relationship to IPO (cDPO loss)",
    params=CDPOParams,
)
def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    params: CDPOParams = CDPOParams(),
) -> torch.Tensor:
    """-(1-eps) log sigma(beta*h) - eps log sigma(-beta*h); (B,) -> (B,). eps = 0 is DPO.

    Unlike DPO its minimiser is finite (beta*h = log((1-eps)/eps)), so it does not push
    probabilities to 0/1 under deterministic labels.
    """
    _check_params(params, CDPOParams)
    h = _checked_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    eps = params.epsilon
    return -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register_loss(
    "robust",
    description="rDPO: unbiased DPO loss under a known label-flip rate epsilon.",
    citation="Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback, the de-biased rDPO loss (Sec. 3)",
    params=RobustParams,
)
def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    params: RobustParams = RobustParams(),
) -> torch.Tensor:
    """[(1-eps)(-log sigma(beta*h)) - eps(-log sigma(-beta*h))] / (1 - 2 eps); (B,) -> (B,).

    Its expectation over flipped labels is the clean DPO loss; per example it can be negative.
    """
    _check_params(params, RobustParams)
    h = _checked_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    eps = params.epsilon
    return ((1.0 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)


@register_loss(
    "ipo",
    description="IPO: squared regression of the log-ratio margin onto 1/(2*beta).",
    citation="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences, Eq. 17",
)
def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    params: NoParams = NoParams(),
) -> torch.Tensor:
    """(h - 1/(2 beta))^2; (B,) -> (B,). Here beta plays the role of IPO's tau: the minimum is at
    a finite margin h = 1/(2 beta), which is how IPO avoids DPO's drift to 0/1 probabilities."""
    _check_params(params, NoParams)
    h = _checked_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return (h - 1.0 / (2.0 * beta)) ** 2


@register_loss(
    "hinge",
    description="SLiC-style hinge on the scaled margin: max(0, 1 - beta*h).",
    citation="Zhao et al. 2023, SLiC-HF, rank-calibration loss with margin 1; Liu et al. 2024, RSO, hinge loss on beta-scaled log-ratios",
)
def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    params: NoParams = NoParams(),
) -> torch.Tensor:
    """max(0, 1 - beta*h); (B,) -> (B,). Zero (and gradient-free) once beta*h >= 1."""
    _check_params(params, NoParams)
    h = _checked_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return torch.relu(1.0 - beta * h)


@register_loss(
    "simpo",
    description="SimPO: reference-free, length-normalised log-prob margin with a target margin gamma.",
    citation="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward, Eq. 6",
    params=SimPOParams,
    reference_free=True,
)
def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    beta: float,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    params: SimPOParams = SimPOParams(),
) -> torch.Tensor:
    """-log sigma(beta*pi_c/|y_c| - beta*pi_r/|y_r| - gamma); (B,) -> (B,).

    chosen_lengths, rejected_lengths: (B,) completion token counts (> 0), required.
    The reference log-probs are accepted for a uniform call signature and ignored.
    """
    _check_params(params, SimPOParams)
    _check_beta(beta)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            "simpo needs chosen_lengths and rejected_lengths (completion token counts) "
            "to length-normalise the log-probs"
        )
    chosen_lengths = torch.as_tensor(chosen_lengths, device=policy_chosen_logps.device)
    rejected_lengths = torch.as_tensor(rejected_lengths, device=policy_rejected_logps.device)
    _check_pairwise(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("simpo lengths must be > 0")
    dtype = policy_chosen_logps.dtype
    logits = (
        beta * policy_chosen_logps / chosen_lengths.to(dtype)
        - beta * policy_rejected_logps / rejected_lengths.to(dtype)
        - params.gamma
    )
    return -F.logsigmoid(logits)


# ---------------------------------------------------------------------------------------------
# Listwise losses
# ---------------------------------------------------------------------------------------------


@register_loss(
    "dpo_pl",
    description="Plackett-Luce DPO over K ranked responses; K = 2 is DPO.",
    citation="Rafailov et al. 2023, Direct Preference Optimization, Appendix A.3, Eq. 18",
    listwise=True,
)
def dpo_pl_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float,
    params: NoParams = NoParams(),
) -> torch.Tensor:
    """-log PL(1 > 2 > ... > K | beta*(pi - ref)); policy_logps, ref_logps (B, K) best first -> (B,)."""
    _check_params(params, NoParams)
    _check_beta(beta)
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape:
        raise ValueError(
            "listwise log-probs must both have shape (B, K), got "
            f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        )
    return -pl_log_likelihood(implicit_rewards(policy_logps, ref_logps, beta))

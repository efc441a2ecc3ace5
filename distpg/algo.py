"""The math of REINFORCE with a baseline, as pure tensor functions (no Ray, no model).

Objective J(θ) = E_{τ∼πθ}[r(τ)]. With B sampled completions τ_i and baselines b_i,

    g = 1/B Σ_i (r_i − b_i) Σ_t ∇θ log πθ(a_{i,t} | s_{i,t})

is an unbiased estimate of ∇J whenever b_i does not depend on τ_i (E[b ∇ log π(τ)] = b ∇ Σ π = 0).
`pg_loss` is the surrogate whose gradient is g ("sequence-sum" aggregation).

Baselines, each unbiased:
- none:  b = 0.
- ema:   b = running mean of the rewards of *earlier* batches (so independent of this batch's samples).
- group: b_i = mean reward of the other G−1 samples of the same prompt (leave-one-out); the samples of a
         group are drawn independently, so b_i is independent of τ_i.
Samples whose reward failed (`ok` False) get no advantage and are left out of every baseline.

Shapes: P prompts, G samples per prompt (group_size), B = P·G samples, T completion tokens.
"""

from __future__ import annotations

import torch

BASELINES = ("none", "ema", "group")


def advantages(
    rewards: torch.Tensor, ok: torch.Tensor, baseline: str, ema_value: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample advantages r − b.

    Args:
        rewards: (P, G) float rewards; values where ok is False are ignored.
        ok: (P, G) bool, True where the reward is valid.
        baseline: "none", "ema" or "group".
        ema_value: the running mean of earlier batches' rewards for "ema" (None before the first batch,
            which then uses b = 0).
    Returns:
        advantages (P, G) float32, 0 where the sample does not count, and
        valid (P, G) bool: the samples that carry gradient (ok, and for "group" with ≥ 1 other ok sample).
    """
    r = torch.where(ok, rewards.float(), 0.0)
    if baseline == "none":
        b, valid = torch.zeros_like(r), ok
    elif baseline == "ema":
        b, valid = torch.full_like(r, 0.0 if ema_value is None else float(ema_value)), ok
    elif baseline == "group":
        n_ok = ok.sum(dim=1, keepdim=True)  # (P, 1)
        others = (r.sum(dim=1, keepdim=True) - r) / (n_ok - 1).clamp(min=1)
        b, valid = others, ok & (n_ok >= 2)
    else:
        raise ValueError(f"algo.baseline={baseline!r}: allowed are {', '.join(BASELINES)}")
    return torch.where(valid, r - b, 0.0), valid


def ema_update(ema_value: float | None, batch_mean: float, decay: float) -> float:
    """Running mean of batch rewards; the first batch sets it."""
    if ema_value is None:
        return float(batch_mean)
    return decay * ema_value + (1.0 - decay) * float(batch_mean)


def pg_loss(logprobs: torch.Tensor, response_mask: torch.Tensor, adv: torch.Tensor, num_samples: int) -> torch.Tensor:
    """REINFORCE surrogate with sequence-sum aggregation: −1/B Σ_i A_i Σ_t log π(a_{i,t}).

    Args:
        logprobs: (B, T) log πθ of the taken tokens (differentiable).
        response_mask: (B, T) bool/float, 1 on completion tokens that count.
        adv: (B,) advantages (no gradient flows through them).
        num_samples: B in the 1/B normaliser (the whole batch, also when called per micro-batch).
    Returns:
        scalar loss whose gradient is −g.
    """
    # where, not multiply: a masked position may hold -inf, and -inf * 0 would be NaN
    seq_logprob = torch.where(response_mask.bool(), logprobs, 0.0).sum(dim=1)  # (B,)
    return -(adv.detach() * seq_logprob).sum() / num_samples


def entropy(logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits) over the response tokens: (B, T, V), (B, T) -> scalar."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # 0 · log 0 = 0: a token of probability 0 (logit -inf) must add 0, not 0 · -inf = NaN
    ent = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)  # (B, T)
    m = response_mask.float()
    return (ent * m).sum() / m.sum().clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of the k3 estimator of KL(ref ‖ π) from samples of ref:
    (ρ − 1) − log ρ with ρ = π / ref. Non-negative, zero when the two agree."""
    log_ratio = (logp - ref_logp).float()
    k3 = log_ratio.exp() - 1.0 - log_ratio
    m = response_mask.float()
    return (k3 * m).sum() / m.sum().clamp(min=1)


OFF_POLICY = ("truncated", "clipped", "none")


def off_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    adv: torch.Tensor,
    stale: torch.Tensor,
    num_samples: int,
    mode: str = "truncated",
    cap: float = 1.0,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-gradient loss for samples drawn from an older policy μ (asynchronous training).

    With per-token ratios ρ_t = πθ(a_t) / μ(a_t) (μ from the sampler's stored log-probabilities):
    - truncated: −1/B Σ_i A_i Σ_t min(ρ_t, cap) log πθ(a_t), the ratio detached: truncated importance
      sampling as in V-trace's ρ̄ (cap 1 never up-weights a token, which keeps the variance bounded).
    - clipped:   −1/B Σ_i Σ_t min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε) A_i), PPO's clipped surrogate.
    - none:      the on-policy loss, ignoring the lag (biased).
    Fresh samples (`stale` False: drawn with the learner's current weights) always use the plain
    REINFORCE term, so a batch without stale samples gives exactly `pg_loss`.

    Args:
        logprobs, old_logprobs: (B, T) log πθ (differentiable) and log μ.
        response_mask: (B, T) tokens that count.
        adv: (B,) advantages.
        stale: (B,) bool, True where the sample's policy version is older than the learner's.
        num_samples: B in the 1/B normaliser.
    Returns:
        (loss, corrected) where corrected is the number of response tokens of stale samples whose ratio
        was truncated (ρ > cap) or clipped (outside [1 − ε, 1 + ε] on the side that binds).
    """
    if mode not in OFF_POLICY:
        raise ValueError(f"algo.off_policy={mode!r}: allowed are {', '.join(OFF_POLICY)}")
    if mode == "none" or not bool(stale.any()):
        return pg_loss(logprobs, response_mask, adv, num_samples), torch.zeros(())
    mask = response_mask.bool()
    stale_tok = mask & stale[:, None]
    log_ratio = torch.where(stale_tok, logprobs - old_logprobs, 0.0)
    ratio = log_ratio.exp()
    a = adv.detach()[:, None]
    logp = torch.where(mask, logprobs, 0.0)
    if mode == "truncated":
        coef = torch.where(stale_tok, ratio.detach().clamp(max=cap), 1.0)
        loss = -(a * coef * logp).sum() / num_samples
        corrected = (stale_tok & (ratio > cap)).sum()
    else:
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        surrogate = torch.minimum(ratio * a, clipped * a)
        # fresh tokens: A log π (gradient A ∇log π); stale tokens: the clipped surrogate (gradient ρ A ∇log π)
        per_token = torch.where(stale_tok, surrogate, a * logp)
        loss = -torch.where(mask, per_token, 0.0).sum() / num_samples
        corrected = (stale_tok & ((ratio * a) != surrogate)).sum()
    return loss, corrected

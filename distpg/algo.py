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
- value: b_{i,t} = V(s_{i,t}), a learned value of the prefix before token t (per-token advantages); V
         depends only on the prefix, so E[V(s_t) ∇ log π(a_t | s_t)] = 0.
Samples whose reward failed (`ok` False) get no advantage and are left out of every baseline.

Optional terms:
- KL to a frozen reference policy π_ref, estimated per token by k1 = log π − log π_ref or
  k3 = ρ − 1 − log ρ (ρ = π_ref / π). Both have expectation KL(π‖π_ref) under π. Its exact gradient is
  E[K(τ) ∇ log π(τ)] + E[∇K(τ)] with K = Σ_t k_t: the first part enters through the rewards
  (r − β K, "score function"), the second through `kl_pathwise` in the loss.
- entropy bonus: − coef · mean per-token entropy (the usual per-state bonus, not the gradient of the
  sequence entropy).
- whitening: advantages divided by the reward std of the batch or the group: the common GRPO trick;
  it rescales each group's gradient by a random factor and is biased, so it is off by default. With a KL
  penalty the std is the rewards' (not that of r − β K) and both parts of the KL term are rescaled with it.
- aggregation: `seq_sum` (−1/B Σ_i Σ_t A log π: the unbiased estimator of ∇J) or `token_mean`
  (−Σ_i Σ_t A log π / Σ_i T_i, as the group-relative methods use: length-weighted, biased).

Shapes: P prompts, G samples per prompt (group_size), B = P·G samples, T completion tokens.
"""

from __future__ import annotations

import math

import torch

BASELINES = ("none", "ema", "group", "value")


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
    elif baseline == "value":  # per-token: the caller subtracts V(s_t) with `value_advantages`
        b, valid = torch.zeros_like(r), ok
    else:
        raise ValueError(f"algo.baseline={baseline!r}: allowed are {', '.join(BASELINES)}")
    return torch.where(valid, r - b, 0.0), valid


def lr_factor(update: int, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The learning rate of update `update` (1, 2, ...; a run has `total_steps`) as a fraction of the peak.

    Transformers' schedulers as TRL steps them (`scheduler.step()` after each optimizer step), so update k takes
    their factor at step s = k - 1: s / warmup_steps while s < warmup_steps (the first update of a warmup has
    rate 0), then 1 (constant), or a decay over the progress p = (s - warmup_steps) / (total_steps -
    warmup_steps) from 1 to `min_ratio`: linear, 1 - p, or cosine, (1 + cos(pi p)) / 2, scaled into
    [min_ratio, 1] as transformers' cosine schedule with a minimum rate does. Past total_steps (a resumed run
    that raised run.steps takes the new total) it stays at `min_ratio`.
    """
    s = update - 1
    if s < warmup_steps:
        return s / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def ema_update(ema_value: float | None, batch_mean: float, decay: float) -> float:
    """Running mean of batch rewards; the first batch sets it."""
    if ema_value is None:
        return float(batch_mean)
    return decay * ema_value + (1.0 - decay) * float(batch_mean)


AGGREGATIONS = ("seq_sum", "token_mean")


def pg_loss(logprobs: torch.Tensor, response_mask: torch.Tensor, adv: torch.Tensor, num_samples: int,
            agg: str = "seq_sum", num_tokens: int | None = None) -> torch.Tensor:
    """REINFORCE surrogate: −1/B Σ_i Σ_t A_{i,t} log π(a_{i,t}) (seq_sum) or −Σ_i Σ_t A log π / N_tokens
    (token_mean).

    Args:
        logprobs: (B, T) log πθ of the taken tokens (differentiable).
        response_mask: (B, T) bool/float, 1 on completion tokens that count.
        adv: (B,) per-sample or (B, T) per-token advantages (no gradient flows through them).
        num_samples: B in the 1/B normaliser (the whole batch, also when called per micro-batch).
        agg: "seq_sum" or "token_mean".
        num_tokens: for token_mean, the response tokens of the whole batch.
    Returns:
        scalar loss whose gradient is −g.
    """
    mask = response_mask.bool()
    # where, not multiply: a masked position may hold -inf, and -inf * 0 would be NaN
    logp = torch.where(mask, logprobs, 0.0)
    adv = adv.detach()
    if adv.dim() == 1:
        total = (adv * logp.sum(dim=1)).sum()
    else:
        total = torch.where(mask, adv * logp, 0.0).sum()
    return -total / _normaliser(agg, num_samples, num_tokens)


def _normaliser(agg: str, num_samples: int, num_tokens: int | None) -> float:
    if agg == "seq_sum":
        return num_samples
    if agg == "token_mean":
        assert num_tokens is not None, "token_mean needs num_tokens"
        return max(1, num_tokens)
    raise ValueError(f"algo.loss_agg={agg!r}: allowed are {', '.join(AGGREGATIONS)}")


def value_advantages(returns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-token advantages r_i − V(s_{i,t}): (B,), (B, T) -> (B, T); V gets no gradient from here."""
    return returns[:, None] - values.detach()


KL_ESTIMATORS = ("k1", "k3")
# log-ratios are clamped to [-20, 20] before exp (veRL's bound): e^88.7 overflows float32, and an infinite ratio
# makes a loss of -inf or inf and a NaN gradient (0 · inf in the backward pass even where a clamp after the exp
# cuts the value)
LOG_RATIO_BOUND = 20.0
K3_BOUND = 10.0  # the per-token k3 is clamped to [-10, 10], as veRL's low_var_kl


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π: (B, T), (B, T) -> (B, T).

    k1 = log π − log π_ref; k3 = ρ − 1 − log ρ with ρ = π_ref / π (non-negative). Both have expectation
    KL(π(·|s)‖π_ref(·|s)) at each state. Differentiable in `logprobs`.

    k3 is bounded as veRL's low_var_kl bounds it: log ρ clamped to [−20, 20], then k3 to [−10, 10]. The clamp
    binds where ρ > 13.6 or ρ < 1.7e-5 (log π − log π_ref < −2.6 or > 11.0); there the token's k3 is 10 and
    its gradient 0 (elsewhere ∂k3/∂log π = 1 − ρ), so the estimate is biased low on such tokens and they add
    nothing to the pathwise part, but it stays finite (unclamped, log ρ = 100 gives inf and a NaN gradient).
    k1 is left unbounded: it is linear in log π, finite wherever the log-probabilities are.
    """
    log_ratio = ref_logprobs - logprobs  # log ρ
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return (log_ratio.exp() - 1.0 - log_ratio).clamp(-K3_BOUND, K3_BOUND)
    raise ValueError(f"algo.kl_estimator={estimator!r}: allowed are {', '.join(KL_ESTIMATORS)}")


def kl_pathwise(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor, estimator: str,
                num_samples: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The E[∇K] part of the KL gradient as a loss: 1/B Σ_i Σ_t k_t (differentiated through log π).
    Add β times this to the loss and subtract β·K_i (detached) from the rewards for the exact gradient.
    `weight`: (B,) factors w_i of the samples' terms (the whitening's 1 / std, which scales the score-function
    part through the advantages); None: 1."""
    k = kl_per_token(logprobs, ref_logprobs.detach(), estimator)
    if weight is not None:
        k = k * weight.detach()[:, None]
    return torch.where(response_mask.bool(), k, 0.0).sum() / num_samples


WHITEN = ("none", "batch", "group")


def whiten(adv: torch.Tensor, rewards: torch.Tensor, ok: torch.Tensor, mode: str, eps: float = 1e-6) -> torch.Tensor:
    """Divide (P, G) advantages by the std of the valid rewards of the batch or of each group (biased).

    A batch or group whose rewards are all equal (std ≤ eps) has no scale to divide by and is left as it is:
    its group-baseline advantages are 0 up to rounding, which 1 / eps would blow up into noise, and a value
    baseline's per-token advantages are not 0 at all."""
    if mode == "none":
        return adv
    r = torch.where(ok, rewards.float(), torch.nan)
    if mode == "batch":
        std = r[ok].std() if int(ok.sum()) > 1 else torch.tensor(1.0)
    elif mode == "group":
        mean = torch.nanmean(r, dim=1, keepdim=True)
        n = ok.sum(dim=1, keepdim=True).clamp(min=2)
        std = (torch.nansum((r - mean) ** 2, dim=1, keepdim=True) / (n - 1)).sqrt()
    else:
        raise ValueError(f"algo.whiten={mode!r}: allowed are {', '.join(WHITEN)}")
    return adv / torch.where(std > eps, std + eps, torch.ones_like(std))


def entropy(logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits) over the response tokens: (B, T, V), (B, T) -> scalar."""
    return entropy_of_logprobs(torch.log_softmax(logits.float(), dim=-1), response_mask)


def entropy_of_logprobs(logp: torch.Tensor, response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`entropy` from the log-probabilities log softmax(logits) (B, T, V) a caller already has; without a mask,
    the mean over every position of logp (..., V) (the response tokens' alone, packed (N, V)); with one, the mean
    over its positions (for packed (N, V), an (N,) mask: the tokens of the samples that carry gradient)."""
    # 0 · log 0 = 0: a token of probability 0 (logit -inf) must add 0, not 0 · -inf = NaN
    ent = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)  # (B, T)
    if response_mask is None:
        return ent.sum() / max(1, ent.numel())
    m = response_mask.float()
    return (ent * m).sum() / m.sum().clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of the k3 estimator of KL(ref ‖ π) from samples of ref:
    (ρ − 1) − log ρ with ρ = π / ref, each token's clamped to 10 as in `kl_per_token`. Non-negative, zero when
    the two agree."""
    k3 = kl_per_token(ref_logp.float(), logp.float(), "k3")  # samples of ref, against π
    m = response_mask.float()
    return (k3 * m).sum() / m.sum().clamp(min=1)


OFF_POLICY = ("clipped", "truncated", "none")


def off_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    adv: torch.Tensor,
    stale: torch.Tensor,
    num_samples: int,
    mode: str = "clipped",
    cap: float = 1.0,
    clip_eps: float = 0.2,
    dual_clip: float = 3.0,
    agg: str = "seq_sum",
    num_tokens: int | None = None,
    policy_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-gradient loss for samples drawn from another distribution μ than πθ: an older policy
    (asynchronous training), a top-k/top-p filtered one, or one sampled in a lower precision.

    With per-token ratios ρ_t = πθ(a_t) / μ(a_t) (μ from the sampler's stored log-probabilities):
    - truncated: −1/B Σ_i A_i Σ_t min(ρ_t, cap) log πθ(a_t), the ratio detached: truncated importance
      sampling as in V-trace's ρ̄ (cap 1 never up-weights a token, which keeps the variance bounded).
    - clipped:   −1/B Σ_i Σ_t w_t min(r_t A_i, clip(r_t, 1 − ε, 1 + ε) A_i), PPO's clipped surrogate on
      r_t = πθ(a_t) / π_old(a_t), π_old the sampling version's own policy before top-k/top-p
      (`policy_logprobs`), with the weight w_t = π_old(a_t) / μ(a_t) detached: the trust region is around
      the policy that sampled, and the filter's renormalisation (w = the mass kept, ≤ 1) is corrected
      without being clipped (decoupled PPO's behaviour/proximal split, Hilton et al. 2021, with the sampling
      version as the proximal policy; AReaL takes the learner's current one). Without
      top-k/top-p, π_old = μ and w = 1: the plain clipped surrogate on ρ. With `dual_clip` c > 1 (PPO's dual
      clip, Ye et al. 2020; veRL's clip_ratio_c) a negative advantage's term is max(min(r A, clip(r) A), c A):
      a token whose ratio ran above c adds c A and no gradient, where the plain surrogate's r A (gradient
      r A ∇log π) grows without bound; c = 0: off.
    - none:      the on-policy loss, ignoring the lag (biased).
    Fresh samples (`stale` False: drawn with the learner's current weights) always use the plain
    REINFORCE term, so a batch without stale samples gives exactly `pg_loss`.
    Every log-ratio (of ρ, r and w) is clamped to [−20, 20] before its exp (as veRL does), so no ratio is
    infinite: a token beyond the bound has the ratio e^±20 and no gradient through it (with c = 0 and A < 0,
    clipped mode's r A then adds no gradient instead of an overflowing one).

    Args:
        logprobs, old_logprobs: (B, T) log πθ (differentiable) and log μ.
        policy_logprobs: (B, T) log π_old (clipped); None: log μ.
        response_mask: (B, T) tokens that count.
        adv: (B,) or (B, T) advantages.
        stale: (B,) bool, True where the sample's policy version is older than the learner's.
        num_samples, agg, num_tokens: the normaliser, as in `pg_loss`.
    Returns:
        (loss, corrected) where corrected is the number of response tokens of stale samples whose ratio
        was truncated (ρ > cap), clipped (outside [1 − ε, 1 + ε] on the side that binds) or dual-clipped
        (r > c with A < 0), or whose log-ratio was beyond ±20.
    """
    if mode not in OFF_POLICY:
        raise ValueError(f"algo.off_policy={mode!r}: allowed are {', '.join(OFF_POLICY)}")
    if mode == "none" or not bool(stale.any()):
        return pg_loss(logprobs, response_mask, adv, num_samples, agg, num_tokens), torch.zeros(())
    mask = response_mask.bool()
    stale_tok = mask & stale[:, None]
    log_ratio = torch.where(stale_tok, logprobs - old_logprobs, 0.0)
    ratio = _bounded_exp(log_ratio)
    a = adv.detach()[:, None] if adv.dim() == 1 else adv.detach()
    norm = _normaliser(agg, num_samples, num_tokens)
    logp = torch.where(mask, logprobs, 0.0)
    if mode == "truncated":
        coef = torch.where(stale_tok, ratio.detach().clamp(max=cap), 1.0)
        loss = -torch.where(mask, a * coef * logp, 0.0).sum() / norm
        corrected = (stale_tok & ((ratio > cap) | _beyond_bound(log_ratio))).sum()
    else:
        bounded = _beyond_bound(log_ratio)
        if policy_logprobs is not None:  # r = πθ/π_old, weighted by π_old/μ
            log_r = torch.where(stale_tok, logprobs - policy_logprobs, 0.0)
            log_w = torch.where(stale_tok, policy_logprobs - old_logprobs, 0.0)
            ratio, a = _bounded_exp(log_r), a * _bounded_exp(log_w)
            bounded = _beyond_bound(log_r) | _beyond_bound(log_w)
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        surrogate = torch.minimum(ratio * a, clipped * a)
        if dual_clip > 0:  # a negative advantage's term is at least c A (w > 0 leaves the sign of A)
            surrogate = torch.where(a < 0, torch.maximum(surrogate, dual_clip * a), surrogate)
        # fresh tokens: A log π (gradient A ∇log π); stale tokens: the clipped surrogate (gradient ρ A ∇log π)
        per_token = torch.where(stale_tok, surrogate, a * logp)
        loss = -torch.where(mask, per_token, 0.0).sum() / norm
        corrected = (stale_tok & (((ratio * a) != surrogate) | bounded)).sum()
    return loss, corrected


def _bounded_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp of the log-ratio clamped to [−LOG_RATIO_BOUND, LOG_RATIO_BOUND]: finite, no gradient outside."""
    return log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()


def _beyond_bound(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.detach().abs() > LOG_RATIO_BOUND

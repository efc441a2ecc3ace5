"""The learner's gradient against a float64 reference written out here, formula by formula.

The other learner tests compare the learner with itself (micro-batches, the shared-prompt forward, epochs as
plain updates); the enumeration in test_estimator checks `distpg.algo`'s functions but not how the learner wires
them. Here one update's gradient (captured at the optimizer step, no clipping) is compared with the gradient of

    L = −1/N Σ_i A_i Σ_t w_it log π_it  +  β/N Σ_i Σ_t k(π_it, ref_it) / σ_i  −  c_H · mean_it H_it  (+ the value loss)

built inline from a float64 copy of the policy run row by row (no shared prompts, no micro-batches, no algo
functions): the returns R_i = r_i − β Σ_t k(π_old, ref) (π_old: the sampler's stored policy log-probs), the
leave-one-out / ema / value baselines over the samples whose reward is ok, the whitening by the rewards' std
(of every term of the sample, the KL's pathwise one too),
N = B (seq_sum) or the response tokens (token_mean), w_it = π_old/μ for top-k samples, and a failed reward
that carries no gradient (its tokens add nothing to the entropy bonus either) and enters no baseline.
"""

import copy
import math
import statistics

import pyarrow as pa
import pytest
import torch

from distpg.learner import Learner
from distpg.rollout import RolloutWorker
from tests.conftest import randomize_parameters, small_config

CASES = {
    "group-k3-whiten_group-entropy": ("algo.baseline=group", "algo.kl_coef=0.2", "algo.kl_estimator=k3",
                                      "algo.whiten=group", "algo.entropy_coef=0.05"),
    "value-k1-whiten_batch-token_mean-T0.7": ("algo.baseline=value", "algo.kl_coef=0.3", "algo.kl_estimator=k1",
                                              "algo.whiten=batch", "algo.loss_agg=token_mean",
                                              "rollout.temperature=0.7", "algo.value_coef=0.5",
                                              "algo.entropy_coef=0.03", "learner.micro_batch_size=3"),
    # a dual clip of 1.3 binds on a token of this batch (the default 3 on none)
    "ema-top_k-clipped-dual_clip-stale": ("algo.baseline=ema", "rollout.top_k=3", "algo.off_policy=clipped",
                                          "algo.dual_clip=1.3", "algo.entropy_coef=0.02",
                                          "learner.micro_batch_size=5"),
    "none-top_p-truncated-token_mean-stale": ("algo.baseline=none", "rollout.top_p=0.8", "algo.off_policy=truncated",
                                              "algo.is_cap=1.1", "algo.loss_agg=token_mean", "algo.kl_coef=0.1"),
}
EMA = 0.3  # the ema baseline's running value before the update


def k_est(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from a sample of π: k1 = log π/π_ref, k3 = π_ref/π − 1 − log π_ref/π at
    most 10 (veRL's bound: a token where π_ref/π > 13.6 adds 10 and no gradient; the randomized policy has some)."""
    if estimator == "k1":
        return logp - ref
    return ((ref - logp).exp() - 1 - (ref - logp)).clamp(max=10)


def reference_grads(learner: Learner, batch: pa.RecordBatch) -> list[torch.Tensor]:
    cfg = learner.cfg
    ac, T = cfg.algo, cfg.rollout.temperature
    model = copy.deepcopy(learner.model).double()
    ref_model = copy.deepcopy(learner.ref_model).double() if learner.ref_model is not None else None
    head = copy.deepcopy(learner.value_head).double() if learner.value_head is not None else None
    col = {c: batch.column(c).to_pylist() for c in ("prompt_id", "prompt_tokens", "completion_tokens",
                                                    "completion_logprobs", "completion_policy_logprobs",
                                                    "reward", "reward_ok")}
    B = batch.num_rows
    ok = col["reward_ok"]
    n_tokens = sum(len(c) for c in col["completion_tokens"])
    norm = B if ac.loss_agg == "seq_sum" else n_tokens

    logp, ent, values, K = [], [], [], []
    for i in range(B):
        p, c = col["prompt_tokens"][i], col["completion_tokens"][i]
        idx = torch.tensor([p + c])
        logits, hidden = model(idx[:, :-1], return_hidden=True)
        logits, hidden = logits[0, len(p) - 1:] / T, hidden[0, len(p) - 1:]  # the positions predicting c
        lp_all = torch.log_softmax(logits, -1)
        logp.append(lp_all.gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
        ent.append(-(lp_all.exp() * lp_all).sum(-1))
        if head is not None:
            values.append(head(hidden.detach()).squeeze(-1))
        if ref_model is not None:
            with torch.no_grad():
                ref_lp = torch.log_softmax(ref_model(idx[:, :-1])[0, len(p) - 1:] / T, -1)
                ref_lp = ref_lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            pi_old = torch.tensor(col["completion_policy_logprobs"][i], dtype=torch.float64)
            K.append((ref_lp, float(k_est(pi_old, ref_lp, ac.kl_estimator).sum())))
        else:
            K.append((None, 0.0))
    R = [col["reward"][i] - ac.kl_coef * K[i][1] for i in range(B)]

    # baselines over the ok samples; std of the ok returns (of the batch or of the sample's group)
    groups = {}
    for i in range(B):
        groups.setdefault(col["prompt_id"][i], []).append(i)
    base, std = [0.0] * B, [1.0] * B
    r = col["reward"]
    ok_all = [r[j] for j in range(B) if ok[j]]
    for members in groups.values():
        good = [j for j in members if ok[j]]
        for i in members:
            others = [R[j] for j in good if j != i]
            if ac.baseline == "group":
                base[i] = sum(others) / len(others)
            elif ac.baseline == "ema":
                base[i] = EMA
            if ac.whiten == "group":  # the rewards' std (not the returns'): a KL-only spread is not blown up
                std[i] = statistics.stdev([r[j] for j in good]) + 1e-6
            elif ac.whiten == "batch":
                std[i] = statistics.stdev(ok_all) + 1e-6

    # the entropy bonus: the sum over the response tokens of the samples whose reward counts (a failed one's
    # tokens get no gradient from it either) over every response token, as the token-mean policy-gradient term;
    # the logged learner/entropy is the mean over those tokens
    ok_tokens = sum(len(col["completion_tokens"][i]) for i in range(B) if ok[i])
    all_tokens = sum(len(col["completion_tokens"][i]) for i in range(B))
    kept_entropy = sum(ent[i].sum() for i in range(B) if ok[i])
    mean_entropy = kept_entropy / ok_tokens
    loss = -ac.entropy_coef * kept_entropy / all_tokens
    drift = 0.0  # learner/kl: k3 of KL(π_old‖πθ) from the samples of π_old, over the same tokens as the entropy
    for i in range(B):
        if not ok[i]:
            continue
        mu = torch.tensor(col["completion_logprobs"][i], dtype=torch.float64)
        pi_old = torch.tensor(col["completion_policy_logprobs"][i], dtype=torch.float64)
        drift += float(k_est(pi_old, logp[i].detach(), "k3").sum()) / ok_tokens
        if ac.baseline == "value":
            adv = (R[i] - values[i].detach()) / std[i]
            loss = loss + ac.value_coef * ((values[i] - R[i]) ** 2).sum() / n_tokens
        else:
            adv = (R[i] - base[i]) / std[i] * torch.ones_like(logp[i])
        if ac.off_policy == "clipped":
            # PPO: w·min(r A, clip(r, 1 ± ε) A), r = π/π_old, w = π_old/μ (the kept mass of top-k/top-p, 1
            # without), and for A < 0 at least w·c A (the dual clip): the gradient is w r A ∇log π, or 0 where
            # the clipped side is the smaller one or r > c with A < 0
            r = (logp[i] - pi_old).detach().exp()
            eps = ac.clip_eps
            binds = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
            if ac.dual_clip > 0:
                binds = binds | ((adv < 0) & (r > ac.dual_clip))
            coef = torch.where(binds, 0.0, (pi_old - mu).exp() * r)
        else:  # truncated: min(π/μ, cap), detached
            coef = torch.clamp((logp[i] - mu).detach().exp(), max=ac.is_cap)
        loss = loss - (adv * coef * logp[i]).sum() / norm
        if ref_model is not None:
            # the pathwise part, rescaled by the whitening as the score-function part is through R_i
            loss = loss + ac.kl_coef * k_est(logp[i], K[i][0], ac.kl_estimator).sum() / std[i] / norm
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    grads = [g.float() for g in torch.autograd.grad(loss, params, allow_unused=True)]
    return grads, float(mean_entropy.detach()), drift


@pytest.mark.parametrize("case", list(CASES))
def test_the_learners_gradient_is_the_float64_reference(case):
    cfg = small_config("task.name=addition", "task.digits=2", "learner.grad_clip=0", *CASES[case])
    learner = Learner(cfg)
    randomize_parameters(learner.model, seed=5, scale=0.4)  # π far from uniform and from π_ref (the initial one)
    if learner.value_head is not None:
        with torch.no_grad():
            torch.manual_seed(2)
            learner.value_head.weight.normal_(0, 0.3)
            learner.value_head.bias.fill_(0.2)
    if cfg.algo.baseline == "ema":
        learner.ema = EMA
    worker = RolloutWorker(cfg, 0)
    worker.set_weights(learner.get_weights())
    batch = worker.sample(["12+30=", "3+4=", "5+61="], [0, 1, 2], seed=4)  # prompts of two lengths
    # rewards of every size (the policy's own are mostly 0); sample 1 (prompt 0) failed: a garbage reward, no
    # gradient, no baseline
    reward, ok = [(7 * i % 11) / 10 for i in range(batch.num_rows)], batch.column("reward_ok").to_pylist()
    reward[1], ok[1] = 7.0, False
    batch = batch.set_column(batch.schema.get_field_index("reward"), "reward", pa.array(reward, pa.float32()))
    batch = batch.set_column(batch.schema.get_field_index("reward_ok"), "reward_ok", pa.array(ok))
    assert len({len(c) for c in batch.column("completion_tokens").to_pylist()}) > 1
    if case.endswith("-stale"):  # sampled one version ago: the learner's policy has moved on since
        learner.version = 1
        with torch.no_grad():
            g = torch.Generator().manual_seed(8)
            for p in learner.model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    expected, entropy, drift = reference_grads(learner, batch)
    got = []
    learner.optimizer.step = lambda *a, **k: got.extend(
        p.grad.clone() if p.grad is not None else None for p in learner.trainable())
    metrics, _ = learner.update(batch)
    # the stale cases have tokens whose ratio is clipped or truncated; the fresh top-k ones have none
    assert (metrics["learner/offpolicy_corrected_frac"] > 0.05) == case.endswith("-stale"), metrics
    assert len(got) == len(expected)
    scale = max(float(g.abs().max()) for g in expected if g is not None)
    assert scale > 1e-3
    for name, a, b in zip([n for n, _ in learner.model.named_parameters()] + ["head.w", "head.b"], got, expected):
        if b is None:
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert not math.isnan(scale)
    assert metrics["learner/entropy"] == pytest.approx(entropy, rel=1e-5)
    assert metrics["learner/kl"] == pytest.approx(drift, rel=1e-3, abs=1e-6)

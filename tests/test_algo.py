"""Hand-worked checks of the REINFORCE math in distpg.algo (no model, no Ray).

Every expected value is worked out by hand in the comments next to it.
"""

import math

import pytest
import torch

from distpg import algo

NAN = float("nan")
INF = float("inf")


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- advantages
def test_none_baseline_is_the_reward():
    rewards = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)  # (P=1, G=3)
    ok = torch.ones(1, 3, dtype=torch.bool)
    adv, valid = algo.advantages(rewards, ok, "none")
    # b = 0, so A = r
    _close(adv, [[1.0, 0.5, 0.0]])
    assert adv.dtype == torch.float32
    assert valid.tolist() == [[True, True, True]]


def test_ema_baseline_without_value_is_zero_and_with_value_subtracts_it():
    rewards = torch.tensor([[1.0, 0.5], [0.0, 0.25]])  # (P=2, G=2)
    ok = torch.ones(2, 2, dtype=torch.bool)
    adv, valid = algo.advantages(rewards, ok, "ema", ema_value=None)
    # no earlier batch: b = 0, A = r
    _close(adv, [[1.0, 0.5], [0.0, 0.25]])
    assert valid.all()
    adv, valid = algo.advantages(rewards, ok, "ema", ema_value=0.25)
    # b = 0.25 for every sample: 1 - 0.25 = 0.75, 0.5 - 0.25 = 0.25, 0 - 0.25 = -0.25, 0.25 - 0.25 = 0
    _close(adv, [[0.75, 0.25], [-0.25, 0.0]])
    assert valid.all()


def test_group_baseline_is_the_leave_one_out_mean():
    rewards = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.4, 0.9]])  # (P=2, G=3)
    ok = torch.ones(2, 3, dtype=torch.bool)
    adv, valid = algo.advantages(rewards, ok, "group")
    # row 0: b_0 = (0.5 + 0.0) / 2 = 0.25 -> 1.0 - 0.25 = 0.75
    #        b_1 = (1.0 + 0.0) / 2 = 0.5  -> 0.5 - 0.5  = 0.0
    #        b_2 = (1.0 + 0.5) / 2 = 0.75 -> 0.0 - 0.75 = -0.75
    # row 1: b_0 = (0.4 + 0.9) / 2 = 0.65 -> 0.2 - 0.65 = -0.45
    #        b_1 = (0.2 + 0.9) / 2 = 0.55 -> 0.4 - 0.55 = -0.15
    #        b_2 = (0.2 + 0.4) / 2 = 0.3  -> 0.9 - 0.3  = 0.6
    _close(adv, [[0.75, 0.0, -0.75], [-0.45, -0.15, 0.6]])
    assert valid.all()
    # the full group mean (including self) would give row 0 = [0.5, 0.0, -0.5]: a different, biased answer
    assert not torch.allclose(adv[0], torch.tensor([0.5, 0.0, -0.5]))


def test_group_baseline_skips_failed_rewards():
    # row 0: sample 1 failed (its reward is NaN); row 1: sample 2 failed with a finite garbage reward 7.0
    rewards = torch.tensor([[1.0, NAN, 0.0, 0.5], [0.3, 0.8, 7.0, 0.1]])  # (P=2, G=4)
    ok = torch.tensor([[True, False, True, True], [True, True, False, True]])
    adv, valid = algo.advantages(rewards, ok, "group")
    # row 0, the other ok samples only (n_ok = 3, so each baseline averages 2 rewards):
    #   b_0 = (0.0 + 0.5) / 2 = 0.25 -> 1.0 - 0.25 = 0.75
    #   sample 1 failed -> 0
    #   b_2 = (1.0 + 0.5) / 2 = 0.75 -> 0.0 - 0.75 = -0.75
    #   b_3 = (1.0 + 0.0) / 2 = 0.5  -> 0.5 - 0.5  = 0.0
    # row 1: b_0 = (0.8 + 0.1) / 2 = 0.45 -> 0.3 - 0.45 = -0.15
    #        b_1 = (0.3 + 0.1) / 2 = 0.2  -> 0.8 - 0.2  = 0.6
    #        sample 2 failed -> 0 (and 7.0 is in no baseline)
    #        b_3 = (0.3 + 0.8) / 2 = 0.55 -> 0.1 - 0.55 = -0.45
    _close(adv, [[0.75, 0.0, -0.75, 0.0], [-0.15, 0.6, 0.0, -0.45]])
    assert valid.tolist() == ok.tolist()


def test_group_with_a_single_ok_sample_carries_no_gradient():
    rewards = torch.tensor([[0.3, 0.8, 0.1], [0.5, 0.5, 0.5], [1.0, 0.0, 0.5]])  # (P=3, G=3)
    ok = torch.tensor([[False, True, False], [False, False, False], [True, True, True]])
    adv, valid = algo.advantages(rewards, ok, "group")
    # row 0: one ok sample has no "other" samples to form a baseline -> not valid, A = 0
    # row 1: nothing ok -> nothing valid
    # row 2: b = [(0 + .5)/2, (1 + .5)/2, (1 + 0)/2] = [0.25, 0.75, 0.5] -> A = [0.75, -0.75, 0.0]
    assert valid.tolist() == [[False, False, False], [False, False, False], [True, True, True]]
    _close(adv, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.75, -0.75, 0.0]])


@pytest.mark.parametrize("baseline, ema_value", [("none", None), ("ema", 0.5)])
def test_none_and_ema_zero_failed_samples(baseline, ema_value):
    rewards = torch.tensor([[1.0, NAN, 0.25]])  # (P=1, G=3)
    ok = torch.tensor([[True, False, True]])
    adv, valid = algo.advantages(rewards, ok, baseline, ema_value=ema_value)
    b = 0.0 if ema_value is None else ema_value
    # ok samples: r - b; the failed one: 0 (not NaN, not -b)
    _close(adv, [[1.0 - b, 0.0, 0.25 - b]])
    assert valid.tolist() == [[True, False, True]]


def test_unknown_baseline_is_named_in_the_error():
    rewards, ok = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'leave_one_out'.*none, ema, group"):
        algo.advantages(rewards, ok, "leave_one_out")


# ---------------------------------------------------------------------------------------- ema_update
def test_ema_update_first_call_sets_then_blends():
    ema = algo.ema_update(None, 0.8, decay=0.9)
    assert ema == pytest.approx(0.8)  # first batch: b = its mean
    ema = algo.ema_update(ema, 0.2, decay=0.9)
    assert ema == pytest.approx(0.74)  # 0.9 * 0.8 + 0.1 * 0.2 = 0.72 + 0.02
    ema = algo.ema_update(ema, 1.0, decay=0.9)
    assert ema == pytest.approx(0.766)  # 0.9 * 0.74 + 0.1 * 1.0 = 0.666 + 0.1
    # a running value of 0.0 is a value, not "no value yet": 0.5 * 0.0 + 0.5 * 1.0
    assert algo.ema_update(0.0, 1.0, decay=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("same", [0.1, 0.3, 0.7])
def test_whitening_leaves_a_group_of_equal_rewards_unscaled(same):
    """Group 0's rewards are all equal: its leave-one-out advantages are 0 up to float32 rounding, and a
    division by its std (0) + eps would turn that rounding into advantages of order 0.01-0.1; group 1 is
    divided by its own std. With the value baseline (per-token advantages r - V, not 0) the same holds."""
    rewards = torch.tensor([[same] * 8, [0.0, 1.0, 0.5, 0.25, 0.0, 1.0, 0.75, 0.5]])
    ok = torch.ones_like(rewards, dtype=torch.bool)
    adv, _ = algo.advantages(rewards, ok, "group", None)
    out = algo.whiten(adv, rewards, ok, "group")
    assert out[0].abs().max() < 1e-6
    torch.testing.assert_close(out[1], adv[1] / (rewards[1].double().std().float() + 1e-6))
    values = torch.ones(2, 8) * 0.3  # stands for per-token r - V(s): whitening must not blow it up
    assert torch.equal(algo.whiten(values, rewards, ok, "group")[0], values[0])
    assert torch.equal(algo.whiten(values[:1], rewards[:1], ok[:1], "batch"), values[:1])


# ------------------------------------------------------------------------------------------- pg_loss
# B = 2 samples, T = 3 tokens; the last token of sample 0 is not part of its completion.
LOGPROBS = [[-1.0, -2.0, -0.5], [-0.25, -1.5, -3.0]]
MASK = [[True, True, False], [True, True, True]]
ADV = [2.0, -1.0]


def test_pg_loss_value_and_gradient():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    adv = torch.tensor(ADV, requires_grad=True)
    loss = algo.pg_loss(logprobs, torch.tensor(MASK), adv, num_samples=2)
    # sequence sums: sample 0: -1 - 2 = -3 (the masked -0.5 is left out); sample 1: -0.25 - 1.5 - 3 = -4.75
    # loss = -(2 * -3 + -1 * -4.75) / 2 = -(-6 + 4.75) / 2 = 0.625
    assert loss.item() == pytest.approx(0.625)
    loss.backward()
    # d loss / d logprob_{i,t} = -A_i * mask_{i,t} / B:
    #   sample 0: -2 / 2 = -1 on the two completion tokens, 0 on the masked one
    #   sample 1: +1 / 2 = 0.5 on all three
    _close(logprobs.grad, [[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]])
    assert adv.grad is None  # the advantages are constants of the surrogate


def test_pg_loss_float_mask_matches_bool_mask():
    logprobs = torch.tensor(LOGPROBS)
    bool_loss = algo.pg_loss(logprobs, torch.tensor(MASK), torch.tensor(ADV), num_samples=2)
    float_loss = algo.pg_loss(logprobs, torch.tensor(MASK).float(), torch.tensor(ADV), num_samples=2)
    assert float_loss.item() == pytest.approx(bool_loss.item()) == pytest.approx(0.625)


def test_pg_loss_normalises_by_num_samples_so_micro_batches_add_up():
    logprobs, mask, adv = torch.tensor(LOGPROBS, requires_grad=True), torch.tensor(MASK), torch.tensor(ADV)
    # the same two samples as part of a batch of B = 4: half the loss and half the gradient
    loss = algo.pg_loss(logprobs, mask, adv, num_samples=4)
    assert loss.item() == pytest.approx(0.3125)  # 0.625 * 2 / 4
    loss.backward()
    _close(logprobs.grad, [[-0.5, -0.5, 0.0], [0.25, 0.25, 0.25]])  # -A_i * mask / 4
    # two micro-batches of one sample each, normalised by the whole batch, add up to the full loss:
    # sample 0: -(2 * -3) / 2 = 3.0; sample 1: -(-1 * -4.75) / 2 = -2.375; 3.0 - 2.375 = 0.625
    parts = [algo.pg_loss(logprobs[i : i + 1], mask[i : i + 1], adv[i : i + 1], num_samples=2) for i in (0, 1)]
    assert [p.item() for p in parts] == pytest.approx([3.0, -2.375])
    assert sum(p.item() for p in parts) == pytest.approx(0.625)


# ------------------------------------------------------------------------------------------- entropy
def test_entropy_of_uniform_and_one_hot_distributions():
    # (B=1, T=3, V=4): uniform over 4 tokens, one-hot, uniform over 2 tokens
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -INF, -INF, -INF], [3.0, 3.0, -INF, -INF]]])
    ln2 = math.log(2.0)
    # per-token entropies: ln 4 = 2 ln 2, 0 (0 * log 0 counts as 0), ln 2
    # mask [1, 1, 0]: (2 ln 2 + 0) / 2 = ln 2
    assert algo.entropy(logits, torch.tensor([[True, True, False]])).item() == pytest.approx(ln2)
    # mask [1, 0, 1]: (2 ln 2 + ln 2) / 2 = 1.5 ln 2
    assert algo.entropy(logits, torch.tensor([[True, False, True]])).item() == pytest.approx(1.5 * ln2)
    # mask [0, 1, 0]: the one-hot token alone has entropy 0
    assert algo.entropy(logits, torch.tensor([[False, True, False]])).item() == pytest.approx(0.0)
    # nothing masked in: 0, not NaN
    assert algo.entropy(logits, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_entropy_of_nearly_one_hot_finite_logits():
    # p = softmax([30, 0, 0, 0]) = (1 - 3e, e, e, e) with e = 1 / (e^30 + 3) ~ 9.4e-14: H ~ 3 e * 31 ~ 8.7e-12
    logits = torch.tensor([[[30.0, 0.0, 0.0, 0.0]]])
    assert algo.entropy(logits, torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- kl_k3
def test_kl_k3_is_zero_for_identical_policies():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -7.0]])
    assert algo.kl_k3(logp, logp.clone(), torch.ones(2, 3)).item() == 0.0


def test_kl_k3_hand_example():
    ref = torch.tensor([[-1.0, -2.0, -0.5]])
    # rho = pi / ref = 2, 0.5, 4 at the three tokens
    logp = ref + torch.log(torch.tensor([[2.0, 0.5, 4.0]]))
    # k3(rho) = (rho - 1) - ln rho:
    #   rho = 2:   1 - ln 2          = 0.30685
    #   rho = 0.5: -0.5 + ln 2       = 0.19315
    #   rho = 4:   3 - ln 4          = 1.61371
    # mask [1, 1, 0]: (1 - ln 2 - 0.5 + ln 2) / 2 = 0.5 / 2 = 0.25
    assert algo.kl_k3(logp, ref, torch.tensor([[True, True, False]])).item() == pytest.approx(0.25, abs=1e-6)
    # all three: (0.5 + 3 - 2 ln 2) / 3 = (3.5 - 1.386294) / 3 = 0.704569
    expected = (3.5 - 2 * math.log(2.0)) / 3
    assert algo.kl_k3(logp, ref, torch.ones(1, 3)).item() == pytest.approx(expected, abs=1e-6)


def test_kl_k3_is_positive_when_policies_differ():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=gen) * 3
    ref = -torch.rand(4, 5, generator=gen) * 3
    mask = torch.ones(4, 5)
    # (rho - 1) - ln rho >= 0 with equality only at rho = 1, which random log-probs never hit
    assert algo.kl_k3(logp, ref, mask).item() > 0.0
    assert algo.kl_k3(ref, logp, mask).item() > 0.0


@pytest.mark.parametrize("schedule, warmup, min_ratio", [
    ("constant", 0, 0.0), ("constant", 4, 0.0), ("linear", 0, 0.0), ("linear", 3, 0.0), ("linear", 3, 0.1),
    ("cosine", 0, 0.0), ("cosine", 5, 0.0), ("cosine", 5, 0.1), ("cosine", 20, 0.0),
])
def test_the_learning_rate_schedules_are_transformers_as_trl_steps_them(schedule, warmup, min_ratio):
    """The rate of each optimizer step under transformers' scheduler (stepped after every optimizer step, as
    TRL's trainers do) is learner.lr * lr_factor(k) for update k; 20 steps, a warmup as long as the run too."""
    from transformers import optimization as hf

    steps, lr = 20, 3e-4
    make = {
        ("constant", 0.0): lambda o: hf.get_constant_schedule_with_warmup(o, warmup),
        ("linear", 0.0): lambda o: hf.get_linear_schedule_with_warmup(o, warmup, steps),
        ("linear", 0.1): lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, warmup, steps, lr_end=0.1 * lr,
                                                                                 power=1.0),
        ("cosine", 0.0): lambda o: hf.get_cosine_schedule_with_warmup(o, warmup, steps),
        ("cosine", 0.1): lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, warmup, steps,
                                                                                  min_lr_rate=0.1),
    }[schedule, min_ratio]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, theirs = make(opt), []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])  # the rate this optimizer step uses
        opt.step()
        sched.step()
    ours = [lr * algo.lr_factor(k, schedule, warmup, steps, min_ratio) for k in range(1, steps + 1)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    if warmup:
        assert ours[0] == 0.0 and ours[min(warmup, steps) - 1] == pytest.approx(lr * (min(warmup, steps) - 1) / warmup)
    # a run resumed with run.steps raised past where it ended: the decay is over the new total, never below
    # the minimum (transformers' cosine would rise again after its total)
    assert algo.lr_factor(30, schedule, warmup, steps, min_ratio) == (1.0 if schedule == "constant" else min_ratio)


# ------------------------------------------------------------------- exact expectations, by enumeration
# A tabular policy over V = 3 tokens writing T = 2 tokens: π(a, b) = softmax(θ1)[a] · softmax(θ2[a])[b]. Its 9
# completions are listed, so the expectation of an estimator's gradient is the gradient of Σ_τ π(τ) s(τ) with
# π(τ) held constant (s: the surrogate of one sample) — exact in float64, no sampling (test_estimator samples).
V2 = 3
SEQS = torch.tensor([[a, b] for a in range(V2) for b in range(V2)])  # (9, 2)
R9 = torch.tensor([0.1, 0.9, 0.4, 0.0, 0.7, 1.0, 0.3, 0.2, 0.6], dtype=torch.float64)  # r(τ)
MASK9 = torch.ones(9, 2, dtype=torch.bool)


def tabular(seed: int, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    th1 = torch.randn(V2, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    th2 = torch.randn(V2, V2, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    return th1, th2


def seq_logprobs(th1, th2) -> torch.Tensor:
    """(9, 2) log π of each token of each completion."""
    return torch.stack([torch.log_softmax(th1, -1)[SEQS[:, 0]],
                        torch.log_softmax(th2, -1)[SEQS[:, 0], SEQS[:, 1]]], dim=1)


def grad(f, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params, retain_graph=True)])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_kl_score_function_and_pathwise_parts_are_the_exact_kl_gradient(estimator, weight):
    """E[(r − β K) ∇log π(τ)] + β E[∇K] = ∇(E[r] − β KL(π‖π_ref)) exactly (K = Σ_t k_t of the detached
    log-probs in the advantage; `kl_pathwise` differentiates k_t); a per-sample weight (whitening's 1/std) on
    the advantage and on the pathwise part scales both."""
    th = tabular(0)
    ref = seq_logprobs(*tabular(1, requires_grad=False))
    logp = seq_logprobs(*th)
    pi = logp.sum(1).exp().detach()  # π(τ), a constant of the expectation
    beta = 0.7
    K = torch.where(MASK9, algo.kl_per_token(logp.detach(), ref, estimator), 0.0).sum(1)
    w = torch.full((9,), weight, dtype=torch.float64)
    surrogate = (algo.pg_loss(logp, MASK9, pi * w * (R9 - beta * K), num_samples=1)
                 + beta * algo.kl_pathwise(logp, ref, MASK9, estimator, num_samples=1, weight=pi * w))
    pi_grad = logp.sum(1).exp()
    exact = (pi_grad * R9).sum() - beta * (pi_grad * (logp.sum(1) - ref.sum(1))).sum()
    torch.testing.assert_close(-grad(surrogate, th), weight * grad(exact, th), rtol=1e-10, atol=1e-12)
    # E_π[K] is KL(π‖π_ref) for both estimators
    kl = (pi * (logp.detach().sum(1) - ref.sum(1))).sum()
    assert float((pi * K).sum()) == pytest.approx(float(kl), rel=1e-10)


def test_value_baseline_per_token_is_exactly_unbiased():
    """Σ_t (r − V(s_t)) ∇log π(a_t | s_t) for any V of the prefix: expectation ∇E[r] exactly."""
    th = tabular(2)
    logp = seq_logprobs(*th)
    pi = logp.sum(1).exp().detach()
    v_first, v_second = 0.35, torch.tensor([0.9, -0.2, 0.5], dtype=torch.float64)  # V(prompt), V(prompt, a)
    values = torch.stack([torch.full((9,), v_first, dtype=torch.float64), v_second[SEQS[:, 0]]], dim=1)
    adv = algo.value_advantages(R9, values) * pi[:, None]
    surrogate = algo.pg_loss(logp, MASK9, adv, num_samples=1)
    exact = (logp.sum(1).exp() * R9).sum()
    torch.testing.assert_close(-grad(surrogate, th), grad(exact, th), rtol=1e-10, atol=1e-12)
    # a baseline that depends on the token it multiplies (V of the state after it) is biased: the check can tell
    after = torch.stack([v_second[SEQS[:, 0]], v_second[SEQS[:, 1]]], dim=1)
    biased = algo.pg_loss(logp, MASK9, algo.value_advantages(R9, after) * pi[:, None], num_samples=1)
    assert not torch.allclose(-grad(biased, th), grad(exact, th), atol=1e-3)


def test_leave_one_out_group_baseline_is_exactly_unbiased_and_the_group_mean_is_not():
    """G = 2 samples per prompt, all 81 pairs of completions: the leave-one-out estimator's expectation is
    ∇E[r]; the group mean including the sample itself gives (G − 1)/G of it."""
    th = tabular(3)
    logp = seq_logprobs(*th)
    pi = logp.sum(1).exp().detach()
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)  # (81,) the pair (τ_i, τ_j)
    p_pair = pi[i] * pi[j]
    rewards = torch.stack([R9[i], R9[j]], dim=1)  # (81, 2): 81 "prompts" of G = 2
    ok = torch.ones(81, 2, dtype=torch.bool)
    pair_logp = torch.stack([logp[i], logp[j]], dim=1).reshape(162, 2)
    exact = grad((logp.sum(1).exp() * R9).sum(), th)
    adv, _ = algo.advantages(rewards, ok, "group")
    loo = algo.pg_loss(pair_logp, torch.ones(162, 2), (adv.double() * p_pair[:, None]).reshape(-1), num_samples=2)
    torch.testing.assert_close(-grad(loo, th), exact, rtol=1e-6, atol=1e-7)  # advantages are float32
    incl_self = rewards - rewards.mean(1, keepdim=True)
    biased = algo.pg_loss(pair_logp, torch.ones(162, 2), (incl_self * p_pair[:, None]).reshape(-1), num_samples=2)
    torch.testing.assert_close(-grad(biased, th), 0.5 * exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["truncated", "clipped"])
def test_off_policy_corrections_are_exactly_unbiased_for_one_token(mode):
    """One token sampled from μ ≠ π (full support): E_μ[(π/μ) A ∇log π] = ∇E_π[r] exactly, for truncated with a
    cap above every ratio and for clipped at the sampling version (r = π/π_old = 1, weight π_old/μ unclipped)."""
    th = tabular(4)[0]
    logp = torch.log_softmax(th, -1)[:, None]  # (3, 1): the three one-token completions
    mu = torch.log_softmax(tabular(5, requires_grad=False)[0], -1)[:, None]
    r = R9[:V2]
    pi, mu_p = logp.exp().detach()[:, 0], mu.exp()[:, 0]
    kw = {"cap": 100.0} if mode == "truncated" else {"policy_logprobs": logp.detach(), "clip_eps": 0.2}
    loss, _ = algo.off_policy_loss(logp, mu, torch.ones(3, 1), r * mu_p, torch.ones(3, dtype=torch.bool), 1,
                                   mode=mode, **kw)
    exact = grad((logp[:, 0].exp() * r).sum(), [th])
    torch.testing.assert_close(-grad(loss, [th]), exact, rtol=1e-10, atol=1e-12)
    assert float((pi / mu_p).max()) > 1.05  # μ is far from π: the correction matters


# ------------------------------------------------------------------ extreme ratios: dual clip and bounds
def clipped_surrogate64(logp, old, adv, stale, eps=0.2, dual_clip=0.0):
    """(B, T) per-token terms of the clipped loss written out in float64, no bound on the log-ratio: stale
    tokens min(r A, clip(r, 1 ± ε) A), with the dual clip max(·, c A) where A < 0 and c > 0; fresh ones A log π."""
    r = (logp - old).exp()
    a = adv[:, None].expand_as(r)
    surrogate = torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    if dual_clip > 0:
        surrogate = torch.where(a < 0, torch.maximum(surrogate, dual_clip * a), surrogate)
    return torch.where(stale[:, None], surrogate, a * logp)


def test_dual_clip_by_hand_with_a_ratio_that_overflows_float32():
    """A stale sample with A = −2 whose tokens have log-ratios 100 (e^100 is inf in float32), 1.5, 0.7, 0.1, and a
    fresh one. With c = 3 (and ε = 0.2):
      log r = 100: min(r A, 1.2 A) = r A = −5.4e43; max(·, 3 A = −6) = −6, no gradient (dual-clipped)
      log r = 1.5: r = 4.4817 > 3: −6 as well, no gradient (dual-clipped)
      log r = 0.7: r = 2.0138 < 3: r A = −4.0275 (PPO leaves a negative A unclipped above 1 + ε), gradient r A
      log r = 0.1: r = 1.1052 inside [0.8, 1.2]: r A = −2.2103, gradient r A
    The float32 loss and gradient are those of the formula in float64, where e^100 is finite; without the dual
    clip the first token's r A is −inf and its gradient NaN."""
    lr = torch.tensor([100.0, 1.5, 0.7, 0.1])
    logp = torch.tensor([[-0.5, -1.0, -0.25, -2.0], [-0.5, -1.5, -0.75, -1.0]], requires_grad=True)
    old = torch.stack([logp.detach()[0] - lr, logp.detach()[1]])
    adv, stale, mask = torch.tensor([-2.0, 1.0]), torch.tensor([True, False]), torch.ones(2, 4, dtype=torch.bool)
    loss, corrected = algo.off_policy_loss(logp, old, mask, adv, stale, 2, mode="clipped", clip_eps=0.2,
                                           dual_clip=3.0)
    logp64 = logp.detach().double().requires_grad_(True)
    ref = -clipped_surrogate64(logp64, old.double(), adv.double(), stale, dual_clip=3.0).sum() / 2
    # −(−6 − 6 − 4.02751 − 2.21034 + 1 · (−0.5 − 1.5 − 0.75 − 1.0)) / 2 = (18.23785 + 3.75) / 2 = 10.99392
    assert ref.item() == pytest.approx(10.99392, abs=1e-5)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    loss.backward()
    ref.backward()
    assert torch.isfinite(logp.grad).all()
    # d loss / d log π = −r A / 2 on the two unclipped stale tokens, 0 on the dual-clipped ones, −A / 2 fresh
    torch.testing.assert_close(logp.grad.double(), logp64.grad, rtol=1e-6, atol=1e-7)
    assert logp.grad[0, :2].eq(0).all() and logp.grad[0, 2].item() == pytest.approx(2.01375, abs=1e-5)
    assert int(corrected) == 2  # the two dual-clipped tokens (r A changed to c A); the other two are r A


def test_dual_clip_off_is_the_plain_clipped_surrogate_and_on_changes_only_negative_advantages_above_c():
    """Random moderate ratios (|log r| ≤ 2): with dual_clip = 0 the loss and gradient are the plain clipped
    surrogate's in float64 and the count is PPO's clipfrac; with c = 3 exactly the tokens with A < 0 and r > 3
    change (to c A, no gradient) and are counted as corrected too."""
    gen = torch.Generator().manual_seed(7)
    logp = (-torch.rand(5, 8, generator=gen) * 3).requires_grad_(True)
    old = logp.detach() - (torch.rand(5, 8, generator=gen) * 4 - 2)
    adv = torch.tensor([1.5, -0.7, -2.0, 0.3, -0.4])
    stale = torch.tensor([True, True, True, True, False])
    mask = torch.rand(5, 8, generator=gen) > 0.2
    r = (logp.detach().double() - old.double()).exp()
    a = adv.double()[:, None]
    counted = mask & stale[:, None]
    clipfrac = counted & (((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8)))
    dual = counted & (a < 0) & (r > 3)
    assert int(dual.sum()) >= 2 and int(clipfrac.sum()) >= 2  # the draw has both kinds of tokens
    for c, expected_count in ((0.0, clipfrac), (3.0, clipfrac | dual)):
        logp.grad = None
        loss, corrected = algo.off_policy_loss(logp, old, mask, adv, stale, 5, mode="clipped", clip_eps=0.2,
                                               dual_clip=c)
        loss.backward()
        logp64 = logp.detach().double().requires_grad_(True)
        terms = clipped_surrogate64(logp64, old.double(), adv.double(), stale, dual_clip=c)
        ref = -torch.where(mask, terms, 0.0).sum() / 5
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logp.grad.double(), logp64.grad, rtol=1e-6, atol=1e-7)
        assert int(corrected) == int(expected_count.sum())
        if c == 0.0:
            plain_grad = logp.grad.clone()
    # the dual clip takes the gradient off exactly the tokens with A < 0 and r > 3
    assert torch.equal(logp.grad != plain_grad, dual & (plain_grad != 0))


@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_log_ratios_of_plus_and_minus_100_give_a_finite_loss_and_gradient(dual_clip):
    """Log-ratios are clamped to [−20, 20] before the exp. A = −2 (sample 0) and A = 1 (sample 1), log r = ±100,
    ε = 0.2 (r− = e^−20 = 2.06e-9, r+ = e^20 = 4.85e8):
      A = −2, r+: c = 3: max(min(r+ A, 1.2 A), 3 A) = −6; c = 0: r+ A = −2 e^20 (no gradient: beyond the bound)
      A = −2, r−: min(r− A, 0.8 A) = −1.6 (clipped)
      A = 1,  r+: min(r+, 1.2) = 1.2 (clipped)
      A = 1,  r−: r− = 2.06e-9 (no gradient: beyond the bound)
    loss = −(first − 1.6 + 1.2 + r−) / 2: 3.2 with c = 3, e^20 + 0.2 without; every gradient 0 and every token
    counted as corrected. Unclamped, e^100 is inf in float32: a loss of inf and a NaN gradient."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[100.0, -100.0], [100.0, -100.0]])
    loss, corrected = algo.off_policy_loss(logp, old, torch.ones(2, 2), torch.tensor([-2.0, 1.0]),
                                           torch.tensor([True, True]), 2, mode="clipped", clip_eps=0.2,
                                           dual_clip=dual_clip)
    first = -6.0 if dual_clip else -2 * math.exp(20)
    expected = -(first - 1.6 + 1.2 + math.exp(-20)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 2))
    assert int(corrected) == 4


def test_truncated_weights_of_extreme_log_ratios_are_finite_and_counted():
    """Truncated: the weight min(ρ, cap) of log ρ = 100 is the cap, of log ρ = −100 e^−20 (the bound), no NaN;
    cap = 1e9 is above e^20, so the first token's weight is e^20 = 4.85e8, and both count as corrected.
    loss = −A (e^20 · −1 + e^−20 · −2) / 1 = e^20 + 2 e^−20 with A = 1; d loss / d log π = −A w = (−e^20, −e^−20)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[100.0, -100.0]])
    loss, corrected = algo.off_policy_loss(logp, old, torch.ones(1, 2), torch.tensor([1.0]), torch.tensor([True]),
                                           1, mode="truncated", cap=1e9)
    assert loss.item() == pytest.approx(math.exp(20) + 2 * math.exp(-20), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-math.exp(20), -math.exp(-20)]]), rtol=1e-6, atol=0)
    assert int(corrected) == 2


def test_k3_is_clamped_to_10_with_no_gradient_beyond_and_k1_is_not():
    """log ρ = log π_ref − log π per token: 100, 50, −50, 2, −1.
      k3 = ρ − 1 − log ρ: e^100 (inf in float32), e^50 = 5.2e21, 49, e^2 − 3 = 4.3891, e^−1 = 0.3679 (+1 − 1)
      clamped to [−10, 10]: 10, 10, 10, 4.3891, 0.3679; gradient ∂k3/∂log π = 1 − ρ inside (1 − e^2 = −6.3891,
      1 − e^−1 = 0.6321), 0 where the clamp binds. k1 = −log ρ as it was: −100, −50, 50, −2, 1."""
    log_rho = torch.tensor([[100.0, 50.0, -50.0, 2.0, -1.0]])
    logp = torch.full((1, 5), -3.0, requires_grad=True)
    ref = logp.detach() + log_rho
    k3 = algo.kl_per_token(logp, ref, "k3")
    _close(k3.detach(), [[10.0, 10.0, 10.0, math.exp(2) - 3, math.exp(-1)]])
    algo.kl_pathwise(logp, ref, torch.ones(1, 5), "k3", num_samples=1).backward()
    _close(logp.grad, [[0.0, 0.0, 0.0, 1 - math.exp(2), 1 - math.exp(-1)]])
    _close(algo.kl_per_token(logp, ref, "k1").detach(), [[-100.0, -50.0, 50.0, -2.0, 1.0]])
    # the diagnostic kl_k3 (KL(ref‖π) from samples of ref) is the same clamped estimate: ρ = π / ref = e^50 here
    assert algo.kl_k3(torch.tensor([[0.0]]), torch.tensor([[-50.0]]), torch.ones(1, 1)).item() == 10.0

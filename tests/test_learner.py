"""The learner as a plain class: bad numbers skip the step and leave every state untouched."""

import copy

import pytest
import torch

from distpg.learner import Learner
from distpg.model import forward_every_row
from distpg.rollout import RolloutWorker
from tests.conftest import small_config


def setup(*overrides):
    cfg = small_config(*overrides)
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    worker.set_weights(learner.get_weights())
    return learner, worker


def snapshot(learner):
    params = [p.detach().clone() for p in learner.model.parameters()]
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in learner.optimizer.state.items()}
    return params, moments


def nan_forward(model):
    """A final layer norm that turns every hidden state into NaN (whichever forward the learner runs)."""
    real = model.ln_f.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * float("nan")

    return forward


def test_non_finite_loss_skips_the_step_and_changes_nothing():
    learner, worker = setup()
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    learner.update(batch)  # one real step first, so the optimizer has moments to protect
    params, moments = snapshot(learner)
    version = learner.version
    learner.model.ln_f.forward = nan_forward(learner.model)
    metrics, weights = learner.update(batch)
    # the version still counts the update (unchanged weights are published as the next version)
    assert metrics["learner/skipped_steps"] == 1 and learner.version == weights.version == version + 1
    new_params, new_moments = snapshot(learner)
    assert all(torch.equal(a, b) for a, b in zip(params, new_params))
    assert moments.keys() == new_moments.keys()
    for k in moments:
        assert all(torch.equal(moments[k][n], new_moments[k][n]) for n in moments[k])
    assert all(p.grad is None for p in learner.model.parameters())
    del learner.model.ln_f.forward  # back to the real forward: training goes on
    metrics, _ = learner.update(batch)
    assert learner.version == version + 2 and metrics["learner/skipped_steps"] == 1


def test_a_non_finite_value_head_gradient_skips_the_step_too():
    """The skip check and learner/grad_norm cover every parameter grad_clip clips, the value head's too: a NaN in
    its gradient alone (the loss finite) made the clip's scale, and with it every parameter it clips, NaN."""
    learner, worker = setup("algo.baseline=value")
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    learner.update(batch)
    params, _ = snapshot(learner)
    head = [p.detach().clone() for p in learner.value_head.parameters()]
    hook = learner.value_head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    metrics, _ = learner.update(batch)
    hook.remove()
    assert metrics["learner/skipped_steps"] == 1 and metrics["learner/grad_norm"] != metrics["learner/grad_norm"]
    assert all(torch.equal(a, b) for a, b in zip(params, snapshot(learner)[0]))
    assert all(torch.equal(a, b) for a, b in zip(head, learner.value_head.parameters()))


def test_the_value_loss_does_not_change_the_policys_clipped_gradient():
    """The value head's gradient is clipped apart from the policy's: with one clip over both, a large value loss
    (a high algo.value_coef, or rewards on a large scale) took up the norm learner.grad_clip allows and scaled the
    policy's gradient down, so that the value loss moved the policy after all (its step, not its direction)."""
    grads = {}
    for coef in (0.5, 50.0):
        learner, worker = setup("algo.baseline=value", f"algo.value_coef={coef}", "learner.grad_clip=0.5")
        batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
        learner.optimizer.step = lambda *a, learner=learner, coef=coef, **k: grads.setdefault(
            coef, ([p.grad.clone() for p in learner.model.parameters()],
                   [p.grad.clone() for p in learner.value_head.parameters()]))
        metrics, _ = learner.update(batch)
        assert metrics["learner/grad_norm"] > 0.5  # the clip binds
    (policy, _), (policy_big, head_big) = grads[0.5], grads[50.0]
    for a, b in zip(policy, policy_big):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in head_big]))) <= 0.5 + 1e-5


def test_the_logged_value_loss_is_the_value_heads_squared_error_before_its_coefficient():
    """learner/value_loss was logged times algo.value_coef, which a TRL or OpenRLHF user reads as the raw error
    (a helper's trial): it is the mean over completion tokens of (V - R)^2, and learner/loss adds value_coef times
    it. The same first update with two coefficients: the same value loss, the losses apart by the coefficients'
    difference times it, and (the value head starts at zero) the mean of R^2 over the samples' tokens."""
    metrics = {}
    for coef in (0.5, 2.0):
        learner, worker = setup("algo.baseline=value", f"algo.value_coef={coef}")
        batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
        metrics[coef], _ = learner.update(batch)
    assert metrics[0.5]["learner/value_loss"] == metrics[2.0]["learner/value_loss"] > 0
    assert metrics[2.0]["learner/loss"] - metrics[0.5]["learner/loss"] == pytest.approx(
        1.5 * metrics[0.5]["learner/value_loss"], rel=1e-5)
    r = torch.tensor(batch.column("reward").to_pylist(), dtype=torch.float64)
    tokens = torch.tensor([len(t) for t in batch.column("completion_tokens").to_pylist()], dtype=torch.float64)
    assert metrics[0.5]["learner/value_loss"] == pytest.approx(float((r**2 * tokens).sum() / tokens.sum()), rel=1e-5)


@pytest.mark.parametrize("steps", [[], ["learner.epochs=2", "learner.mini_batches=2"]], ids=["one-step", "2x2-steps"])
def test_too_many_consecutive_skips_stop_with_a_clear_message(steps):
    """learner.max_consecutive_skips counts updates: with learner.epochs x learner.mini_batches optimizer steps
    per update, one update whose steps are all non-finite is one skipped update, not four."""
    learner, worker = setup("learner.max_consecutive_skips=2", *steps)
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    learner.model.ln_f.forward = nan_forward(learner.model)
    learner.update(batch)
    learner.update(batch)
    with pytest.raises(FloatingPointError, match=r"3 consecutive updates .* learner.max_consecutive_skips=2"):
        learner.update(batch)


def final_grads(learner):
    """The gradient each parameter holds when the optimizer steps (the last accumulation's), by name."""
    grads = {}
    for name, p in learner.model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    return grads


def test_micro_batches_give_the_same_gradient_step():
    a, worker = setup()
    b, _ = setup("learner.micro_batch_size=3")
    ga, gb = final_grads(a), final_grads(b)
    batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
    ma, _ = a.update(batch)
    mb, _ = b.update(batch)
    assert ma["learner/loss"] == pytest.approx(mb["learner/loss"], rel=1e-5)
    assert ga.keys() == gb.keys() == {n for n, _ in a.model.named_parameters()}
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6 * ga[name].abs().max().item()), name
        # Adam's first step moves each parameter by about lr * g / (|g| + eps): where the gradient is rounding
        # noise (the attention's key biases, whose exact gradient is 0) it amplifies the noise, so the steps
        # are compared where the gradient is well above Adam's eps
        real = ga[name].abs() > 1e-6
        assert torch.allclose(p[real], q[real], atol=1e-6), name


@pytest.mark.parametrize("micro_batch_size", [1, 2, 5])
def test_micro_batches_leave_the_entropy_bonus_unchanged(micro_batch_size):
    # completions of different lengths (eos early or not): micro-batches hold different numbers of tokens,
    # and the entropy is a mean over every response token of the batch, not a mean of micro-batch means
    a, worker = setup("algo.entropy_coef=0.5")
    b, _ = setup("algo.entropy_coef=0.5", f"learner.micro_batch_size={micro_batch_size}")
    batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
    assert len({len(c) for c in batch.column("completion_tokens").to_pylist()}) > 1
    ma, _ = a.update(batch)
    mb, _ = b.update(batch)
    for key in ("learner/loss", "learner/entropy", "learner/grad_norm"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5), key
    # the gradients agree to ~3e-8; Adam's first step (about lr times the gradient's sign) amplifies that
    # on near-zero entries to ~2e-6, while the mean of micro-batch means moved parameters by ~2e-3
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_recomputed_logprobs_match_the_samplers():
    learner, worker = setup()
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=1)
    metrics, _ = learner.update(batch)
    # k3 KL between the sampler's stored log-probs and the learner's recomputation: ~0 on-policy
    assert 0 <= metrics["learner/kl"] < 1e-6


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_learner_follows_the_tempered_policy_the_workers_sample_from(temperature, monkeypatch):
    """rollout.temperature T: the learner's policy is softmax(logits / T), so the samples are on-policy (their
    stored log mu is what the learner recomputes, nothing is corrected); with top-k every sample is weighted
    as off-policy (mu is pi renormalised over k tokens)."""
    from tests.conftest import randomize_parameters

    def peaked(*overrides):  # a policy far from uniform, so that the temperature matters
        cfg = small_config(*overrides)
        learner = Learner(cfg)
        randomize_parameters(learner.model, seed=3, scale=0.5)
        worker = RolloutWorker(cfg, 0)
        worker.set_weights(learner.get_weights())
        return learner, worker.sample(["abcd=", "dcba=", "bbad="], [0, 1, 2], seed=1)

    learner, batch = peaked(f"rollout.temperature={temperature}")
    metrics, _ = learner.update(batch)
    assert abs(metrics["learner/kl"]) < 1e-6 and metrics["learner/offpolicy_corrected_frac"] == 0
    with monkeypatch.context() as m:  # the policy softmax(logits) instead: the samples are not its own
        m.setattr(Learner, "tempered", lambda self, logits: logits)
        learner, batch = peaked(f"rollout.temperature={temperature}")
        assert learner.update(batch)[0]["learner/kl"] > 1e-3
    if temperature < 1:
        return  # the top 3 tokens hold nearly all of this sharpened policy's mass: mu is nearly pi
    learner, batch = peaked(f"rollout.temperature={temperature}", "rollout.top_k=3", "algo.off_policy=truncated")
    as_if_on_policy = Learner(small_config(f"rollout.temperature={temperature}"))  # the same weights, no top-k
    clipped = Learner(small_config(f"rollout.temperature={temperature}", "rollout.top_k=3", "algo.off_policy=clipped"))
    for other in (as_if_on_policy, clipped):
        other.model.load_state_dict(learner.model.state_dict())
    mu, pi = (torch.tensor(batch.column(c).flatten().to_numpy())
              for c in ("completion_logprobs", "completion_policy_logprobs"))
    assert (pi <= mu + 1e-6).all() and (pi < mu - 0.25).any()  # pi = mu * kept mass; some mass below 0.78
    metrics = learner.update(batch)[0]
    assert abs(metrics["learner/kl"]) < 1e-6  # the learner's pi is the sampling version's pi
    # weighted by pi/mu <= 1 per token (nothing truncated) instead of taken as on-policy
    assert metrics["learner/offpolicy_corrected_frac"] == 0
    assert metrics["learner/loss"] != pytest.approx(as_if_on_policy.update(batch)[0]["learner/loss"], rel=1e-3)
    # clipped: the ratio to the sampling version's own pi is 1 on fresh samples, the kept mass pi/mu weights
    # the term unclipped: the same gradient as truncated's min(pi/mu, 1) (a clip on pi/mu itself would drop
    # the negative-advantage tokens whose kept mass is below 1 - eps)
    assert clipped.update(batch)[0]["learner/offpolicy_corrected_frac"] == 0
    for p, q in zip(learner.model.parameters(), clipped.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7)


def test_bfloat16_sampler_holds_bfloat16_weights_and_the_learner_corrects_every_sample():
    learner, worker = setup("rollout.dtype=bfloat16", "model.n_embd=64", "model.n_head=4", "algo.off_policy=truncated")
    assert all(p.dtype == torch.bfloat16 for p in worker.model.parameters())
    # the published float32 weights, rounded once to bfloat16 on load
    flat = torch.cat([p.detach().reshape(-1) for p in learner.model.parameters()])
    held = torch.cat([p.detach().reshape(-1) for p in worker.model.parameters()])
    assert torch.equal(held, flat.to(torch.bfloat16))
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=1)
    metrics, _ = learner.update(batch)
    # mu (bfloat16) is close to pi (float32) but not equal: every token goes through the pi/mu correction,
    # whose cap of 1 binds on some
    assert 1e-9 < metrics["learner/kl"] < 1e-2
    assert metrics["learner/offpolicy_corrected_frac"] > 0
    learner32, worker32 = setup("model.n_embd=64", "model.n_head=4")  # float32: on-policy, nothing corrected
    assert learner32.update(worker32.sample(["abcd="], [2], seed=1))[0]["learner/offpolicy_corrected_frac"] == 0


def _grads_at_the_step(learner, batch):
    """learner.update(batch); returns the gradients the optimizer stepped with, and the dtypes of the results of
    every matrix product (mm, addmm, bmm, baddbmm) run meanwhile, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm)

    class Products(TorchDispatchMode):
        dtypes: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in products:
                self.dtypes.add(out.dtype)
            return out

    grads, step = [], learner.optimizer.step
    learner.optimizer.step = lambda *a, **k: grads.extend(p.grad.clone() for p in learner.model.parameters()) or \
        step(*a, **k)
    mode = Products()
    with mode:
        metrics, _ = learner.update(batch)
    return grads, mode.dtypes, metrics


@pytest.mark.parametrize("sets", [("algo.kl_coef=0.1", "algo.entropy_coef=0.01"),
                                  ("algo.baseline=value", "learner.epochs=2", "learner.mini_batches=2")],
                         ids=["kl-entropy", "value-2x2-steps"])
def test_a_bfloat16_learner_multiplies_in_bfloat16_and_keeps_float32_weights_gradients_and_adam_state(sets):
    """learner.dtype=bfloat16: mixed precision. Every matrix product of the policy's forward and backward passes
    (the reference policy's too) runs in bfloat16, float32 ones with the default; only the value head's stay
    float32; parameters, gradients and Adam's moments stay float32; the gradient is the float32 learner's up to
    bfloat16 rounding, and the same config gives the same numbers."""
    learner32, worker = setup(*sets)
    batch = worker.sample(["abcd=", "dcba=", "bbad="], [0, 1, 2], seed=1)
    g32, dtypes32, _ = _grads_at_the_step(learner32, batch)
    assert dtypes32 == {torch.float32}
    runs = []
    for _ in range(2):
        learner = Learner(small_config("learner.dtype=bfloat16", *sets))
        grads, dtypes, metrics = _grads_at_the_step(learner, batch)
        assert dtypes == ({torch.bfloat16, torch.float32} if learner.value_head is not None else {torch.bfloat16})
        assert all(t.dtype == torch.float32 for t in [*learner.model.parameters(), *grads])
        assert all(t.dtype == torch.float32 for state in learner.optimizer.state.values() for t in state.values())
        runs.append((grads, metrics))
    flat32, flat16 = torch.cat([g.reshape(-1) for g in g32]), torch.cat([g.reshape(-1) for g in runs[0][0]])
    err = float((flat16 - flat32).norm() / flat32.norm())
    assert 1e-5 < err < 0.05, err  # rounded, not another gradient
    numbers = [{k: v for k, v in m.items() if not k.startswith("perf/")} for _, m in runs]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0])) and numbers[0] == numbers[1]


def test_a_bfloat16_learner_corrects_every_sample_as_off_policy():
    """The float32 sampler's log-probabilities are not the bfloat16 learner's: every token goes through the
    pi/mu correction (truncated at 1 here, which binds on some), as with a bfloat16 sampler."""
    learner32, worker = setup("algo.off_policy=truncated")
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=1)
    learner = Learner(small_config("algo.off_policy=truncated", "learner.dtype=bfloat16"))
    metrics = learner.update(batch)[0]
    assert 1e-9 < metrics["learner/kl"] < 1e-2
    assert metrics["learner/offpolicy_corrected_frac"] > 0
    assert learner32.update(batch)[0]["learner/offpolicy_corrected_frac"] == 0


def _pretrained_like(learner, offset=150.0):
    """Logits as large as a pretrained GPT-2's: about -offset for every token, a few nats apart (bfloat16 rounds
    them by tenths of a nat)."""
    from tests.conftest import randomize_parameters

    randomize_parameters(learner.model, seed=3, scale=0.3)
    with torch.no_grad():  # a final-LayerNorm feature that is `offset` everywhere, times -1 in every token's row
        learner.model.ln_f.weight[0], learner.model.ln_f.bias[0] = 0.0, offset
        learner.model.wte.weight[:, 0] = -1.0
    if learner.ref_model is not None:
        learner.ref_model.load_state_dict(learner.model.state_dict())


@pytest.mark.parametrize("sets", [("learner.dtype=bfloat16",), ("rollout.dtype=bfloat16",),
                                  ("learner.dtype=bfloat16", "algo.kl_coef=0.1"),
                                  ("learner.dtype=bfloat16", "learner.epochs=2", "learner.mini_batches=2",
                                   "learner.lr=1e-5")],
                         ids=["learner-bf16", "sampler-bf16", "learner-bf16-kl", "learner-bf16-2x2-steps"])
def test_with_bfloat16_on_one_side_the_clip_and_the_kl_are_anchored_on_the_learners_own_logprobs(sets):
    """Where the sampler and the learner differ by bfloat16 rounding, which moves a pretrained model's
    log-probabilities by tenths of a nat, the learner recomputes pi_old for its own version's samples (as veRL's
    and OpenRLHF's actors recompute old_log_prob): PPO's clip, which the rounding alone would make bind on some
    tokens, binds on none at the first step and in the later steps of epochs x mini-batches, and the KL to a
    reference policy equal to the policy is exactly 0. At the first step the gradient is the importance-weighted
    one, A pi/mu grad log pi (truncated's with no cap)."""
    learner = Learner(small_config(*sets))
    _pretrained_like(learner)
    worker = RolloutWorker(learner.cfg, 0)
    worker.set_weights(learner.get_weights())
    batch = worker.sample(["abcd=", "dcba=", "bbad=", "cabd="], [0, 1, 2, 3], seed=1)
    uncapped = Learner(small_config(*sets, "algo.off_policy=truncated", "algo.is_cap=1e9"))
    uncapped.model.load_state_dict(learner.model.state_dict())
    if uncapped.ref_model is not None:
        uncapped.ref_model.load_state_dict(learner.model.state_dict())
    grads, _, metrics = _grads_at_the_step(learner, batch)
    assert metrics["learner/kl"] > 1e-3  # the two sides' log-probabilities are that far apart
    assert metrics["learner/offpolicy_corrected_frac"] == 0
    if learner.ref_model is not None:
        assert metrics["learner/kl_ref"] == 0
    if learner.cfg.learner.epochs == 1:
        for g, h in zip(grads, _grads_at_the_step(uncapped, batch)[0]):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)
    else:  # the anchor is the policy before the update, not each step's own: a large step moves the later
        # steps' ratios out of the clip range
        moved = Learner(small_config(*sets, "learner.lr=0.1"))
        moved.model.load_state_dict(learner.model.state_dict())
        assert moved.update(batch)[0]["learner/offpolicy_corrected_frac"] > 0


def test_a_bfloat16_learner_resumed_from_a_checkpoint_ends_bitwise_where_an_uninterrupted_one_does(tmp_path):
    """learner.dtype=bfloat16 keeps float32 parameters and Adam state, which the checkpoint holds: a learner
    resumed after update 2 takes updates 3-4 to the very numbers of an uninterrupted one (the KL reference policy,
    built before loading, and the epochs' mini-batch orders included)."""
    from distpg import checkpoint

    sets = ("learner.dtype=bfloat16", "algo.kl_coef=0.1", "algo.baseline=value", "learner.epochs=2",
            "learner.mini_batches=2")
    learner, worker = setup(*sets)
    batches = [worker.sample(["abcd=", "dcba=", "bacd=", "ccab="], [0, 1, 2, 3], seed=k) for k in range(4)]
    for b in batches[:2]:
        learner.update(b)
    checkpoint.save(tmp_path, 2, learner.state(), keep=1)
    whole = [learner.update(b)[0] for b in batches[2:]]
    resumed = Learner(learner.cfg)
    resumed.load_state(checkpoint.load(checkpoint.latest(tmp_path))[0])
    cut = [resumed.update(b)[0] for b in batches[2:]]
    assert [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in cut] == \
        [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in whole]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(learner)[0], snapshot(resumed)[0]))
    assert all(torch.equal(a, b) for a, b in zip(learner.value_head.parameters(), resumed.value_head.parameters()))


@pytest.mark.parametrize("micro_batch_size", [1, 3, 5])
def test_bfloat16_micro_batches_give_the_whole_batchs_step_up_to_rounding(micro_batch_size):
    """learner.micro_batch_size with learner.dtype=bfloat16: the loss and its diagnostics are the whole batch's
    (float32 sums of float32 terms), the gradient the whole batch's up to bfloat16 rounding (each micro-batch's
    weight gradients come out of its bfloat16 products), well within what separates it from the float32 one."""
    sets = ("algo.kl_coef=0.1", "algo.entropy_coef=0.01", "algo.baseline=value")
    _, worker = setup()
    batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
    g32 = _grads_at_the_step(Learner(small_config(*sets)), batch)[0]
    whole, _, mw = _grads_at_the_step(Learner(small_config("learner.dtype=bfloat16", *sets)), batch)
    micro, _, mm = _grads_at_the_step(
        Learner(small_config("learner.dtype=bfloat16", f"learner.micro_batch_size={micro_batch_size}", *sets)), batch)
    for key in ("learner/loss", "learner/entropy", "learner/kl", "learner/value_loss", "learner/kl_ref"):
        # up to half of bfloat16's relative precision (2**-8): the micro-batches' products round apart from the
        # whole batch's where the CPU's bfloat16 matrix products depend on the batch's shape (AMD EPYC: 1.1e-4
        # relative; 1e-5 on Intel with AMX); a micro-batch weighted wrongly is off by far more. learner/kl, of pi_old
        # recomputed in bfloat16 (as the micro-batches' shapes round it) against the update's pi, is itself that
        # rounding: ~2.6e-7 nats here, micro-batches of 1 on AMD EPYC 2.3e-7
        assert mm[key] == pytest.approx(mw[key], rel=2**-9, abs=1e-6 if key == "learner/kl" else 1e-8), key
    flat = [torch.cat([g.reshape(-1) for g in gs]) for gs in (g32, whole, micro)]
    assert float((flat[2] - flat[1]).norm() / flat[1].norm()) < 0.01
    assert float((flat[1] - flat[0]).norm() / flat[0].norm()) < 0.02


def test_a_bfloat16_learner_is_refused_on_a_gpu_that_only_emulates_bfloat16(monkeypatch):
    """A V100 (compute capability 7.0) has no bfloat16 in hardware, but torch.cuda.is_bf16_supported() says yes
    (since PyTorch 2.3 it counts emulation: a bfloat16 tensor can be made there), so the learner's check never
    refused: it ran bfloat16 autocast emulated, slower than float32. It is refused before the model is built;
    an Ampere GPU (8.0) and a float32 learner pass."""
    from types import SimpleNamespace

    from distpg.learner import check_learner_dtype

    capability = [(7, 0)]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=capability[0][0], minor=capability[0][1]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ValueError, match=r"learner.dtype=bfloat16: this GPU \(Tesla V100-SXM2-16GB\) has no "
                       r"bfloat16 in hardware .*use learner.dtype=float32"):
        Learner(small_config("learner.dtype=bfloat16"), device="cuda")
    check_learner_dtype("float32", "cuda")
    check_learner_dtype("bfloat16", "cpu")
    capability[0] = (8, 0)
    check_learner_dtype("bfloat16", "cuda:0")


def test_whitening_divides_the_value_baselines_per_token_advantages_too():
    # the value head starts at 0, so the first update's per-token advantages are the rewards themselves, and
    # whitening by the batch divides the policy loss by the batch's reward std (value_coef 0: no value loss)
    plain, worker = setup("algo.baseline=value", "algo.value_coef=0")
    whitened, _ = setup("algo.baseline=value", "algo.value_coef=0", "algo.whiten=batch")
    batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
    std = float(torch.tensor(batch.column("reward").to_pylist()).std())
    assert std > 0.1
    loss = plain.learn(batch)["learner/loss"]
    assert whitened.learn(batch)["learner/loss"] == pytest.approx(loss / (std + 1e-6), rel=1e-5)


@pytest.mark.parametrize("whiten", ["group", "batch"])
def test_whitening_with_a_kl_penalty_divides_by_the_rewards_std_not_the_returns(whiten):
    """Every reward equal (a task with 0/1 rewards where each group is all solved or all failed): whitening has
    no scale and leaves the update as it is. The returns r - beta K still differ by the KL, and dividing by
    their std (about beta times the KL's) turned a penalty of kl_coef 0.01 into unit-size advantages: a
    gradient ~150x the unwhitened one."""
    import pyarrow as pa

    from tests.conftest import randomize_parameters

    grads = {}
    for mode in ("none", whiten):
        learner, worker = setup("algo.kl_coef=0.01", "learner.grad_clip=0", f"algo.whiten={mode}")
        randomize_parameters(learner.model, seed=5, scale=0.4)  # away from the reference policy
        worker.set_weights(learner.get_weights())
        batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
        batch = batch.set_column(batch.schema.get_field_index("reward"), "reward",
                                 pa.array([1.0] * batch.num_rows, pa.float32()))
        learner.optimizer.step = lambda *a, learner=learner, mode=mode, **k: grads.setdefault(
            mode, [p.grad.clone() for p in learner.model.parameters()])
        assert learner.update(batch)[0]["learner/kl_ref"] > 0.5
    for a, b in zip(grads["none"], grads[whiten]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_value_head_learns_the_return_and_survives_a_checkpoint(tmp_path):
    from distpg import checkpoint

    learner, worker = setup("algo.baseline=value", "learner.lr=0.01")
    batch = worker.sample(["abcd=", "bcda=", "cdab=", "dabc="], [0, 1, 2, 3], seed=0)
    first, _ = learner.update(batch)
    for _ in range(100):
        last, _ = learner.update(batch)
    assert last["learner/value_loss"] < 0.7 * first["learner/value_loss"]
    path = checkpoint.save(tmp_path, 31, learner.state(), keep=2)
    assert (path / "value_head.safetensors").exists()
    other, _ = setup("algo.baseline=value")
    other.load_state(checkpoint.load(path)[0])
    assert torch.equal(other.value_head.weight, learner.value_head.weight)


def test_kl_penalty_keeps_the_policy_near_the_reference():
    from distpg.batch import to_learner_batch
    from distpg.model import token_logprobs

    def train_and_measure(*overrides):
        learner, worker = setup("learner.lr=0.01", *overrides)
        ref = [p.detach().clone() for p in learner.model.parameters()]
        prompts = ["abcd=", "bcda=", "cdab=", "dabc=", "aabb=", "ccdd="]
        for step in range(20):  # on-policy: the worker always holds the learner's weights
            worker.set_weights(learner.get_weights())
            learner.update(worker.sample(prompts, list(range(6 * step, 6 * step + 6)), seed=step))
        worker.set_weights(learner.get_weights())
        batch = worker.sample(prompts, list(range(6)), seed=999)
        lb = to_learner_batch([batch], pad_id=0)
        tokens, mask = lb.tokens, lb.response_mask[:, 1:]
        with torch.no_grad():
            logp = token_logprobs(learner.model(tokens[:, :-1]), tokens[:, 1:])
            for p, r in zip(learner.model.parameters(), ref):
                p.copy_(r)
            ref_logp = token_logprobs(learner.model(tokens[:, :-1]), tokens[:, 1:])
        # k1 summed over each completion, on samples of π: an unbiased estimate of KL(π‖π_ref)
        return float(torch.where(mask, logp - ref_logp, 0.0).sum(1).mean())

    free = train_and_measure()
    tied = train_and_measure("algo.kl_coef=1.0", "algo.kl_estimator=k3")
    assert free > 0.5 and tied < 0.5 * free, (free, tied)


def test_token_mean_aggregation_differs_from_seq_sum_only_by_normalisation():
    a, worker = setup()
    b, _ = setup("algo.loss_agg=token_mean")
    batch = worker.sample(["abcd=", "bcda="], [0, 1], seed=2)
    ma, _ = a.update(batch)
    mb, _ = b.update(batch)
    # the same sum, divided by the number of completion tokens instead of the number of samples
    n_tokens = sum(len(t) for t in batch.column("completion_tokens").to_pylist())
    assert mb["learner/loss"] == pytest.approx(ma["learner/loss"] * batch.num_rows / n_tokens, rel=1e-5)


@pytest.mark.parametrize("sets", [(), ("algo.baseline=value", "algo.kl_coef=0.1", "algo.entropy_coef=0.01",
                                       "learner.micro_batch_size=6")])
def test_a_groups_prompt_run_once_gives_the_update_of_the_plain_forward(monkeypatch, sets):
    """The learner runs each group's prompt through the policy (and the KL reference) once: the same update
    as the plain forward of every row, to float32 rounding, with the value head, the KL penalty, the entropy
    bonus and micro-batches that cut groups apart."""
    import copy

    import distpg.learner as learner_mod

    learner, worker = setup("rollout.group_size=4", *sets)
    plain = copy.deepcopy(learner)
    batch = worker.sample(["abcd=", "dcba=", "ab=", "dcb="], [0, 1, 2, 3], seed=0)
    calls = []
    shared = learner_mod.forward_shared_prompts

    def counting(model, idx, prompt_len, return_hidden=False, **kwargs):
        calls.append(idx.shape[0])
        return shared(model, idx, prompt_len, return_hidden, **kwargs)

    monkeypatch.setattr(learner_mod, "forward_shared_prompts", counting)
    grads, _, got = _grads_at_the_step(learner, batch)
    assert sum(calls) == (32 if "algo.kl_coef=0.1" in sets else 16)  # every row, policy (and reference)
    monkeypatch.setattr(learner_mod, "forward_shared_prompts", forward_every_row)
    plain_grads, _, ref = _grads_at_the_step(plain, batch)
    for k in ("learner/loss", "learner/grad_norm", "learner/entropy", "learner/kl_ref", "learner/value_loss"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    # the gradients the optimizer stepped with (not the parameters after it: Adam's first step moves each one by
    # about lr whatever the size of its gradient, so a near-zero gradient's rounding (AMD EPYC: 1 of 16384 by
    # 2.4e-5) shows at lr's scale)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_one_token_completions_update_with_the_shared_prompt_forward(monkeypatch):
    """rollout.max_new_tokens=1 and prompts of one length: every input row is all prompt (the completion's
    token is the last one, dropped from the input), which the shared-prompt forward takes like any other:
    the update of the plain forward."""
    import copy

    import distpg.learner as learner_mod

    learner, worker = setup("rollout.group_size=4", "rollout.max_new_tokens=1", "algo.kl_coef=0.1")
    plain = copy.deepcopy(learner)
    batch = worker.sample(["abcd=", "dcba=", "abca=", "dcbb="], [0, 1, 2, 3], seed=0)
    got, _ = learner.update(batch)
    monkeypatch.setattr(learner_mod, "forward_shared_prompts", forward_every_row)
    ref, _ = plain.update(batch)
    for k in ("learner/loss", "learner/grad_norm", "learner/kl_ref"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k


def test_a_resume_keeps_the_count_of_consecutive_skips(tmp_path):
    # the checkpoint kept skipped_steps but not the current run of skips: a run resumed in the middle of a run
    # of skips went on past learner.max_consecutive_skips, where the uninterrupted run stopped
    from distpg import checkpoint

    learner, worker = setup("learner.max_consecutive_skips=2")
    batch = worker.sample(["abcd="], [0], seed=0)
    learner.model.ln_f.forward = nan_forward(learner.model)
    learner.update(batch)
    learner.update(batch)
    checkpoint.save(tmp_path, 2, learner.state(), keep=1)
    resumed = Learner(learner.cfg)
    resumed.load_state(checkpoint.load(checkpoint.latest(tmp_path))[0])
    resumed.model.ln_f.forward = nan_forward(resumed.model)
    with pytest.raises(FloatingPointError, match=r"3 consecutive updates .* learner.max_consecutive_skips=2"):
        resumed.update(batch)


def test_the_learner_steps_with_the_scheduled_rate_and_a_resume_continues_it(tmp_path):
    """learner.lr_schedule=cosine with 2 warmup updates over run.steps=6: the first update has rate 0 (the
    parameters stay as they were; Adam's moments still count the batch, as in transformers), each update's
    rate is logged as learner/lr, and a learner resumed from a checkpoint after update 3 ends bitwise where an
    uninterrupted one does."""
    from distpg import algo, checkpoint

    sched = ("learner.lr_schedule=cosine", "learner.warmup_steps=2", "learner.min_lr_ratio=0.1", "run.steps=6")
    learner, worker = setup(*sched)
    batches = [worker.sample(["abcd=", "dcba=", "bacd="], [0, 1, 2], seed=k) for k in range(6)]
    before = snapshot(learner)[0]
    rates = [learner.update(batches[0])[0]["learner/lr"]]
    assert rates == [0.0] and all(torch.equal(a, b) for a, b in zip(before, snapshot(learner)[0]))
    rates += [learner.update(b)[0]["learner/lr"] for b in batches[1:3]]
    checkpoint.save(tmp_path, 3, learner.state(), keep=1)
    rates += [learner.update(b)[0]["learner/lr"] for b in batches[3:]]
    lr = learner.cfg.learner.lr
    assert rates == [lr * algo.lr_factor(k, "cosine", 2, 6, 0.1) for k in range(1, 7)]
    assert rates[1] == 0.5 * lr and rates[2] == lr and rates[-1] < rates[3] < rates[2]  # warmup, then the decay

    resumed = Learner(learner.cfg)
    resumed.load_state(checkpoint.load(checkpoint.latest(tmp_path))[0])
    assert [resumed.update(b)[0]["learner/lr"] for b in batches[3:]] == rates[3:]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(learner)[0], snapshot(resumed)[0]))


def test_the_default_schedule_is_the_constant_rate():
    learner, worker = setup()
    batch = worker.sample(["abcd="], [0], seed=0)
    assert [learner.update(batch)[0]["learner/lr"] for _ in range(2)] == [learner.cfg.learner.lr] * 2


@pytest.mark.parametrize("epochs, mini_batches", [(2, 1), (1, 2), (3, 2)])
def test_epochs_and_mini_batches_are_updates_on_the_parts_with_the_samples_corrected_as_off_policy(epochs,
                                                                                                   mini_batches):
    """learner.epochs x learner.mini_batches optimizer steps on one step's batch are as many plain updates, one
    per (pass, part of whole prompt groups) in that order (consecutive groups in the first pass, the split that
    `mini_batch_order` draws in each later one), each after the first seeing its samples one version stale or
    more, so that algo.off_policy=clipped takes PPO's surrogate around the sampling policy; with the group
    baseline (per group: the same on a part) the parameters and Adam's moments come out the same. The version
    still counts one update per step."""
    from distpg.learner import mini_batch_order

    sets = ["rollout.prompts_per_step=4", "algo.baseline=group"]
    learner, worker = setup(*sets, f"learner.epochs={epochs}", f"learner.mini_batches={mini_batches}")
    reference, _ = setup(*sets)
    batch = worker.sample(["abcd=", "dcba=", "bbad=", "cacb="], [0, 1, 2, 3], seed=0)  # prompt-major, G rows each
    metrics, weights = learner.update(batch)
    G, groups = 4, 4
    bounds = [groups * m // mini_batches for m in range(mini_batches + 1)]
    orders = [list(range(groups)) if epoch == 0 or mini_batches == 1 else
              mini_batch_order(learner.cfg.run.seed, 1, epoch, groups, mini_batches) for epoch in range(epochs)]
    if (epochs, mini_batches) == (3, 2):  # a later pass splits the groups otherwise than the first
        assert any({frozenset(o[:2]), frozenset(o[2:])} != {frozenset([0, 1]), frozenset([2, 3])} for o in orders)
    losses = [reference.learn(batch.take([g * G + k for g in order[lo:hi] for k in range(G)]))["learner/loss"]
              for order in orders for lo, hi in zip(bounds, bounds[1:])]
    assert learner.version == weights.version == 1 and reference.version == epochs * mini_batches
    params, ref_params = snapshot(learner)[0], snapshot(reference)[0]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(params, ref_params))
    for p, q in zip(learner.model.parameters(), reference.model.parameters()):
        mine, ref = learner.optimizer.state[p], reference.optimizer.state[q]
        assert float(mine["step"]) == float(ref["step"]) == epochs * mini_batches  # Adam steps
        assert torch.allclose(mine["exp_avg"], ref["exp_avg"], rtol=0, atol=1e-7)
    assert metrics["learner/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-7)
    assert metrics["learner/offpolicy_corrected_frac"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(params, snapshot(setup(*sets)[0])[0]))  # it did learn


def test_epochs_need_an_off_policy_correction_and_mini_batches_whole_groups():
    from distpg.config import ConfigError

    with pytest.raises(ConfigError, match="learner.epochs=2 and learner.mini_batches=1 take several optimizer steps "
                                          "on a batch.*use clipped \\(PPO\\) or truncated"):
        small_config("learner.epochs=2", "algo.off_policy=none")
    with pytest.raises(ConfigError, match="learner.mini_batches=5 is more than the rollout.prompts_per_step=4"):
        small_config("learner.mini_batches=5")
    with pytest.raises(ConfigError, match="learner.epochs=0: must be at least 1"):
        small_config("learner.epochs=0")


def test_mini_batches_with_micro_batches_and_stale_samples_give_the_same_steps():
    """learner.micro_batch_size inside a mini-batch changes no step, also where the first step's part mixes stale
    (async) and fresh samples within a micro-batch: each micro-batch corrects its own stale samples."""
    sets = ["rollout.prompts_per_step=4", "learner.epochs=2", "learner.mini_batches=2"]
    a, worker = setup(*sets)
    b, _ = setup(*sets, "learner.micro_batch_size=3")
    fresh_worker = RolloutWorker(a.cfg, 1)
    first = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    for learner in (a, b):
        learner.update(first)
    # ordered by prompt id: 2 (stale), 3 (fresh) | 4 (fresh), 5 (stale); rows 3-5, a micro-batch, mix the two
    stale = worker.sample(["bbad=", "cacb="], [2, 5], seed=1)  # still version 0
    fresh_worker.set_weights(a.get_weights())
    fresh = fresh_worker.sample(["abca=", "ddcb="], [3, 4], seed=2)  # version 1
    ma, mb = a.learn(stale, fresh), b.learn(stale, fresh)
    assert ma["rollout/staleness_max"] == 1 and ma["rollout/staleness_mean"] == 0.5
    assert ma["learner/offpolicy_corrected_frac"] == mb["learner/offpolicy_corrected_frac"]
    assert ma["learner/loss"] == pytest.approx(mb["learner/loss"], rel=1e-5, abs=1e-7)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5)  # Adam's step amplifies rounding where v is tiny
        assert torch.allclose(a.optimizer.state[p]["exp_avg"], b.optimizer.state[q]["exp_avg"], rtol=0, atol=1e-7)


def test_the_corrected_fraction_is_of_the_tokens_that_carry_gradient():
    """learner/offpolicy_corrected_frac counts the corrected tokens of the samples that carry gradient, and so
    must its denominator: a prompt whose every reward failed (no gradient, its tokens never counted as corrected)
    leaves the fraction as a batch without that prompt gives it; it was diluted by their tokens."""
    import pyarrow as pa

    from tests.conftest import randomize_parameters

    fracs = []
    for fail in (False, True):
        learner, worker = setup("algo.baseline=ema", "algo.clip_eps=0.05")
        batch = worker.sample(["abcd=", "dcba=", "bbca="], [0, 1, 2], seed=0)  # version 0
        learner.version = 1  # the learner has moved on since
        randomize_parameters(learner.model, seed=3, scale=0.3)
        if fail:  # prompt 1's rewards all failed
            ok = [pid != 1 for pid in batch.column("prompt_id").to_pylist()]
            batch = batch.set_column(batch.schema.get_field_index("reward_ok"), "reward_ok", pa.array(ok))
        else:  # without prompt 1 at all
            batch = batch.filter(pa.array([pid != 1 for pid in batch.column("prompt_id").to_pylist()]))
        fracs.append(learner.learn(batch)["learner/offpolicy_corrected_frac"])
    assert 0 < fracs[0] < 1
    assert fracs[1] == pytest.approx(fracs[0], rel=1e-6)


def test_the_value_baseline_s_advantages_are_computed_once_before_an_update_s_optimizer_steps(monkeypatch):
    """With algo.baseline=value and several optimizer steps per update, each sample's per-token advantages come
    from the value head as it was before the update (as PPO computes them once per batch): a head already fit to
    the sample's own return would make r_i - V(s_{i,t}) depend on r_i, a biased baseline that shrinks the
    gradient of the later epochs towards 0."""
    from distpg import algo

    seen = []
    real = algo.off_policy_loss

    def spy(logprobs, old_logprobs, response_mask, adv, *args, **kwargs):
        seen.append(torch.where(response_mask, adv.detach(), 0.0).clone())
        return real(logprobs, old_logprobs, response_mask, adv, *args, **kwargs)

    monkeypatch.setattr(algo, "off_policy_loss", spy)
    learner, worker = setup("algo.baseline=value", "algo.value_coef=10", "learner.epochs=3", "learner.lr=0.05")
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    head = [p.detach().clone() for p in learner.value_head.parameters()]
    learner.update(batch)
    assert any(not torch.equal(a, b) for a, b in zip(head, learner.value_head.parameters()))  # the head learned
    assert len(seen) == 3 and seen[0].abs().sum() > 0
    for later in seen[1:]:
        assert torch.allclose(later, seen[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sets", [("learner.dtype=bfloat16",), ("rollout.dtype=bfloat16", "algo.kl_coef=0.1")],
                         ids=["learner-bf16", "sampler-bf16-kl"])
def test_pi_old_and_the_value_baseline_come_from_one_forward_before_the_update(monkeypatch, sets):
    """Where bfloat16 on one side makes the learner recompute pi_old and the value baseline with several
    optimizer steps takes V(s_t) from the head as it was before the update, one no-grad forward of the policy
    gives both (and one of the KL's reference policy); each optimizer step then runs its own forward, and the
    clip anchored on the recomputed pi_old binds on no token at a small learning rate."""
    import distpg.learner as learner_mod

    learner, worker = setup(*sets, "algo.baseline=value", "learner.epochs=2", "learner.mini_batches=2",
                            "learner.lr=1e-5")
    batch = worker.sample(["abcd=", "dcba=", "bbad=", "cabd="], [0, 1, 2, 3], seed=1)
    rows = batch.num_rows
    calls = {True: [], False: []}
    shared = learner_mod.forward_shared_prompts

    def counting(model, idx, prompt_len, return_hidden=False, **kwargs):
        calls[torch.is_grad_enabled()].append((model is learner.model, idx.shape[0]))
        return shared(model, idx, prompt_len, return_hidden, **kwargs)

    monkeypatch.setattr(learner_mod, "forward_shared_prompts", counting)
    metrics, _ = learner.update(batch)
    policy = [n for own, n in calls[False] if own]
    assert sum(policy) == rows  # one pass over the batch, not one for pi_old and another for the values
    assert sum(n for own, n in calls[False] if not own) == (rows if learner.ref_model is not None else 0)
    assert sum(n for _, n in calls[True]) == 2 * rows  # two epochs of optimizer steps
    assert metrics["learner/offpolicy_corrected_frac"] == 0 and metrics["learner/value_loss"] > 0


@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_one_log_softmax_over_the_vocabulary_per_micro_batch_and_no_graph_for_an_entropy_only_logged(monkeypatch,
                                                                                                     coef):
    """The tokens' log-probabilities and the entropy come from one log softmax over the vocabulary per
    micro-batch (with GPT-2's 50257 tokens its (b, T, V) tensors are an update's largest), and an entropy that
    is only logged (algo.entropy_coef=0) keeps no autograd graph, which held three more of them."""
    from distpg import algo

    learner, worker = setup(f"algo.entropy_coef={coef}", "learner.micro_batch_size=3")
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    calls, entropies = [], []
    log_softmax, entropy = torch.log_softmax, algo.entropy_of_logprobs

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return log_softmax(x, *args, **kwargs)

    def spy(logp, mask=None):
        out = entropy(logp, mask)
        entropies.append(out.requires_grad)
        return out

    monkeypatch.setattr(torch, "log_softmax", counting)
    monkeypatch.setattr(algo, "entropy_of_logprobs", spy)
    metrics, _ = learner.update(batch)
    micro_batches = -(-batch.num_rows // 3)
    assert len(calls) == micro_batches and all(shape[-1] == learner.vocab_size for shape in calls)
    assert entropies == [coef > 0] * micro_batches and metrics["learner/entropy"] > 0


@pytest.mark.parametrize("sets", [(), ("learner.dtype=bfloat16", "algo.kl_coef=0.1"),
                                  ("algo.baseline=value", "learner.epochs=2")],
                         ids=["plain", "bf16-kl-pre-passes", "value-pre-pass"])
def test_the_output_layer_runs_on_the_response_tokens_only(monkeypatch, sets):
    """The loss and the recomputed log-probabilities look only at the completion tokens: the learner's forwards
    run the output layer (with GPT-2's vocabulary a third of a position's work, and its logits an update's
    largest tensors) on those positions alone, and not at all in a pre-pass for the values alone."""
    import distpg.model as model_mod

    learner, worker = setup(*sets)
    batch = worker.sample(["abcd=", "dcba=", "bbad="], [0, 1, 2], seed=0)
    response = sum(len(t) for t in batch.column("completion_tokens").to_pylist())
    rows = {True: [], False: []}
    real = model_mod.output_layer

    def counting(model, x):
        rows[torch.is_grad_enabled()].append(x.shape[0])
        return real(model, x)

    monkeypatch.setattr(model_mod, "output_layer", counting)
    learner.update(batch)
    assert rows[True] == [response] * learner.cfg.learner.epochs  # each optimizer step's forward
    no_grad = {(): [], ("learner.dtype=bfloat16", "algo.kl_coef=0.1"): [response, response],  # pi_old, reference
               ("algo.baseline=value", "learner.epochs=2"): [0]}[sets]
    assert rows[False] == no_grad


def test_the_largest_learning_rate_the_config_accepts_updates_without_an_error():
    """The bound on learner.lr (Adam's first step, lr / (1 - beta1), must be a float32) is the real one: just
    under it an update runs (its step is non-finite, so skipped); just over it the config refuses."""
    from distpg.config import ConfigError

    cap = 3.4028234663852886e38 * (1 - 0.9)
    learner, worker = setup(f"learner.lr={cap * 0.999!r}", "learner.beta1=0.9")
    metrics, _ = learner.update(worker.sample(["abcd=", "dcba="], [0, 1], seed=0))
    assert metrics["learner/skipped_steps"] in (0, 1)
    with pytest.raises(ConfigError, match="learner.lr="):
        setup(f"learner.lr={cap * 1.001!r}", "learner.beta1=0.9")


def test_adam_is_fused_and_stays_fused_after_resuming_an_earlier_distpgs_checkpoint():
    """The learner steps with PyTorch's fused AdamW; a checkpoint whose optimizer groups name the per-tensor
    loop (as an earlier distpg's did) resumes fused, and its next update is the one a fused checkpoint gives."""
    learner, worker = setup()
    assert all(g["fused"] for g in learner.optimizer.param_groups)
    learner.update(worker.sample(["abcd=", "dcba="], [0, 1], seed=0))
    state = learner.state()
    older = {**state, "optimizer": {**state["optimizer"], "param_groups": [
        {**g, "fused": None, "foreach": None} for g in state["optimizer"]["param_groups"]]}}
    batch = worker.sample(["abcd=", "bcda="], [0, 1], seed=1)
    after = []
    for saved in (state, older):
        resumed, _ = setup()
        resumed.load_state(copy.deepcopy(saved))  # as read from disk: the update changes the moments in place
        assert all(g["fused"] for g in resumed.optimizer.param_groups)
        resumed.update(batch)
        after.append([p.detach().clone() for p in resumed.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after))
